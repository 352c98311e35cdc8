"""Where a phase's initial weights come from: earlier phases' run folders, lensjax
checkpoints, or (through the bridge) an HF gpt2 folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.checkpoint import CheckpointError
from lensjax.phases import FRESH, INIT_GROUPS, PHASES, PRETRAINED_GPT2, Phase
from lensjax.train.messages import TrainError
from lensjax.train.run_folder import BEST, RUN_FILE


def _group_of(path: str) -> str:
    from lensjax.optim import label_of

    label = label_of(path)
    return next(group for group, labels in INIT_GROUPS.items() if label in labels)


class Checkpoints:
    """Checkpoints read once each: lensjax directories, or an HF gpt2 folder via the bridge."""

    def __init__(self) -> None:
        self._loaded: dict[Path, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}

    def lensjax(self, path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        from lensjax.checkpoint import load_checkpoint

        if path not in self._loaded:
            try:
                self._loaded[path] = load_checkpoint(path)
            except CheckpointError as error:
                raise TrainError(str(error)) from None
        return self._loaded[path]


def _is_lensjax_checkpoint(path: Path) -> bool:
    from lensjax.checkpoint import METADATA_FILE

    return (path / METADATA_FILE).is_file()


def resolve_sources(phase: Phase, init: Mapping[str, str], runs_dir: Path
                    ) -> dict[str, str | Path]:
    """{group: FRESH or a checkpoint path} for the phase's groups, plus `encoder` when
    `--init encoder=` names one."""
    unknown = set(init) - set(PHASES) - set(INIT_GROUPS)
    if unknown:
        raise TrainError(f"--init: unknown key(s) {sorted(unknown)}; use a phase name "
                         f"({', '.join(PHASES)}) or a component ({', '.join(INIT_GROUPS)})")
    sources: dict[str, str | Path] = {}
    for group in INIT_GROUPS:
        source = phase.init.get(group)
        if group in init:
            sources[group] = FRESH if init[group] == FRESH else Path(init[group])
        elif source is None:
            continue  # the encoder, unless named: inherited in model_config
        elif source == FRESH:
            sources[group] = FRESH
        elif source == PRETRAINED_GPT2:
            raise TrainError(
                f"phase {phase.name} starts GPT-2 from the public pretrained gpt2 weights: give "
                "them with --init gpt2=PATH (an HF gpt2 folder, or a lensjax checkpoint such "
                "as a bridged release), or --init gpt2=fresh for a random GPT-2")
        elif source in init:
            sources[group] = Path(init[source])
        else:
            default = runs_dir / source / BEST
            if not default.is_dir():
                raise TrainError(
                    f"phase {phase.name} starts its {group} from phase {source}'s output, "
                    f"but {default} does not exist: train phase {source} first (into "
                    f"--runs-dir {runs_dir}) or pass --init {source}=CHECKPOINT")
            sources[group] = default
    for group, source in sources.items():
        if source == FRESH:
            continue
        if not Path(source).exists():
            raise TrainError(f"--init: the {group} source {source} does not exist")
        if (Path(source) / RUN_FILE).is_file():  # a run folder: its best weights
            sources[group] = Path(source) / BEST
    return sources


def model_config(phase: Phase, sources: dict[str, str | Path], preset: str | None,
                 store: Checkpoints):
    """The run's model configuration: `preset`, else the first init checkpoint's, else the
    phase's preset (any family's); in the phase's mode (v3b); with the encoder of
    `sources["encoder"]`, which is filled in from the first checkpoint that has one when not
    named, and that checkpoint's image size (the side its encoder was trained at)."""
    from lensjax.models.families import config_from_metadata, family_of, preset_config

    checkpoints = [Path(s) for s in sources.values()
                   if s != FRESH and _is_lensjax_checkpoint(Path(s))]
    # The decoder's checkpoints say what the model is; an encoder source only lends its encoder.
    decoders = [Path(s) for g, s in sources.items() if g != "encoder" and Path(s) in checkpoints]
    if preset is not None:
        try:
            cfg = preset_config(preset)
        except ValueError as error:
            raise TrainError(str(error)) from None
    elif decoders:
        cfg = config_from_metadata(store.lensjax(decoders[0])[1])
    else:
        cfg = preset_config(phase.preset)
    family = family_of(cfg)
    foreign = sorted(set(phase.init) - set(family.init_groups))
    if foreign:
        raise TrainError(f"phase {phase.name} trains the {', '.join(foreign)} of a "
                         f"{family_of(preset_config(phase.preset)).name} model, but the run's "
                         f"model is {cfg.describe()}; pass a checkpoint or --preset of the "
                         "phase's family")
    if "encoder" not in sources:
        found = next((p for p in checkpoints if store.lensjax(p)[1]["config"].get("encoder")),
                     None)
        if found is not None:
            sources["encoder"] = found
    encoder_cfg = None
    if sources.get("encoder", FRESH) != FRESH:
        encoder_cfg = config_from_metadata(store.lensjax(Path(sources["encoder"]))[1])
        cfg = dataclasses.replace(cfg, image_size=encoder_cfg.image_size)
    elif "encoder" in sources:
        encoder_cfg = cfg if cfg.encoder else preset_config(phase.preset)
    if phase.mode is not None:
        cfg = dataclasses.replace(cfg, mode=phase.mode)
    image = {"encoder": encoder_cfg.encoder if encoder_cfg else None}
    if "head" in {f.name for f in dataclasses.fields(cfg)}:  # v1/v2's InceptionV3 has none
        image["head"] = encoder_cfg.head if encoder_cfg else None
    return dataclasses.replace(cfg, **image)


