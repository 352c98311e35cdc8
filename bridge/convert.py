"""PyTorch state dicts <-> lensjax parameters, through the tables in `bridge.tables`.

Import detects each file's layout from its keys, checks every key and shape against the model
configuration, and reports all problems of all files in one error. Export walks the same rules
backwards and restores each file's original dtypes, so import followed by export gives back
bit-identical tensors under identical keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import lensjax
from bridge.io import (
    BridgeError,
    StateDict,
    count_non_finite,
    read_state_dict,
    resolve_weights_file,
    write_safetensors,
    write_torch_file,
)
from bridge.tables import DESCRIPTIONS, EXPORT_TABLES, TABLES, Table
from lensjax.api import CaptionModel
from lensjax.checkpoint import GPT2_TOKENIZER, load_checkpoint, read_metadata
from lensjax.files import OutputError, check_output, temporary_sibling
from lensjax.models.clip.config import CLIPConfig
from lensjax.models.convnext import MultiScaleHead
from lensjax.models.families import config_from_metadata, family_named
from lensjax.models.v3b.captioner import PRESETS, CaptionerConfig
from lensjax.params import abstract_params, build_captioner, check_params, flat_params

RANDOM = "random"


@dataclasses.dataclass
class Source:
    """One weights file given for one component."""

    component: str
    path: Path
    tensors: StateDict
    table: Table


def _match_fraction(table: Table, keys: list[str]) -> float:
    normalised = [table.normalise(k) for k in keys]
    matched = sum(1 for k in normalised if table.match_torch(k) or table.ignored(k))
    return matched / len(keys)


def detect_table(component: str, path: Path, tensors: StateDict) -> Table:
    """The table of `component` whose rules explain the file's keys; a clear error otherwise."""
    keys = list(tensors)
    scored = [(t, _match_fraction(t, keys)) for ts in TABLES.values() for t in ts]
    own = [(t, s) for t, s in scored if t.component == component and s >= 0.5]
    if own:
        return max(own, key=lambda item: item[1])[0]
    best, score = max(scored, key=lambda item: item[1])
    given = DESCRIPTIONS[component]
    if score >= 0.5:
        raise BridgeError(
            f"{path} was given as the {given}, but its keys are those of the "
            f"{DESCRIPTIONS[best.component]} ({best.name} layout); check the file arguments"
        )
    raise BridgeError(
        f"{path} was given as the {given}, but its keys match no known layout "
        f"(first keys: {', '.join(keys[:5])})"
    )


def _torch_shape(rule, binds, expected) -> tuple[int, ...]:
    return rule.transform.torch_shape(
        [tuple(expected[t.format(**binds)].shape) for t in rule.flax]
    )


