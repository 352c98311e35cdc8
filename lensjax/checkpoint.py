"""lensjax checkpoint directories: Orbax-saved params plus one small JSON of metadata.

```
CKPT_DIR/
  lensjax.json   format, version, model config, tokenizer identity, components, provenance
  params/        Orbax (OCDBT) tree of the parameters, nested by dotted path
```

Writes are atomic: everything goes to a hidden sibling directory first and is renamed into
place only when complete, so an interrupted write never leaves a checkpoint that loads.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.files import temporary_sibling

FORMAT = "lensjax-checkpoint"
VERSION = 1
METADATA_FILE = "lensjax.json"
PARAMS_DIR = "params"

# GPT-2's BPE: token 50256 (<|endoftext|>) is BOS, EOS and PAD at once.
GPT2_TOKENIZER = {"name": "gpt2", "vocab_size": 50257, "bos_id": 50256, "eos_id": 50256,
                  "pad_id": 50256}


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, or not a lensjax checkpoint."""


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


def _checkpointer():
    """An Orbax checkpointer that works within the calling process alone.

    Checkpoints hold host (numpy) arrays, and in a multi-host run only process 0 writes them,
    so Orbax must not wait at barriers for the other processes.
    """
    import jax
    import orbax.checkpoint as ocp  # imported lazily: it is slow to import

    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


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
    sub-directory (training state, for instance); `load_extra` reads one back. Refuses an
    existing `path` unless `overwrite`; then the old checkpoint is replaced only after the
    new one is completely written.
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--force) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.mkdir()
        checkpointer = _checkpointer()
        checkpointer.save(tmp / PARAMS_DIR, _nest(params))
        for name, tree in (extra or {}).items():
            checkpointer.save(tmp / name, {k: np.asarray(v) for k, v in tree.items()})
        checkpointer.wait_until_finished()
        document = {"format": FORMAT, "version": VERSION, **metadata}
        document.setdefault("saved", datetime.datetime.now(datetime.UTC).isoformat())
        _write_json(tmp / METADATA_FILE, document)
        if path.exists():
            old = temporary_sibling(path, "old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's `lensjax.json`, validated."""
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
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{meta_file} is not valid JSON: {error}") from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file} is not a lensjax checkpoint description")
    if metadata.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer lensjax (format version {metadata['version']})"
        )
    return metadata


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint directory -> ({dotted path: numpy array}, metadata)."""
    metadata = read_metadata(path)
    params_dir = Path(path).absolute() / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ directory: incomplete checkpoint")
    try:
        tree = _checkpointer().restore(params_dir)
    except Exception as error:  # orbax raises many types for damaged data
        raise CheckpointError(f"cannot read the parameters in {params_dir}: {error}") from error
    return _flatten(tree), metadata


def load_extra(path: str | os.PathLike, name: str) -> dict[str, np.ndarray]:
    """The tree `name` that `save_checkpoint(..., extra={name: ...})` wrote into `path`."""
    tree_dir = Path(path).absolute() / name
    if not tree_dir.is_dir():
        raise CheckpointError(f"{path} has no {name}/ directory")
    try:
        return dict(_checkpointer().restore(tree_dir))
    except Exception as error:  # orbax raises many types for damaged data
        raise CheckpointError(f"cannot read {tree_dir}: {error}") from error
