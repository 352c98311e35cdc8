"""lensjax checkpoint directories: Orbax-saved params plus one small JSON of metadata.

```
CKPT_DIR/
  lensjax.json   format, version, model config, tokenizer identity, components, provenance,
                 and a crc32 checksum of every saved array
  params/        Orbax (OCDBT) tree of the parameters, nested by dotted path
  lora/          only a LoRA-trained model's: its adapters (`lensjax.lora`; lensjax.json
                 holds their spec under "lora"); reading the checkpoint merges them
```

Writes are atomic: everything goes to a hidden sibling directory first and is renamed into
place only when complete, so an interrupted write never leaves a checkpoint that loads.
Reads check `lensjax.json` field by field and, unless `verify=False`, every array against its
checksum, so a damaged file is an error naming it rather than a model computing garbage.
Checkpoints written before checksums existed load unverified.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shutil
import zlib
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.files import temporary_sibling

FORMAT = "lensjax-checkpoint"
VERSION = 1
METADATA_FILE = "lensjax.json"
PARAMS_DIR = "params"
CHECKSUM = "crc32"

# GPT-2's BPE: token 50256 (<|endoftext|>) is BOS, EOS and PAD at once.
GPT2_TOKENIZER = {"name": "gpt2", "vocab_size": 50257, "bos_id": 50256, "eos_id": 50256,
                  "pad_id": 50256}


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, damaged, or not a lensjax checkpoint."""


def _nest(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in params.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = np.asarray(value)
    return flat


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=True))


def array_checksum(array: np.ndarray) -> str:
    """crc32 of an array's dtype, shape and C-order bytes, as 8 hex digits."""
    array = np.ascontiguousarray(array)
    crc = zlib.crc32(f"{array.dtype}{array.shape}".encode())
    return f"{zlib.crc32(array.reshape(-1).view(np.uint8), crc):08x}"


def _checksums(tree: Mapping[str, np.ndarray]) -> dict[str, str]:
    """{key: array_checksum} (about 0.5 s per GB on one core)."""
    return {key: array_checksum(array) for key, array in tree.items()}


# How long a failed Orbax call waits for its other arrays' reads or writes to finish.
_DRAIN_SECONDS = 60.0