def torch_to_flax(
    source: Source,
    expected: Mapping[str, jax.ShapeDtypeStruct],
    exclude: frozenset[str] = frozenset(),
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Convert one source file -> ({flax path: array}, problems).

    `expected` holds the model's parameter shapes; the file must supply every path of its
    table that is not in `exclude` (paths another file supplies), and nothing else.
    """
    table, path = source.table, source.path
    wanted: dict[str, tuple[Any, dict[str, str]]] = {}
    for flax_path in expected:
        found = table.match_flax(flax_path)
        if found and flax_path not in exclude:
            rule, binds = found
            wanted[rule.torch.format(**binds)] = (rule, binds)
    canonical = {table.normalise(k): k for k in source.tensors}
    params: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for key, (rule, binds) in wanted.items():
        shape = _torch_shape(rule, binds, expected)
        if key not in canonical:
            problems.append(f"{path}: missing key {key!r} (expected shape {shape})")
            continue
        tensor = source.tensors[canonical[key]]
        if tuple(tensor.shape) != shape:
            problems.append(
                f"{path}: key {canonical[key]!r} has shape {tuple(tensor.shape)}, "
                f"expected {shape}"
            )
            continue
        non_finite = count_non_finite(tensor)
        if non_finite:
            problems.append(f"{path}: key {canonical[key]!r} has {non_finite} NaN or infinite "
                            f"value(s) of {tensor.size}")
            continue
        for template, array in zip(rule.flax, rule.transform.to_flax(tensor), strict=True):
            params[template.format(**binds)] = array
    for key, original in canonical.items():
        if key in wanted or table.ignored(key):
            continue
        found = table.match_torch(key)
        supplied_elsewhere = found and all(
            t.format(**found[1]) in exclude for t in found[0].flax
        )
        if not supplied_elsewhere:
            shape = tuple(source.tensors[original].shape)
            problems.append(f"{path}: unexpected key {original!r} (shape {shape})")
    return params, problems


def _overlap(out: Path, source: Path) -> str | None:
    """How the output folder `out` and an input path overlap (real paths), or None."""
    out_real, source_real = out.resolve(), source.resolve()
    if out_real == source_real:
        return "is"
    if out_real.is_relative_to(source_real):
        return "is inside"
    if source_real.is_relative_to(out_real):
        return "contains"
    return None


def check_out(
    out: str | os.PathLike, inputs: list[str | os.PathLike], *, force: bool = False
) -> Path:
    """Refuse the output folder `out` before any work starts: a location that cannot be
    written (`lensjax.files.check_output`), one that is, contains or is inside one of
    `inputs` (replacing it would destroy what is read), or an existing one without `force`.
    """
    out = Path(out)
    try:
        check_output(out, directory=True)
    except OutputError as error:
        raise BridgeError(str(error)) from error
    for source in inputs:
        relation = _overlap(out, Path(source))
        if relation:
            raise BridgeError(f"--out {out} {relation} the input {source}; write the output "
                              "somewhere else")
    if out.exists() and not force:
        raise BridgeError(f"{out} already exists; pass --force to replace it")
    return out


def _natural_key(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def flax_to_torch(table: Table, params: Mapping[str, np.ndarray]) -> StateDict:
    """The torch state dict (export spelling) that `table` makes of `params`."""
    groups: dict[str, tuple[Any, dict[str, str]]] = {}
    for flax_path in params:
        found = table.match_flax(flax_path)
        if found:
            groups.setdefault(found[0].torch.format(**found[1]), found)
    tensors: StateDict = {}
    for key in sorted(groups, key=_natural_key):
        rule, binds = groups[key]
        arrays = [np.asarray(params[t.format(**binds)]) for t in rule.flax]
        tensors[key] = np.asarray(rule.transform.to_torch(arrays), order="C")
    for tied, original in table.tied:
        if original in tensors:
            tensors[tied] = tensors[original].copy()
    return {table.export_key(k): v for k, v in tensors.items()}


def _raise_problems(problems: Mapping[Path, list[str]], doing: str) -> None:
    """One BridgeError listing every problem, if there are any: a single one as it is (it
    starts with its file), several one per line after a first line naming their files."""
    every = [problem for found in problems.values() for problem in found]
    if len(every) == 1:
        raise BridgeError(every[0])
    if every:
        files = [str(path) for path, found in problems.items() if found]
        raise BridgeError(f"{len(every)} problem(s) in {', '.join(files)} {doing}:\n  "
                          + "\n  ".join(every))


def _dtype_record(tensors: StateDict, table: Table) -> dict[str, Any]:
    dtypes = {table.normalise(k): str(v.dtype) for k, v in tensors.items()}
    kinds = set(dtypes.values())
    return {"dtype": kinds.pop()} if len(kinds) == 1 else {"dtypes": dtypes}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _preset_for_layout(preset: str, layout: str) -> str:
    base = preset.removesuffix("-src")
    name = f"{base}-src" if layout == "src" else base
    if name not in PRESETS:
        raise BridgeError(f"no {layout}-layout variant of preset {preset!r}")
    return name


# The files each family's import reads (component -> required), in conversion order. v3b's
# public gpt2 file comes last: it supplies wte, wpe and ln_f, and its blocks are superseded by
# the released (fine-tuned) ones.
FAMILY_FILES: dict[str, dict[str, bool]] = {
    "v3b": {"perceiver": True, "gpt2_blocks": True, "cross_attention": True,
            "encoder": False, "encoder_head": False, "gpt2": True},
    "v3a": {"projection_head": True, "decoder": True, "encoder": False, "encoder_head": False},
}


def _v3b_config(sources: Mapping[str, Source], preset: str) -> CaptionerConfig:
    """The v3b preset in the layout of the Perceiver and cross-attention files (which must
    agree)."""
    layouts = {c: sources[c].table.name.split("/")[1] for c in ("perceiver", "cross_attention")}
    if layouts["perceiver"] != layouts["cross_attention"]:
        raise BridgeError(
            f"the Perceiver file is in the {layouts['perceiver']} layout but the "
            f"cross-attention file is in the {layouts['cross_attention']} layout; "
            "both must come from the same model"
        )
    return CaptionerConfig.from_preset(_preset_for_layout(preset, layouts["perceiver"]))


def import_params(
    *,
    family: str = "v3b",
    preset: str | None = None,
    seed: int = 0,
    log=None,
    **files: str | os.PathLike | None,
) -> tuple[Any, dict[str, np.ndarray], dict[str, Any]]:
    """Read the released files of a `family` -> (config, {flax path: array}, components).

    v3b: `perceiver`, `gpt2_blocks`, `cross_attention`, `gpt2` (the public HF gpt2, for wte,
    wpe and ln_f); v3a: `projection_head`, `decoder`; both optionally `encoder` and
    `encoder_head` (`"random"`: a fresh head initialised from `seed`, a saved, seeded
    component, since LensToWords never saved its head). `preset` defaults to the family's
    full-size one. `log` receives progress lines.
    """
    say = log or (lambda message: None)
    if family not in FAMILY_FILES:
        raise BridgeError(f"unknown family {family!r}; the bridge reads "
                          f"{', '.join(FAMILY_FILES)}")
    wanted = FAMILY_FILES[family]
    unknown = sorted(c for c, path in files.items() if c not in wanted and path is not None)
    missing = [c for c, required in wanted.items() if required and files.get(c) is None]
    if unknown or missing:
        raise BridgeError(f"a {family} import reads {', '.join(wanted)}"
                          + (f"; missing: {', '.join(missing)}" if missing else "")
                          + (f"; not {family} files: {', '.join(unknown)}" if unknown else ""))
    encoder, encoder_head = files.get("encoder"), files.get("encoder_head")
    sources: dict[str, Source] = {}
    for component in wanted:
        path = files.get(component)
        if path is None or (component == "encoder_head" and path == RANDOM):
            continue
        resolved = resolve_weights_file(path)
        tensors = read_state_dict(resolved)
        table = detect_table(component, resolved, tensors)
        sources[component] = Source(component, resolved, tensors, table)
        say(f"read {resolved} ({len(tensors)} tensors): {table.name}")

    preset = preset or family  # each family's full-size preset is named after it
    if family == "v3b":
        cfg = _v3b_config(sources, preset)
    else:
        try:
            cfg = family_named(family).config.from_preset(preset)
        except ValueError as error:
            raise BridgeError(str(error)) from None
    cfg = dataclasses.replace(
        cfg,
        encoder=cfg.encoder if encoder is not None else None,
        head=cfg.head if encoder_head is not None else None,
    )
    expected = abstract_params(cfg)

    params: dict[str, np.ndarray] = {}
    problems: dict[Path, list[str]] = {}
    for component, source in sources.items():
        exclude = frozenset(params) if component == "gpt2" else frozenset()
        converted, found = torch_to_flax(source, expected, exclude)
        params.update(converted)
        problems[source.path] = found
    _raise_problems(problems, f"converting to preset {cfg.preset!r}")

    components: dict[str, Any] = {
        component: {
            "source": str(source.path),
            "sha256": _sha256(source.path),
            "table": source.table.name,
            **_dtype_record(source.tensors, source.table),
        }
        for component, source in sources.items()
    }
    if encoder is None:
        components["encoder"] = {"status": "absent"}
    if encoder_head is None:
        components["encoder_head"] = {"status": "absent"}
    elif encoder_head == RANDOM:
        head = MultiScaleHead(cfg.head, rngs=nnx.Rngs(seed))
        params.update({f"encoder_head.{k}": np.asarray(v) for k, v in flat_params(head).items()})
        components["encoder_head"] = {"status": "random", "seed": seed}
        say(f"encoder head: fresh random initialisation, seed {seed}")
    check_params(cfg, params)
    return cfg, params, components


def import_clip(path: str | os.PathLike, *, preset: str = "clip-vit-b-32", log=None
                ) -> tuple[CLIPConfig, dict[str, np.ndarray], dict[str, Any]]:
    """A CLIP state dict -> (config, {flax path: array}, components). `path`: an HF
    `CLIPModel` folder or its `model.safetensors`, or an open_clip / OpenAI state dict saved
    with `torch.save` (`.pth`, `.bin`). Half-precision weights are recorded as such (export
    restores them) and computed in float32."""
    say = log or (lambda message: None)
    resolved = resolve_weights_file(path)
    tensors = read_state_dict(resolved)
    source = Source("clip", resolved, tensors, detect_table("clip", resolved, tensors))
    say(f"read {resolved} ({len(tensors)} tensors): {source.table.name}")
    try:
        cfg = CLIPConfig.from_preset(preset)
    except ValueError as error:
        raise BridgeError(str(error)) from None
    params, problems = torch_to_flax(source, abstract_params(cfg))
    _raise_problems({resolved: problems}, f"converting to preset {cfg.preset!r}")
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    check_params(cfg, params)
    components = {"clip": {"source": str(resolved), "sha256": _sha256(resolved),
                           "table": source.table.name, **_dtype_record(tensors, source.table)}}
    return cfg, params, components


def _provenance() -> dict[str, Any]:
    """What an imported checkpoint records about how it was made."""
    return {"created_by": "bridge import", "lensjax_version": lensjax.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat()}


def import_clip_model(path: str | os.PathLike, *, preset: str = "clip-vit-b-32", log=None):
    """`import_clip` -> a ready `lensjax.clip.ClipModel`."""
    from lensjax.clip import ClipModel

    cfg, params, components = import_clip(path, preset=preset, log=log)
    return ClipModel(build_captioner(cfg, params),
                     {"components": components, "provenance": _provenance()})


def import_gpt2(path: str | os.PathLike, cfg: CaptionerConfig) -> dict[str, np.ndarray]:
    """The public pretrained GPT-2 (an HF `gpt2` folder or weights file) -> {path: array} of
    `cfg`'s `gpt2.wte/wpe/ln_f/h.*` parameters (the language model without cross-attention).
    """
    resolved = resolve_weights_file(path)
    tensors = read_state_dict(resolved)
    source = Source("gpt2", resolved, tensors, detect_table("gpt2", resolved, tensors))
    expected = {p: v for p, v in abstract_params(cfg).items()
                if p.startswith("gpt2.") and not p.startswith("gpt2.xattn.")}
    params, problems = torch_to_flax(source, expected)
    _raise_problems({resolved: problems}, f"reading GPT-2 for preset {cfg.preset!r}")
    return params


def import_model(**kwargs: Any) -> CaptionModel:
    """`import_params` -> a ready CaptionModel (same keyword arguments)."""
    cfg, params, components = import_params(**kwargs)
    metadata = {
        "components": components,
        "tokenizer": GPT2_TOKENIZER,
        "provenance": {**_provenance(), "phase": None},
    }
    return CaptionModel.from_params(cfg, params, metadata)


_HF_GPT2_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "activation_function": "gelu_new",
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "n_inner": None,
    "scale_attn_weights": True,
    "tie_word_embeddings": True,
}


def _hf_config(cfg: CaptionerConfig) -> dict[str, Any]:
    g = cfg.gpt2
    return {
        **_HF_GPT2_CONFIG,
        "vocab_size": g.vocab_size,
        "n_positions": g.n_positions,
        "n_ctx": g.n_positions,
        "n_embd": g.n_embd,
        "n_layer": g.n_layer,
        "n_head": g.n_head,
        "layer_norm_epsilon": g.eps,
        "attn_pdrop": g.attn_pdrop,
        "resid_pdrop": g.resid_pdrop,
        "embd_pdrop": g.embd_pdrop,
    }


def _hf_clip_config(cfg: CLIPConfig) -> dict[str, Any]:
    """config.json of an HF `CLIPModel` with `cfg`'s shapes (QuickGELU, eps 1e-5)."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width,
                        "intermediate_size": 4 * t.width, "num_hidden_layers": t.layers,
                        "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length,
                        "hidden_act": "quick_gelu", "layer_norm_eps": cfg.eps,
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        "vision_config": {"image_size": v.image_size, "patch_size": v.patch_size,
                          "hidden_size": v.width, "intermediate_size": 4 * v.width,
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                          "hidden_act": "quick_gelu", "layer_norm_eps": cfg.eps},
    }