def initial_params(cfg, sources: Mapping[str, str | Path], seed: int, store: Checkpoints,
                   say) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> ({path: array} of every parameter of `cfg`, {group: where it came from})."""
    from lensjax.models.families import config_from_metadata
    from lensjax.params import abstract_params, flat_params, new_module

    expected = abstract_params(cfg)
    params: dict[str, np.ndarray] = {}
    provenance: dict[str, str] = {}
    fresh = None
    for group, source in sources.items():
        wanted = {p for p in expected if _group_of(p) == group}
        if source == FRESH:
            if fresh is None:
                fresh = {k: np.asarray(v) for k, v in
                         flat_params(new_module(cfg, seed)).items()}
            params.update({p: fresh[p] for p in wanted})
            provenance[group] = f"fresh (seed {seed})"
            continue
        source = Path(source)
        if _is_lensjax_checkpoint(source):
            found, metadata = store.lensjax(source)
            found = {p: v for p, v in found.items() if p in wanted}
            describe = f"{source} ({config_from_metadata(metadata).describe()})"
        elif group == "gpt2":
            found, describe = _pretrained_gpt2(source, cfg), f"{source} (pretrained GPT-2)"
        else:
            raise TrainError(f"--init: {source} is not a lensjax checkpoint (no lensjax.json)")
        problems = [f"missing {p}" for p in sorted(wanted - set(found))]
        problems += [f"{p}: shape {tuple(found[p].shape)}, this run needs "
                     f"{tuple(expected[p].shape)}" for p in sorted(wanted & set(found))
                     if tuple(found[p].shape) != tuple(expected[p].shape)]
        if problems:
            raise TrainError(
                f"the {group} weights in {describe} do not fit this run's model "
                f"({cfg.describe()}; {len(problems)} problems, first: "
                f"{'; '.join(problems[:4])}); pass a matching checkpoint or --preset")
        params.update(found)
        provenance[group] = str(source)
    say("initial weights: " + "; ".join(f"{g} <- {s}" for g, s in provenance.items()))
    return params, provenance


def _pretrained_gpt2(path: Path, cfg) -> dict[str, np.ndarray]:
    from bridge.convert import import_gpt2
    from bridge.io import BridgeError

    try:
        return import_gpt2(path, cfg)
    except (BridgeError, FileNotFoundError) as error:
        raise TrainError(f"--init gpt2={path}: {error}") from None


def resumed_config(latest: Path):
    """The model configuration saved in `latest`."""
    from lensjax.checkpoint import read_metadata
    from lensjax.models.families import config_from_metadata

    try:
        return config_from_metadata(read_metadata(latest))
    except CheckpointError as error:
        raise TrainError(f"cannot resume: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise TrainError(f"cannot resume: {latest} holds no valid model config ({error!r}); "
                         "pass --force to start the run over") from None