def _run_on_new_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Orbax's `_run_sync_via_new_loop`, but when `coro` fails, the loop's other tasks are
    let finish before it is closed.

    Orbax reads or writes every array as a task of one `asyncio.gather` on a fresh event
    loop, and closes that loop as soon as the gather fails. The other arrays' tensorstore
    operations are still in flight then; when they complete, tensorstore calls back into the
    closed loop and prints `RuntimeError: Event loop is closed` tracebacks on stderr (after
    lensjax's own error, often at process exit). Cancelling those tasks is not enough: a
    cancelled tensorstore future still calls back later. A task that finishes has had its
    callback delivered, so nothing is left to call back once they all have. Tasks still
    waiting after `_DRAIN_SECONDS` (a hung file system) are cancelled.
    """
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(coro)
        except Exception:  # (not on Ctrl-C: that should not wait for the other tasks)
            pending = asyncio.all_tasks(loop)
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=_DRAIN_SECONDS))
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            raise
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def _drain_orbax_event_loops() -> None:
    """Make Orbax run its synchronous calls through `_run_on_new_loop` (once per process;
    nothing changes if this Orbax has no `_run_sync_via_new_loop`)."""
    try:
        from orbax.checkpoint._src import asyncio_utils
    except ImportError:  # pragma: no cover - depends on the Orbax version
        return
    if hasattr(asyncio_utils, "_run_sync_via_new_loop"):
        asyncio_utils._run_sync_via_new_loop = _run_on_new_loop


def _checkpointer():
    """An Orbax checkpointer that works within the calling process alone; use it as a
    context manager, so it is closed even when a save or restore fails.

    Checkpoints hold host (numpy) arrays, and in a multi-host run only process 0 writes them,
    so Orbax must not wait at barriers for the other processes.
    """
    import jax
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import

    _drain_orbax_event_loops()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def _remove(path: Path) -> None:
    """Delete a directory tree, or a file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def save_checkpoint(
    path: str | os.PathLike,
    params: Mapping[str, np.ndarray],
    metadata: Mapping[str, Any],
    *,
    overwrite: bool = False,
    extra: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write `params` ({dotted path: array}) and `metadata` to the directory `path`.

    `extra` holds further named trees ({name: {key: array}}), each in its own Orbax
    sub-directory (training state, for instance); `load_extra` reads one back. Every array's
    checksum goes into `lensjax.json`. Refuses an existing `path` unless `overwrite`; then the
    old checkpoint is replaced only after the new one is completely written.
    LoRA adapters among `params` (`lora.*` paths) go to the `lora/` tree; their spec must be
    `metadata["lora"]`.
    """
    from lensjax import lora

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--force) to replace it")
    params, adapters = lora.split_adapters(params)
    if bool(adapters) != ("lora" in metadata):
        raise ValueError("LoRA adapters and metadata['lora'] (their spec) go together")
    if adapters:
        extra = {**(extra or {}), lora.TREE: adapters}
    trees = {PARAMS_DIR: {k: np.asarray(v) for k, v in params.items()},
             **{name: {k: np.asarray(v) for k, v in tree.items()}
                for name, tree in (extra or {}).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.mkdir()
        with _checkpointer() as checkpointer:
            for name, tree in trees.items():
                checkpointer.save(tmp / name, _nest(tree))
            checkpointer.wait_until_finished()
        document = {
            **metadata,
            "format": FORMAT,
            "version": VERSION,
            "checksums": {"algorithm": CHECKSUM,
                          "trees": {name: _checksums(tree) for name, tree in trees.items()}},
        }
        document.setdefault("saved", datetime.datetime.now(datetime.UTC).isoformat())
        _write_json(tmp / METADATA_FILE, document)
        if path.exists() or path.is_symlink():
            old = temporary_sibling(path, "old")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _json_kind(value: Any) -> str:
    """How JSON calls the type of a parsed value."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _check_version(meta_file: Path, metadata: Mapping[str, Any]) -> None:
    version = metadata.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(
            f"{meta_file}: \"version\" must be a positive integer, found {version!r}")
    if version > VERSION:
        raise CheckpointError(
            f"{meta_file.parent} was written by a newer lensjax (format version {version}; "
            f"this one reads up to {VERSION})")


def _check_config(meta_file: Path, metadata: Mapping[str, Any]) -> None:
    from lensjax.models.families import config_from_metadata

    if "config" not in metadata:
        raise CheckpointError(f"{meta_file}: no \"config\" (the model configuration)")
    try:
        config_from_metadata(metadata)
    except ValueError as error:
        raise CheckpointError(f"{meta_file}: {error}") from error


def _check_components(meta_file: Path, metadata: Mapping[str, Any]) -> None:
    components = metadata.get("components", {})
    if not isinstance(components, dict):
        raise CheckpointError(
            f"{meta_file}: \"components\" must be an object, found {_json_kind(components)}")
    for name, record in components.items():
        if not isinstance(record, dict):
            raise CheckpointError(f"{meta_file}: \"components\".{name} must be an object, "
                                  f"found {_json_kind(record)}")


_HEX8 = re.compile(r"^[0-9a-f]{8}$")


def _check_checksums(meta_file: Path, metadata: Mapping[str, Any]) -> None:
    if "checksums" not in metadata:
        return
    checksums = metadata["checksums"]
    if not isinstance(checksums, dict) or not isinstance(checksums.get("trees"), dict):
        raise CheckpointError(f"{meta_file}: \"checksums\" must be an object with \"trees\"")
    if checksums.get("algorithm") != CHECKSUM:
        raise CheckpointError(f"{meta_file}: unknown checksum algorithm "
                              f"{checksums.get('algorithm')!r} (this lensjax uses {CHECKSUM})")
    for name, sums in checksums["trees"].items():
        if not isinstance(sums, dict) or not all(
                isinstance(s, str) and _HEX8.match(s) for s in sums.values()):
            raise CheckpointError(f"{meta_file}: \"checksums\" of {name}/ must map each array "
                                  "to 8 hex digits")


def _check_metadata(meta_file: Path, metadata: Any) -> None:
    """Raise CheckpointError naming `meta_file` and the field unless `metadata` is a
    `lensjax.json` that this version reads."""
    if not isinstance(metadata, dict):
        raise CheckpointError(
            f"{meta_file}: expected a JSON object, found {_json_kind(metadata)}")
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file} is not a lensjax checkpoint description "
                              f"(\"format\" is not {FORMAT!r})")
    _check_version(meta_file, metadata)
    _check_config(meta_file, metadata)
    _check_components(meta_file, metadata)
    _check_checksums(meta_file, metadata)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's `lensjax.json`, validated: its format and version, every field of
    its model config (of its `family`, v3b when absent: `lensjax.models.families`), and the
    shape of its other records."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; a lensjax checkpoint is a directory made by "
            "`python -m bridge import` or `model.save()`"
        )
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a lensjax checkpoint (no {METADATA_FILE}); to use the released "
            ".pth files, convert them first with `python -m bridge import ... --out DIR`"
        )
    try:
        metadata = json.loads(meta_file.read_bytes())
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{meta_file} is not valid JSON: {error}") from error
    _check_metadata(meta_file, metadata)
    return metadata