def _restore_dtypes(
    tensors: StateDict, table: Table, record: Mapping[str, Any] | None, dtype: str | None
) -> StateDict:
    """Cast to `dtype` if given, else to the dtypes the component was imported with."""
    if dtype is None and record and "dtype" in record:
        dtype = record["dtype"]
    if dtype is not None:
        return {k: v.astype(dtype) for k, v in tensors.items()}
    per_key = (record or {}).get("dtypes", {})
    return {k: v.astype(per_key.get(table.normalise(k), v.dtype)) for k, v in tensors.items()}


def _export_keras(cfg: Any, params: Mapping[str, np.ndarray], metadata: Mapping[str, Any],
                  out: Path, say) -> dict[str, Path]:
    """A v1/v2 checkpoint -> `best_model.keras` and `vocab.txt` in `out` (replaced when
    complete); the InceptionV3 stays behind (the notebooks kept keras.applications' own)."""
    from bridge.keras_export import MODEL_FILE, VOCAB_FILE, write_keras
    from lensjax.data.word_vocab import WordVocabulary

    with _replacing(out) as tmp:
        write_keras(tmp / MODEL_FILE, cfg.family, cfg, params)
        WordVocabulary.from_metadata(metadata["tokenizer"]).write(tmp / VOCAB_FILE)
        say(f"wrote {MODEL_FILE} (the {cfg.family} notebook's model) and {VOCAB_FILE}"
            + ("; InceptionV3 not written (keras.applications' weights file is its source)"
               if cfg.encoder is not None else ""))
    return {"keras": out / MODEL_FILE, "vocab": out / VOCAB_FILE}