def _orbax_message(error: Exception) -> str:
    """The first line of an Orbax/tensorstore error, without tensorstore's long spec dump."""
    lines = str(error).strip().splitlines()
    message = lines[0] if lines else type(error).__name__
    return message.split(" [tensorstore_spec=")[0]


def _restore(tree_dir: Path) -> Any:
    """Orbax's restore of `tree_dir`, every failure as a CheckpointError naming it."""
    try:
        with _checkpointer() as checkpointer:
            return checkpointer.restore(tree_dir)
    except Exception as error:  # orbax raises many types for damaged data
        raise CheckpointError(f"cannot read {tree_dir} (a damaged or incomplete checkpoint): "
                              f"{_orbax_message(error)}") from error


def _verify(tree_dir: Path, tree: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
    """Raise CheckpointError naming the arrays of `tree` that differ from the checksums
    recorded when `tree_dir` was saved (none are recorded in older checkpoints)."""
    if "checksums" not in metadata:
        return
    recorded = metadata["checksums"]["trees"].get(tree_dir.name)
    if recorded is None:
        raise CheckpointError(f"{tree_dir.parent / METADATA_FILE} records no checksums for "
                              f"{tree_dir.name}/")
    actual = _checksums({k: v for k, v in tree.items() if k in recorded})
    problems = [f"{k!r} does not match its checksum" for k in recorded
                if k in actual and actual[k] != recorded[k]]
    problems += [f"{k!r} is missing" for k in recorded if k not in tree]
    problems += [f"{k!r} is not in the record" for k in tree if k not in recorded]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                           if len(problems) > 5 else "")
        raise CheckpointError(
            f"{tree_dir} is damaged (its data differs from what was saved): {shown}; restore "
            "the checkpoint from a copy or write it again")


def load_checkpoint(
    path: str | os.PathLike, *, verify: bool = True, merge_lora: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint directory -> ({dotted path: numpy array}, metadata).

    With `verify` (the default) every array is checked against the checksum saved with it
    (about 0.5 s per GB, a tenth to a fifth of the load time); a damaged array raises
    CheckpointError naming it. A LoRA-trained model's adapters are merged into its weights
    (the model it is), or with `merge_lora=False` returned beside them (`lora.*` paths).
    """
    from lensjax import lora

    metadata = read_metadata(path)
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ directory: incomplete checkpoint")
    params = _flatten(_restore(params_dir))
    if verify:
        _verify(params_dir, params, metadata)
    if "lora" in metadata:
        adapters = load_extra(path, lora.TREE, verify=verify)
        try:
            spec = lora.LoRASpec.from_dict(metadata["lora"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: \"lora\" is not a LoRA spec ({error!r})") from None
        missing = [p for layer in lora.adapter_layers(adapters)
                   for p in [layer + ".kernel"] if p not in params]
        if missing:
            raise CheckpointError(f"{path}: adapters for layers it lacks: {missing[:3]}")
        params = lora.merge(params, adapters, spec) if merge_lora else {**params, **adapters}
    return params, metadata


def load_extra(path: str | os.PathLike, name: str, *, verify: bool = True) -> dict[str, np.ndarray]:
    """The tree `name` that `save_checkpoint(..., extra={name: ...})` wrote into `path`,
    checked against its checksums unless `verify` is false."""
    tree_dir = Path(path).absolute() / name
    metadata = read_metadata(path)
    if not tree_dir.is_dir():
        raise CheckpointError(f"{path} has no {name}/ directory")
    tree = _flatten(_restore(tree_dir))
    if verify:
        _verify(tree_dir, tree, metadata)
    return tree