@contextlib.contextmanager
def _replacing(out: Path) -> Iterator[Path]:
    """A new sibling folder of `out` to write into: when the block completes it replaces `out`
    (a folder, or a link to one), otherwise it is removed and `out` stays as it was."""
    tmp = temporary_sibling(out)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.is_symlink():
            out.unlink()
        elif out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_files(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layout: str | None = None,
    dtype: str | None = None,
    force: bool = False,
    merge_lora: bool = False,
    log=None,
) -> dict[str, Path]:
    """Write a checkpoint as LensToWords' files -> {component: written path}.

    Files of a v3b model: best_perciever.pth, best_gpt2.pth, best_cross_attention.pth and a
    gpt2/ folder (config.json + model.safetensors, a complete GPT2LMHeadModel); of a v3a
    model: best_projection_head.pth and best_decoder.pth; of either, encoder_head.pth and
    encoder_convnext_tiny.pth when present; of a v1/v2 model: the notebook's
    best_model.keras and its vocab.txt (`bridge.keras_export`). `layout`, if given, must be
    the model's (v3b: notebook or src; v3a: v3a). `out` is checked by `check_out` before
    the checkpoint is read (and verified against its checksums); it is replaced only when
    complete. A LoRA-trained checkpoint needs `merge_lora`: the original's files have no place
    for adapters, so they are folded into the weights (W + alpha/rank * A @ B).
    """
    say = log or (lambda message: None)
    out = check_out(out, [checkpoint], force=force).absolute()
    if "lora" in read_metadata(checkpoint) and not merge_lora:
        raise BridgeError(f"{checkpoint} holds LoRA adapters, which the original's files have "
                          "no place for: pass --merge-lora to write the weights with the "
                          "adapters merged")
    params, metadata = load_checkpoint(checkpoint)
    cfg = config_from_metadata(metadata)
    if cfg.family in ("v1", "v2"):
        if layout is not None or dtype is not None:
            raise BridgeError(f"--layout and --dtype are for v3 models' .pth files; a "
                              f"{cfg.family} model is written as the notebook's float32 "
                              ".keras file")
        return _export_keras(cfg, params, metadata, out, say)
    own_layout = cfg.layout if cfg.family == "v3b" else cfg.family
    if layout is not None and layout != own_layout:
        raise BridgeError(
            f"this model is built in the {own_layout} layout; the {layout} layout is a "
            "different architecture, so its weights cannot be written in it"
        )
    records = metadata.get("components", {})
    written: dict[str, Path] = {}
    with _replacing(out) as tmp:
        for component, table in EXPORT_TABLES[own_layout].items():
            tensors = flax_to_torch(table, params)
            if not tensors:
                say(f"{component}: not in this checkpoint, skipped")
                continue
            tensors = _restore_dtypes(tensors, table, records.get(component), dtype)
            target = tmp / table.filename
            if component in ("gpt2", "clip"):  # an HF folder: safetensors + config.json
                target.parent.mkdir(exist_ok=True)
                write_safetensors(target, tensors)
                config = _hf_config(cfg) if component == "gpt2" else _hf_clip_config(cfg)
                (target.parent / "config.json").write_text(json.dumps(config, indent=2))
            else:
                write_torch_file(target, tensors)
            written[component] = out / table.filename
            say(f"wrote {table.filename} ({len(tensors)} tensors)")
    return written
