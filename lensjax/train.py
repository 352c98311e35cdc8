"""python -m lensjax.train: LensToWords' phase curriculum, data-parallel over every device.

Each phase (see the table below) trains some components of the captioner on pre-extracted
image features (`python -m lensjax.extract`), from initial weights that earlier phases wrote.
A phase that trains the image encoder (`--lr encoder=...,encoder_head=...`) reads the images
themselves instead (--images): each is decoded and resized once, to the model's image size,
and kept in memory as uint8 for the whole run.
A run folder (--out, default RUNS_DIR/PHASE) holds:

  run.json        the phase's resolved settings, initial-weight sources, status
  metrics.jsonl   one JSON object per log line: step, train loss, samples/s, learning rates;
                  per epoch the validation loss; at the end the evaluation
  latest/         checkpoint every --save-every steps and at each epoch end, with the
                  optimizer state, RNG and data position (--resume continues from it)
  best/           the lowest-validation-loss weights: what the next phase starts from
  eval.json       end-of-phase sample captions and validation BLEU-4 (both protocols)
  loss.png        train and validation loss curves (--plot)

`latest/` and `best/` are lensjax checkpoints: `lensjax.load_pretrained(DIR)` loads them and
`python -m bridge export DIR --out ...` turns them into the original's PyTorch files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from lensjax.checkpoint import CheckpointError
from lensjax.cli import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_NON_FINITE,
    SEED_MAX,
    CliParser,
    describe_os_error,
    enable_compilation_cache,
)
from lensjax.phases import DATASETS, FRESH, INIT_GROUPS, PHASES, PRETRAINED_GPT2, Phase, phase_table

# Default data locations per data set: (caption sources, validation source, feature caches,
# image folder).
DEFAULT_DATA: Mapping[str, tuple[list[str], str | None, list[str], str | None]] = {
    "flickr30k": (["data/flickr30k/captions.txt"], None, ["features/flickr30k"],
                  "data/flickr30k/images"),
    "coco-50k": (["data/coco/annotations/captions_train2017.json"],
                 "data/coco/annotations/captions_val2017.json", ["features/coco"], None),
    "coco": (["data/coco/annotations/captions_train2017.json"],
             "data/coco/annotations/captions_val2017.json", ["features/coco"], None),
    "synthetic": (["demo_out/shapes/captions.txt"], None, ["demo_out/features"],
                  "demo_out/shapes/images"),
}
ENCODER_LABELS = frozenset({"encoder", "encoder_head"})
LATEST, BEST, RUN_FILE, METRICS_FILE, TRAIN_STATE = (
    "latest", "best", "run.json", "metrics.jsonl", "train_state")
# Settings a resumed run may change (extending a run); everything else must match.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "patience", "eval_images", "eval_method",
                               "plot"})
# Integer flags -> (lowest, highest or None) allowed; checked before any work starts.
INT_FLAGS: Mapping[str, tuple[int, int | None]] = MappingProxyType({
    "epochs": (1, None), "max_steps": (1, None), "patience": (1, None),
    "batch_size": (1, None), "max_len": (3, None), "subset": (1, None), "seed": (0, SEED_MAX),
    "log_every": (1, None), "save_every": (1, None), "val_batches": (1, None),
    "eval_images": (0, None), "num_processes": (1, None), "process_id": (0, None),
    "image_size": (32, 4096),
})
# Hidden write-then-rename siblings (lensjax.files.temporary_sibling): `.NAME.tmp-xxxxxxxx`
# is never complete; `.NAME.old-xxxxxxxx` is the previous NAME while it is being replaced.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-[0-9a-f]{8}$")

EPILOG = f"""\
phases (defaults; every one can be overridden by the flags above):
{phase_table()}

initial weights (--init KEY=SOURCE, comma-separated or repeated):
  a phase name      where that phase's output is: 2b=runs/2b (a run folder: its best/;
                    default RUNS_DIR/NAME/best), or any lensjax checkpoint, e.g. a bridged
                    release: 2d=weights/v3b
  gpt2=PATH         the pretrained GPT-2 for 2a/2c: an HF gpt2 folder (read through the
                    bridge, needs torch) or a lensjax checkpoint; also overrides where any
                    phase's GPT-2 comes from
  perceiver=, xattn=, encoder=PATH
                    take that component from PATH instead; SOURCE `fresh` re-initialises it.
                    Unless a phase trains it, the encoder is carried from the first
                    checkpoint that has one, so the result can caption image files

training the image encoder:
  --lr encoder=1e-4,encoder_head=1e-3 trains the ConvNeXt and its multi-scale head (0 freezes
  them, as every phase of the original does). Such a phase reads --images (a folder holding
  the captions' image files) instead of a feature cache: decoded once on every core, resized
  to --image-size (default: the model's, 224 for the original's), kept in memory as uint8
  (N x size x size x 3 bytes: 4,000 images at 64 px take 49 MB, Flickr30k at 224 px 4.7 GB).
  --remat also checkpoints the encoder stages. A later phase that freezes the encoder reads
  features again: extract them with the trained checkpoint (python -m lensjax.extract).

examples:
  python -m lensjax.train --phase 2a --init gpt2=weights/gpt2 --data data/flickr30k/captions.txt \\
      --features features/flickr30k
  python -m lensjax.train --phase 2c --notebook-lr       # 2c at the notebook's 1e-5
  python -m lensjax.train --phase 2d --lr perceiver=2e-5,gpt2=5e-6 --epochs 10
  python -m lensjax.train --phase 3a --init 2d=weights/v3b --batch-size 64 --plot
  python -m lensjax.train --phase 2d --resume            # continue a killed run
  python -m lensjax.train --phase 2d --lr encoder=1e-4,encoder_head=1e-3 \\
      --images data/flickr30k/images                     # fine-tune the encoder too

run.json's status: running, then done, failed (with the step and the reason) or
interrupted (with the step and the last saved step).

Ctrl-C stops the run at the next step (a checkpoint being written is finished first) and
says which step latest/ holds; the same command with --resume continues from there.

Compiled steps are kept in $LENSJAX_CACHE_DIR (default ~/.cache/lensjax/jax), so a resumed
or repeated run of the same model skips compiling.

exit status: 0 done, 2 bad input, 3 stopped on a non-finite loss, 130 interrupted (Ctrl-C).
"""


class TrainError(RuntimeError):
    """A problem with the command's input, explained for the user."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the command; the message says where the run stands."""


# --- settings --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """A phase's settings after the command-line overrides; stored in run.json."""

    phase: str
    mode: str
    learning_rates: dict[str, float]
    epochs: int
    patience: int
    batch_size: int
    max_len: int
    max_steps: int | None
    loss: str
    seed: int
    subset: int | None
    remat: bool | None  # None until `fit_model` picks the model's default
    dtype: str
    from_pixels: bool  # reads images (and encodes them in the step), not features
    image_size: int | None  # None until `fit_model` takes the model's
    log_every: int
    save_every: int
    val_batches: int | None
    eval_images: int
    eval_method: str
    plot: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_flags(args: argparse.Namespace) -> None:
    """Refuse an integer flag outside its range (`INT_FLAGS`), naming the flag and the range."""
    for name, (low, high) in INT_FLAGS.items():
        value = getattr(args, name)
        if value is None or (low <= value and (high is None or value <= high)):
            continue
        allowed = f"at least {low}" if high is None else f"between {low} and {high}"
        raise TrainError(f"--{name.replace('_', '-')} must be {allowed}, got {value}")
    if (args.process_id is not None and args.num_processes is not None
            and args.process_id >= args.num_processes):
        raise TrainError(f"--process-id must be below --num-processes ({args.num_processes}), "
                         f"got {args.process_id}")


def parse_assignments(text: str, what: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'}; ValueError naming the bad item."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise TrainError(f"{what}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def learning_rates(phase: Phase, notebook: bool, overrides: Sequence[str]) -> dict[str, float]:
    """The phase's learning rates (README's, or the notebook's with `notebook`), then the
    `--lr` overrides: `gpt2=` sets both GPT-2 labels (blocks and embeddings) unless `lm=` is
    also given; a rate of 0 freezes the component."""
    from lensjax.optim import LABELS

    rates = dict(phase.notebook_learning_rates if notebook and phase.notebook_learning_rates
                 else phase.learning_rates)
    given: dict[str, str] = {}
    for text in overrides:
        given.update(parse_assignments(text, "--lr"))
    if "gpt2" in given and "lm" not in given:
        given["lm"] = given["gpt2"]
    for label, value in given.items():
        if label not in LABELS:
            raise TrainError(f"--lr: unknown component {label!r}; components: "
                             f"{', '.join(LABELS)}")
        try:
            rate = float(value)
        except ValueError:
            raise TrainError(f"--lr: {label}={value!r} is not a number") from None
        if not math.isfinite(rate) or rate < 0:
            raise TrainError(f"--lr: {label}={value} must be a finite number >= 0")
        if rate == 0:
            rates.pop(label, None)
        else:
            rates[label] = rate
    if not rates:
        raise TrainError("no component trains: every learning rate is 0")
    return rates


def resolve_settings(args: argparse.Namespace, phase: Phase, devices: int) -> Settings:
    """The phase's defaults with the flags' overrides; the global batch must split evenly over
    `devices`. `remat` stays None unless given (see `fit_model`)."""
    def pick(value, default):
        return default if value is None else value

    rates = learning_rates(phase, args.notebook_lr, args.lr or [])
    settings = Settings(
        phase=phase.name,
        mode=phase.mode,
        learning_rates=rates,
        epochs=pick(args.epochs, phase.epochs),
        patience=pick(args.patience, phase.patience),
        batch_size=pick(args.batch_size, phase.batch_size),
        max_len=pick(args.max_len, phase.max_len),
        max_steps=pick(args.max_steps, phase.max_steps),
        loss=args.loss,
        seed=args.seed,
        subset=pick(args.subset, phase.subset),
        remat=args.remat,
        dtype=args.dtype,
        from_pixels=args.images is not None or bool(ENCODER_LABELS & set(rates)),
        image_size=args.image_size,
        log_every=args.log_every,
        save_every=args.save_every,
        val_batches=args.val_batches,
        eval_images=args.eval_images,
        eval_method=args.eval_method,
        plot=args.plot,
    )
    if settings.batch_size % devices:
        raise TrainError(f"--batch-size {settings.batch_size} must be divisible by the "
                         f"{devices} devices the batch is split over")
    return settings


def fit_model(settings: Settings, cfg) -> Settings:
    """`settings` for the model `cfg`: `--remat` defaults to on for full-size GPT-2s,
    `--max-len` must fit the model's positions (prepend mode also places the latents there;
    the end-of-phase captions take BOS + max_len - 1 new tokens), and a phase that reads
    images needs a model with an encoder; the image size is the model's."""
    if settings.image_size is not None and settings.image_size != cfg.image_size:
        raise TrainError(f"--image-size {settings.image_size}: the run's model takes "
                         f"{cfg.image_size}-pixel images")
    if settings.from_pixels and (cfg.encoder is None or cfg.head is None):
        raise TrainError("this phase reads images, but its model has no image encoder: give "
                         "one with --init encoder=CHECKPOINT (or encoder=fresh)")
    prefix = cfg.perceiver.num_latents if settings.mode == "prepend" else 0
    longest = cfg.gpt2.n_positions - prefix
    if settings.max_len > longest:
        raise TrainError(f"--max-len must be between 3 and {longest} for this model "
                         f"(n_positions {cfg.gpt2.n_positions}"
                         + (f", {prefix} latents prepended" if prefix else "")
                         + f"), got {settings.max_len}")
    remat = cfg.gpt2.n_layer >= 12 if settings.remat is None else settings.remat
    return dataclasses.replace(settings, remat=remat, image_size=cfg.image_size)


# --- data ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataPaths:
    """Where a run's captions and features (or images) are: the flags, else the phase's
    defaults. `images` is set exactly when the run reads pixels."""

    data: list[str]
    val_data: str | None
    features: list[str]
    images: str | None = None


def data_paths(args: argparse.Namespace, phase: Phase, from_pixels: bool) -> DataPaths:
    """The caption files and the feature caches (or, `from_pixels`, the image folder) `phase`
    reads, each checked to exist."""
    data, val_data, features, images = DEFAULT_DATA.get(phase.dataset, ([], None, [], None))
    paths = DataPaths(args.data or data, args.val_data or (None if args.data else val_data),
                      [] if from_pixels else args.features or features,
                      str(args.images or images) if from_pixels else None)
    # Captions given by --data need their images named too: the phase's default folder
    # belongs to its default captions.
    if from_pixels and (not paths.images or args.data and not args.images):
        raise TrainError("this phase trains the image encoder, so it reads images, not "
                         "features: give the folder that holds the captions' image files "
                         "with --images")
    if not paths.data or not (paths.features or paths.images):
        raise TrainError(f"phase {phase.name} trains on {DATASETS[phase.dataset]}: give the "
                         "caption source(s) with --data and the feature cache with --features")
    if paths.images is not None and not Path(paths.images).is_dir():
        raise TrainError(f"--images: {paths.images} "
                         + ("is a file, not a folder of images" if Path(paths.images).exists()
                            else "does not exist"))
    for flag, path in [*(("--data", p) for p in paths.data),
                       *([("--val-data", paths.val_data)] if paths.val_data else [])]:
        if not Path(path).is_file():
            raise TrainError(f"{flag}: caption source {path} "
                             + ("is a folder; give a caption file" if Path(path).is_dir()
                                else "does not exist"))
    for folder in paths.features:
        if not Path(folder).is_dir():
            raise TrainError(f"--features: feature cache {folder} "
                             + ("is a file, not a cache folder" if Path(folder).exists() else
                                "does not exist; make it with `python -m lensjax.extract "
                                f"IMAGES --weights W --out {folder}`"))
    return paths


@dataclasses.dataclass
class Data:
    """Training and validation captions ({image key: [captions]}) and their inputs: a
    FeatureCache, or an ImageCache for a phase that reads pixels (`from_pixels`)."""

    train: dict[str, list[str]]
    val: dict[str, list[str]]
    cache: Any  # lensjax.data.cache.FeatureCache | lensjax.data.image_cache.ImageCache
    sources: list[str]
    from_pixels: bool = False

    @property
    def missing(self) -> str:
        """What an image without inputs lacks, for messages."""
        return ("no readable image file in --images" if self.from_pixels
                else "no features in the cache")


def _captions(paths: Sequence[str]) -> dict[str, list[str]]:
    from lensjax.data.captions import caption_source

    merged: dict[str, list[str]] = {}
    for path in paths:
        for key, caps in caption_source(path).captions.items():
            merged.setdefault(key, []).extend(caps)
    return merged


def _feature_cache(folders: Sequence[str]):
    from lensjax.data.cache import SHARD_PREFIX, FeatureCache

    if len(folders) == 1:
        return FeatureCache(folders[0])
    return FeatureCache([s for f in folders for s in sorted(Path(f).glob(SHARD_PREFIX + "*"))])


def load_data(paths: DataPaths, settings: Settings) -> Data:
    """Captions and features (or decoded images), split as LensToWords split them."""
    from lensjax.data.captions import coco_subset, seed_split

    captions = _captions(paths.data)
    if paths.val_data is not None:
        train, val = captions, _captions([paths.val_data])
    else:
        train_keys, val_keys = seed_split(list(captions), seed=42, train_frac=0.9)
        train = {k: captions[k] for k in train_keys}
        val = {k: captions[k] for k in val_keys}
    if settings.subset is not None and settings.subset < len(train):
        train = {k: train[k] for k in coco_subset(list(train), settings.subset,
                                                    seed=settings.seed)}
    sources = [*paths.data, *([paths.val_data] if paths.val_data else [])]
    if paths.images is None:
        return Data(train, val, _feature_cache(paths.features), sources)
    from lensjax.data.image_cache import ImageCache

    cache = ImageCache(paths.images, [*train, *val], settings.image_size)
    for problem in cache.problems[:3]:
        _say(f"skipped: {problem}")
    _say(f"{len(cache)} images decoded and kept in memory: {cache.nbytes / 2**20:.0f} MB")
    return Data(train, val, cache, [*sources, paths.images], from_pixels=True)


def usable(captions: Mapping[str, list[str]], data: Data, strict: bool, what: str, say
           ) -> list[tuple[str, str]]:
    """(key, caption) pairs with inputs; missing images are counted and skipped (or an error
    with `strict`)."""
    from lensjax.data.batching import available_pairs

    pairs, missing = available_pairs(captions, data.cache)
    if missing and strict:
        raise TrainError(f"{what}: {len(missing)} of {len(captions)} images have "
                         f"{data.missing} (first: {', '.join(missing[:5])}) (--strict)")
    if missing:
        say(f"{what}: {len(missing)} of {len(captions)} images have {data.missing} and are "
            f"skipped (first: {', '.join(missing[:3])}); --strict makes this an error")
    if not pairs:
        raise TrainError(f"{what}: no image has inputs ({data.missing} for any)")
    return pairs


# --- initial weights -------------------------------------------------------------------------


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
    phase's preset; in the phase's mode; with the encoder of `sources["encoder"]`, which is
    filled in from the first checkpoint that has one when not named."""
    from lensjax.models.captioner import PRESETS, CaptionerConfig

    checkpoints = [Path(s) for s in sources.values()
                   if s != FRESH and _is_lensjax_checkpoint(Path(s))]
    if preset is not None:
        if preset not in PRESETS:
            raise TrainError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
        cfg = CaptionerConfig.from_preset(preset)
    elif checkpoints:
        cfg = CaptionerConfig.from_dict(store.lensjax(checkpoints[0])[1]["config"])
    else:
        cfg = CaptionerConfig.from_preset(phase.preset)
    if "encoder" not in sources:
        found = next((p for p in checkpoints if store.lensjax(p)[1]["config"].get("encoder")),
                     None)
        if found is not None:
            sources["encoder"] = found
    encoder_cfg = None
    if sources.get("encoder", FRESH) != FRESH:
        encoder_cfg = CaptionerConfig.from_dict(
            store.lensjax(Path(sources["encoder"]))[1]["config"])
    elif "encoder" in sources:
        encoder_cfg = cfg if cfg.encoder else CaptionerConfig.from_preset(phase.preset)
    return dataclasses.replace(cfg, mode=phase.mode,
                               encoder=encoder_cfg.encoder if encoder_cfg else None,
                               head=encoder_cfg.head if encoder_cfg else None)


def initial_params(cfg, sources: Mapping[str, str | Path], seed: int, store: Checkpoints,
                   say) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """-> ({path: array} of every parameter of `cfg`, {group: where it came from})."""
    from flax import nnx

    from lensjax.models.captioner import Captioner
    from lensjax.params import abstract_params, flat_params

    expected = abstract_params(cfg)
    params: dict[str, np.ndarray] = {}
    provenance: dict[str, str] = {}
    fresh = None
    for group, source in sources.items():
        wanted = {p for p in expected if _group_of(p) == group}
        if source == FRESH:
            if fresh is None:
                fresh = {k: np.asarray(v) for k, v in
                         flat_params(Captioner(cfg, rngs=nnx.Rngs(seed))).items()}
            params.update({p: fresh[p] for p in wanted})
            provenance[group] = f"fresh (seed {seed})"
            continue
        source = Path(source)
        if _is_lensjax_checkpoint(source):
            found, metadata = store.lensjax(source)
            found = {p: v for p, v in found.items() if p in wanted}
            describe = (f"{source} (preset {metadata['config'].get('preset')!r}, layout "
                        f"{metadata['config']['perceiver']['layout']!r})")
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
                f"the {group} weights in {describe} do not fit this run's model (preset "
                f"{cfg.preset!r}, layout {cfg.layout!r}; {len(problems)} problems, first: "
                f"{'; '.join(problems[:4])}); pass a matching checkpoint or --preset")
        params.update(found)
        provenance[group] = str(source)
    say("initial weights: " + "; ".join(f"{g} <- {s}" for g, s in provenance.items()))
    return params, provenance


def _pretrained_gpt2(path: Path, cfg) -> dict[str, np.ndarray]:
    try:
        from bridge.convert import import_gpt2
    except ImportError as error:
        raise TrainError(f"reading the HF gpt2 weights in {path} needs the bridge (torch): "
                         f"pip install 'lensjax[bridge]' ({error})") from None
    from bridge.io import BridgeError

    try:
        return import_gpt2(path, cfg)
    except (BridgeError, FileNotFoundError) as error:
        raise TrainError(f"--init gpt2={path}: {error}") from None


# --- the run folder --------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    """Where a run is; saved with every `latest` checkpoint."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    stopped_early: bool = False


@dataclasses.dataclass(frozen=True)
class Resumed:
    """What latest/ holds for --resume: weights, optimizer state, RNG key and progress."""

    params: dict[str, np.ndarray]
    opt_leaves: list[np.ndarray]
    key: np.ndarray
    progress: Progress


def read_latest(latest: Path) -> Resumed:
    """Read `latest` for --resume; TrainError when it is damaged or not a training checkpoint."""
    from lensjax.checkpoint import load_checkpoint, load_extra

    try:
        params, metadata = load_checkpoint(latest)
        saved = load_extra(latest, TRAIN_STATE)
        progress = Progress(**metadata["training"])
        leaves = [saved[f"opt_{i}"] for i in range(len(saved) - 1)]
        return Resumed(params, leaves, saved["key"], progress)
    except CheckpointError as error:
        raise TrainError(f"cannot resume: {error}; pass --force to start the run over"
                         ) from None
    except (KeyError, TypeError) as error:
        raise TrainError(f"cannot resume: {latest} is not a complete training checkpoint "
                         f"(missing {error}); pass --force to start the run over") from None


@dataclasses.dataclass(frozen=True)
class Start:
    """How a run starts in its folder: from latest/ (`resume`) or from the beginning, and
    whether an earlier run is cleared first (`clear`)."""

    resume: bool
    clear: bool


class RunFolder:
    """run.json, metrics.jsonl and the checkpoints of one run."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def read_run(self) -> dict[str, Any] | None:
        """run.json, or None when there is none; TrainError when it is damaged."""
        if not self.run_file.is_file():
            return None
        try:
            document = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TrainError(f"{self.run_file} is damaged ({error}); pass --force to start "
                             "the run over") from None
        if not isinstance(document, dict) or not isinstance(document.get("settings"), dict):
            raise TrainError(f"{self.run_file} holds no run settings; pass --force to start "
                             "the run over")
        return document

    def write_run(self, document: Mapping[str, Any]) -> None:
        from lensjax.files import write_text_atomic

        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_file, json.dumps(document, indent=2, sort_keys=True))

    def log(self, record: Mapping[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records; TrainError naming the line of a damaged one."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise TrainError(f"{path}:{number}: not a JSON record ({error.msg}); remove the "
                                 "line to resume, or pass --force to start over") from None
        return records

    def rewind_metrics(self, step: int) -> None:
        """Drop log lines after `step`: a resumed run logs them again."""
        from lensjax.files import write_text_atomic

        kept = [r for r in self.records() if r.get("step", 0) <= step and "event" not in r]
        write_text_atomic(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    def prepare(self, settings: Settings, resume: bool, force: bool, say) -> Start:
        """Check the folder against the flags; -> how the run starts. Nothing is changed here:
        `begin` does that once every input has been checked."""
        existing = self.read_run()
        if existing is None:
            if self.path.exists() and any(self.path.iterdir()) and not force:
                raise TrainError(f"{self.path} is not empty and holds no lensjax run; choose "
                                 "another --out or pass --force to clear it")
            return Start(resume=False, clear=force and self.path.exists())
        if force:
            say(f"--force: clearing the earlier run in {self.path}")
            return Start(resume=False, clear=True)
        if not resume:
            raise TrainError(f"{self.path} already holds a run of phase "
                             f"{existing['settings'].get('phase')}: pass --resume to continue "
                             "it or --force to start over")
        changed = {k: (v, settings.to_dict().get(k)) for k, v in existing["settings"].items()
                   if settings.to_dict().get(k) != v and k not in RESUMABLE_CHANGES}
        if changed:
            raise TrainError(f"{self.path} holds a run with different settings; --resume needs "
                             "the same ones: " + "; ".join(
                                 f"{k}: {old!r} there, {new!r} now"
                                 for k, (old, new) in changed.items()))
        self.records()  # a damaged metrics.jsonl is refused before anything changes
        if not (self.path / LATEST).is_dir():
            say(f"{self.path} has no checkpoint yet: starting the phase from the beginning")
            return Start(resume=False, clear=False)
        return Start(resume=True, clear=False)

    def begin(self, start: Start, say) -> None:
        """Clear the folder (`start.clear`), or remove what interrupted writes left in it."""
        if start.clear:
            shutil.rmtree(self.path)
        elif self.path.is_dir():
            self.remove_temporaries(say)

    def remove_temporaries(self, say) -> None:
        """Remove the unfinished writes of a killed or interrupted run: every `.NAME.tmp-*`,
        and `.NAME.old-*` once NAME exists (the write that replaced it finished)."""
        removed = []
        for path in sorted(self.path.iterdir()):
            match = _TEMPORARY.match(path.name)
            if match is None or (match["tag"] == "old"
                                 and not (self.path / match["name"]).exists()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
        if removed:
            say(f"removed the unfinished writes of an earlier run: {', '.join(removed)}")


# --- training --------------------------------------------------------------------------------


def _say(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


class InterruptGuard:
    """Ctrl-C (SIGINT) during a run. Outside `held()` it raises KeyboardInterrupt at once, as
    Python does; inside, it is only recorded and raised by `check()` (after each step) or at
    the block's end. So a checkpoint being written is finished first, and the interrupt never
    lands in a library callback, where Python would print a traceback and drop it."""

    def __init__(self) -> None:
        self.requested = False
        self._holding = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT within the block (main thread only: elsewhere Python's stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if not self._holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Record Ctrl-C instead of raising it within the block; raise it at the end."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        self.check()

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt

    def absorb(self) -> None:
        """From now on only record Ctrl-C: the run is stopping and records where it stands."""
        self._holding += 1


class PhaseRun:
    """One phase run: the loop, checkpoints, metrics and the end-of-phase evaluation.
    `progress` is where the loop is; `saved_step` the step latest/ holds (None: no
    checkpoint yet)."""

    def __init__(self, args: argparse.Namespace, phase: Phase, settings: Settings, cfg,
                 params: dict[str, np.ndarray] | Resumed, provenance: dict[str, str],
                 data: Data, folder: RunFolder, interrupts: InterruptGuard):
        import jax

        from lensjax.data.batching import CaptionBatches
        from lensjax.data.tokenizer import GPT2Tokenizer
        from lensjax.training import Trainer

        self.args, self.phase, self.settings, self.cfg = args, phase, settings, cfg
        self.provenance, self.data, self.folder = provenance, data, folder
        self.interrupts = interrupts
        self.progress, self.saved_step = Progress(), None
        self.main = jax.process_index() == 0
        devices = jax.device_count()
        tokenizer = GPT2Tokenizer()
        process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        train_pairs = usable(data.train, data, args.strict, "training set", _say)
        val_pairs = usable(data.val, data, args.strict, "validation set", _say)
        if len(train_pairs) < settings.batch_size:
            raise TrainError(f"{len(train_pairs)} training pairs cannot fill one batch of "
                             f"{settings.batch_size}; lower --batch-size")
        val_batch = min(settings.batch_size, len(val_pairs) // devices * devices)
        if val_batch == 0:
            raise TrainError(f"{len(val_pairs)} validation pairs are fewer than the "
                             f"{devices} devices")
        self.batches = CaptionBatches(train_pairs, data.cache, tokenizer,
                                      batch_size=settings.batch_size, max_len=settings.max_len,
                                      seed=settings.seed, **process)
        self.val_batches = CaptionBatches(val_pairs, data.cache, tokenizer, batch_size=val_batch,
                                          max_len=settings.max_len, seed=0, **process)
        self.trainer = Trainer(cfg, settings.learning_rates, loss=settings.loss,
                               remat=settings.remat, dtype=settings.dtype,
                               from_pixels=settings.from_pixels)
        self.resumed = params if isinstance(params, Resumed) else None
        self.params = {} if self.resumed else params

    # -- checkpoints

    def _metadata(self, progress: Progress | None) -> dict[str, Any]:
        from lensjax.checkpoint import GPT2_TOKENIZER

        meta: dict[str, Any] = {
            "config": self.cfg.to_dict(),
            "tokenizer": GPT2_TOKENIZER,
            "provenance": {"created_by": "lensjax.train", "phase": self.phase.name,
                           "init": self.provenance, "data": self.data.sources,
                           "settings": self.settings.to_dict()},
        }
        if progress is not None:
            meta["training"] = dataclasses.asdict(progress)
        return meta

    def save(self, name: str, state, progress: Progress | None) -> None:
        """Write checkpoint `name` whole: Ctrl-C meanwhile waits for the write to finish."""
        from lensjax.checkpoint import save_checkpoint

        extra = None
        if progress is not None and self.main:
            leaves, key, _ = self.trainer.host_state(state)
            extra = {TRAIN_STATE: {"key": key, **{f"opt_{i}": x for i, x in enumerate(leaves)}}}
        with self.interrupts.held():
            if self.main:
                save_checkpoint(self.folder.path / name, self.trainer.params(state),
                                self._metadata(progress), overwrite=True, extra=extra)
            if progress is not None:
                self.saved_step = progress.step

    def restore(self):
        """The training state and progress of `self.resumed` (latest/, read by `read_latest`)."""
        resumed, self.resumed = self.resumed, None
        progress = resumed.progress
        state = self.trainer.restore(resumed.params, resumed.opt_leaves, resumed.key,
                                     progress.step)
        self.saved_step = progress.step
        if self.main:
            self.folder.rewind_metrics(progress.step)
        _say(f"resuming {self.folder.path} at epoch {progress.epoch + 1}, batch "
             f"{progress.batch}, step {progress.step}")
        return state, progress

    # -- the loop

    def run(self, resume: bool) -> Progress:
        """Train until the epochs, --max-steps or the patience run out; Ctrl-C raises
        KeyboardInterrupt after the step it arrives in."""
        with self.interrupts.held():
            return self._loop(resume)

    def _loop(self, resume: bool) -> Progress:
        from tqdm import tqdm

        from lensjax.training import Batch

        settings = self.settings
        if resume:
            state, self.progress = self.restore()
        else:
            state = self.trainer.init(self.params, settings.seed)
            self.params = {}  # the state holds them now
        progress = self.progress
        per_epoch = len(self.batches)
        lrs = settings.learning_rates
        window: list[float] = []
        window_start = time.perf_counter()

        def flush(epoch: int) -> None:
            nonlocal window, window_start
            if window and self.main:
                elapsed = time.perf_counter() - window_start
                self.folder.log({"step": progress.step, "epoch": epoch + 1,
                                 "train_loss": float(np.mean(window)), "lr": lrs,
                                 "samples_per_s": len(window) * settings.batch_size / elapsed})
            window, window_start = [], time.perf_counter()

        max_steps = settings.max_steps or math.inf

        while (progress.epoch < settings.epochs and not progress.stopped_early
               and progress.step < max_steps):
            epoch = progress.epoch
            last = min(per_epoch, progress.batch + max_steps - progress.step)  # batches to run
            bar = tqdm(total=last, initial=progress.batch, unit="step", dynamic_ncols=True,
                       mininterval=0.1 if sys.stderr.isatty() else 30,  # logs: a line per 30 s
                       desc=f"{self.phase.name} epoch {epoch + 1}/{settings.epochs}",
                       disable=not self.main or self.args.quiet)
            for index, b in enumerate(self.batches.epoch(epoch, progress.batch),
                                      progress.batch):
                state, metrics = self.trainer.step(
                    state, Batch(b.features, b.inputs, b.targets, b.lengths))
                loss = metrics["loss"]
                if not math.isfinite(loss):
                    bar.close()
                    raise NonFiniteLoss(
                        f"the training loss became {loss} at step {progress.step + 1} (epoch "
                        f"{epoch + 1}, batch {index + 1}); {self.last_good()}. Lower the "
                        "learning rate (--lr) and --resume, or check the input features")
                progress.step, progress.batch = progress.step + 1, index + 1
                window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if progress.step % settings.log_every == 0:
                    rate = len(window) * settings.batch_size / (time.perf_counter()
                                                                - window_start)
                    bar.set_postfix(loss=f"{np.mean(window):.4f}", samples_s=f"{rate:.1f}")
                    flush(epoch)
                self.interrupts.check()
                if index + 1 == last:  # the epoch's end, or --max-steps
                    break
                if progress.step % settings.save_every == 0:
                    flush(epoch)
                    self.save(LATEST, state, progress)
            bar.close()
            flush(epoch)
            val = self.validate(state)
            if not math.isfinite(val):
                raise NonFiniteLoss(f"the validation loss is {val} after epoch {epoch + 1} "
                                    f"(step {progress.step}); {self.last_good()}")
            improved = val < progress.best_val
            progress.epoch, progress.batch = epoch + 1, 0
            progress.best_val = min(val, progress.best_val)
            progress.bad_epochs = 0 if improved else progress.bad_epochs + 1
            progress.stopped_early = (progress.bad_epochs >= settings.patience
                                      and progress.epoch < settings.epochs)
            if self.main:
                self.folder.log({"step": progress.step, "epoch": epoch + 1, "val_loss": val,
                                 "best": improved})
            _say(f"epoch {epoch + 1}: validation loss {val:.4f}"
                 + (" (best so far: saved best/)" if improved else
                    f" (best {progress.best_val:.4f}; {progress.bad_epochs} of "
                    f"{settings.patience} epochs without improvement)"))
            if improved:
                self.save(BEST, state, None)
            self.save(LATEST, state, progress)
            if progress.stopped_early:
                _say(f"early stop: no improvement for {settings.patience} epochs")
        return progress

    def last_good(self) -> str:
        """Which step latest/ holds, for messages."""
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return (f"nothing after step {self.saved_step} was saved: {self.folder.path / LATEST} "
                "is the last good checkpoint")

    def validate(self, state) -> float:
        from lensjax.training import Batch

        count = len(self.val_batches)
        if self.settings.val_batches is not None:
            count = min(count, self.settings.val_batches)
        losses = []
        for index in range(count):
            b = self.val_batches.batch(0, index)
            losses.append(self.trainer.eval_loss(state, Batch(b.features, b.inputs, b.targets,
                                                              b.lengths)))
            self.interrupts.check()
        return float(np.mean(losses))

    # -- end of phase

    def evaluate(self) -> dict[str, Any]:
        """Caption validation images with the best weights; both BLEU-4 protocols."""
        from lensjax.api import load_pretrained
        from lensjax.evaluate import EvaluationError, corpus_bleu4, seed_bleu4

        model = load_pretrained(self.folder.path / BEST)
        keys = [k for k in self.data.val if k in self.data.cache][: self.settings.eval_images]
        features = self.data.cache.get_batch(keys).astype(np.float32)
        if self.data.from_pixels:
            features = model.encode_padded(features)
        tokens = model.generate(features, self.settings.eval_method,
                                max_new_tokens=self.settings.max_len - 1,
                                seed=self.settings.seed)
        predictions = {k: model.tokenizer.decode_caption(t) for k, t in zip(keys, tokens,
                                                                            strict=True)}
        references = {k: self.data.val[k] for k in keys}
        report: dict[str, Any] = {"images": len(keys), "method": self.settings.eval_method,
                                  "lenstowords_bleu4": seed_bleu4(predictions, references)}
        try:
            report["corpus_bleu4"], report["corpus_tokenizer"] = corpus_bleu4(predictions,
                                                                              references)
        except EvaluationError as error:
            _say(f"corpus BLEU-4 skipped: {error}")
        report["samples"] = [{"image": k, "caption": predictions[k],
                              "references": references[k][:2]} for k in keys[:5]]
        return report


def plot_losses(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Train (per log line) and validation (per epoch) loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from lensjax.files import temporary_sibling

    tmp = temporary_sibling(path)
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


# --- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="python -m lensjax.train", description=__doc__, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", required=True, choices=list(PHASES), metavar="PHASE",
                        help=f"one of: {', '.join(PHASES)}")
    where = parser.add_argument_group("data and weights")
    where.add_argument("--data", nargs="+", metavar="SOURCE",
                       help="caption source(s): Flickr30k captions.txt, COCO/Karpathy JSON, "
                       "Instagram CSV; several are concatenated (default: per phase, "
                       "e.g. data/flickr30k/captions.txt)")
    where.add_argument("--val-data", metavar="SOURCE",
                       help="validation captions (default: LensToWords' 90/10 split of --data, "
                       "random.seed(42); COCO phases: captions_val2017.json)")
    where.add_argument("--features", nargs="+", metavar="CACHE",
                       help="feature cache folder(s) from python -m lensjax.extract")
    where.add_argument("--images", type=Path, metavar="DIR",
                       help="read the image files in DIR (named as in the captions) instead "
                       "of features: needed when the encoder trains (see below)")
    where.add_argument("--image-size", type=int, metavar="PX",
                       help="side the images are resized to, 32 to 4096 (default: the "
                       "model's, 224 for the original's); stored in the checkpoint's config")
    where.add_argument("--init", action="append", metavar="KEY=SOURCE",
                       help="initial weights (see below)")
    where.add_argument("--runs-dir", type=Path, default=Path("runs"),
                       help="where phases write and find each other's outputs (default: runs)")
    where.add_argument("--out", type=Path, help="run folder (default: RUNS_DIR/PHASE)")
    where.add_argument("--preset", help="model preset for fresh weights (default: the "
                       "init checkpoint's config, else the phase's: v3b, demo for demo-*)")
    hyper = parser.add_argument_group("overrides of the phase's defaults")
    hyper.add_argument("--lr", action="append", metavar="COMPONENT=RATE,...",
                       help="learning rates: encoder, encoder_head (these read --images), "
                       "perceiver, gpt2 (blocks and embeddings; `lm` alone for wte/wpe/ln_f), "
                       "xattn; 0 freezes a component")
    hyper.add_argument("--notebook-lr", action="store_true",
                       help="2a/2c: the notebooks' learning rate (1e-5) instead of the README's")
    hyper.add_argument("--epochs", type=int, help="at most N >= 1 epochs (default: per phase)")
    hyper.add_argument("--max-steps", type=int,
                       help="end the phase after N >= 1 steps (validating and saving as at "
                       "an epoch end)")
    hyper.add_argument("--patience", type=int,
                       help="N >= 1 epochs without validation improvement before stopping")
    hyper.add_argument("--batch-size", type=int,
                       help="global batch, split over all devices (a multiple of their number)")
    hyper.add_argument("--max-len", type=int,
                       help="token sequence length, 3 to what the model's positions hold "
                       "(LensToWords: 64)")
    hyper.add_argument("--subset", type=int, help="train on a seeded subset of N >= 1 images")
    hyper.add_argument("--loss", choices=("eos", "seed"), default="eos",
                       help="eos (default): also learn the end-of-caption token; seed: "
                       "LensToWords' loss, which ignores every 50256 target")
    hyper.add_argument("--seed", type=int, default=0,
                       help=f"data order, dropout, fresh weights: 0 to {SEED_MAX} (default: 0)")
    running = parser.add_argument_group("running")
    start = running.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in --out from latest/ (removing what an "
                       "interrupted write left there)")
    start.add_argument("--force", action="store_true", help="clear --out and start over")
    running.add_argument("--strict", action="store_true",
                     help="images without features (or, with --images, without a readable "
                     "file) are an error, not skipped")
    running.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute dtype (default: float32); bfloat16 is mixed precision "
                     "for GPUs/TPUs (parameters and optimizer state stay float32)")
    running.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                     help="gradient checkpointing of the GPT-2 blocks and, when it trains, "
                     "the encoder's stages (default: on for full-size presets)")
    running.add_argument("--log-every", type=int, default=50,
                         help="steps per metrics.jsonl line, >= 1 (default: 50)")
    running.add_argument("--save-every", type=int, default=500,
                     help="steps between latest/ checkpoints, >= 1; also saved at every "
                         "epoch end (default: 500)")
    running.add_argument("--val-batches", type=int,
                         help="validate on at most N >= 1 batches (default: all)")
    running.add_argument("--eval-images", type=int, default=500,
                     help="validation images captioned at the end of the phase (default: "
                         "500; 0: none)")
    running.add_argument("--eval-method", choices=("greedy", "topk", "beam"), default="topk",
                         help="decoding for the end-of-phase captions (default: topk, as "
                         "LensToWords evaluated)")
    running.add_argument("--plot", action="store_true", help="write loss.png")
    running.add_argument("--distributed", action="store_true",
                     help="multi-host: call jax.distributed.initialize() first (on TPU pods "
                     "and SLURM it finds its settings itself; else give the next three)")
    running.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    running.add_argument("--num-processes", type=int)
    running.add_argument("--process-id", type=int)
    running.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The whole phase; -> the final run.json document. `argv` is recorded in run.json.

    Flags and --out are checked before any work starts. Raises TrainError (bad input),
    NonFiniteLoss, Interrupted (Ctrl-C; the message says where the run stands).
    """
    from lensjax.files import OutputError, check_output

    check_flags(args)
    out = args.out or args.runs_dir / args.phase
    try:
        check_output(out, directory=True)
    except OutputError as error:
        raise TrainError(f"--out: {error}") from None
    try:  # a resumed phase, or the next one of the same model, skips compiling its step
        enable_compilation_cache()
    except OSError as error:
        _say(f"note: compiled programs are not kept between runs ({describe_os_error(error)})")
    interrupts = InterruptGuard()
    with interrupts.installed():
        try:
            trainer_run, start = prepare_run(args, RunFolder(out), interrupts)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted (Ctrl-C) before training started; {out} was not "
                              "changed") from None
        return train_phase(trainer_run, start, argv)


def prepare_run(args: argparse.Namespace, folder: RunFolder, interrupts: InterruptGuard
                ) -> tuple[PhaseRun, Start]:
    """Everything before the first step: settings, data, model and initial weights, each
    checked; nothing is written yet."""
    import jax

    if args.distributed:
        # CPU-only clusters need a collectives backend for cross-process all-reduces.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    phase = PHASES[args.phase]
    settings = resolve_settings(args, phase, jax.device_count())
    paths = data_paths(args, phase, settings.from_pixels)
    init: dict[str, str] = {}
    for text in args.init or []:
        init.update(parse_assignments(text, "--init"))
    store = Checkpoints()
    latest = folder.path / LATEST
    if args.resume and latest.is_dir():  # the model and its weights come from latest/
        cfg, sources = _resumed_config(latest), {}
    else:
        sources = resolve_sources(phase, init, args.runs_dir)
        cfg = model_config(phase, sources, args.preset, store)
        if settings.image_size is not None:
            cfg = dataclasses.replace(cfg, image_size=settings.image_size)
    settings = fit_model(settings, cfg)
    if jax.process_index() == 0:
        start = folder.prepare(settings, args.resume, args.force, _say)
    else:  # process 0 checks and clears the folder; the others only read it
        start = Start(resume=args.resume and latest.is_dir(), clear=False)
    data = load_data(paths, settings)
    params: dict[str, np.ndarray] | Resumed
    if start.resume:  # the weights come from latest/
        params, provenance = read_latest(latest), (folder.read_run() or {}).get("init", {})
    else:
        params, provenance = initial_params(cfg, sources, args.seed, store, _say)
    trainer_run = PhaseRun(args, phase, settings, cfg, params, provenance, data, folder,
                           interrupts)
    return trainer_run, start


def _resumed_config(latest: Path):
    """The model configuration saved in `latest`."""
    from lensjax.checkpoint import read_metadata
    from lensjax.models.captioner import CaptionerConfig

    try:
        return CaptionerConfig.from_dict(read_metadata(latest)["config"])
    except CheckpointError as error:
        raise TrainError(f"cannot resume: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise TrainError(f"cannot resume: {latest} holds no valid model config ({error!r}); "
                         "pass --force to start the run over") from None


def train_phase(trainer_run: PhaseRun, start: Start, argv: Sequence[str] | None
                ) -> dict[str, Any]:
    """Write run.json, train, evaluate; run.json ends `done`, `failed` or `interrupted`."""
    import jax

    folder, settings, phase = trainer_run.folder, trainer_run.settings, trainer_run.phase
    document: dict[str, Any] = {
        "phase": phase.name, "summary": phase.summary, "settings": settings.to_dict(),
        "init": trainer_run.provenance, "data": trainer_run.data.sources, "status": "running",
        "command": ["python", "-m", "lensjax.train", *(argv or [])],
        "devices": jax.device_count(), "processes": jax.process_count(),
    }
    trained = False
    try:
        with trainer_run.interrupts.held():  # the folder is cleared or tidied whole
            if trainer_run.main:
                folder.begin(start, _say)
                folder.write_run(document)
        _say(f"phase {phase.name} ({phase.summary}): {len(trainer_run.batches)} steps per "
             f"epoch of {settings.batch_size} on {jax.device_count()} device(s); training "
             + ", ".join(f"{k} at {v:g}" for k, v in settings.learning_rates.items()))
        progress = trainer_run.run(start.resume)
        trained = True
        document.update(status="done", step=progress.step, stopped_early=progress.stopped_early,
                        best_val_loss=progress.best_val)
        if trainer_run.main:
            finish(trainer_run, document)
    except KeyboardInterrupt:
        trainer_run.interrupts.absorb()
        record_stop(trainer_run, document, "interrupted", "Ctrl-C (SIGINT)")
        raise Interrupted(interrupted_message(trainer_run, trained)) from None
    except Exception as error:
        trainer_run.interrupts.absorb()
        record_stop(trainer_run, document, "failed", str(error) or type(error).__name__)
        raise
    return document


def finish(trainer_run: PhaseRun, document: dict[str, Any]) -> None:
    """The end of a phase (process 0): evaluation, eval.json, loss.png, run.json `done`."""
    folder, settings, phase = trainer_run.folder, trainer_run.settings, trainer_run.phase
    if settings.eval_images > 0:
        report = trainer_run.evaluate()
        document["eval"] = {k: v for k, v in report.items() if k != "samples"}
        from lensjax.files import write_text_atomic

        write_text_atomic(folder.path / "eval.json", json.dumps(report, indent=2))
        folder.log({"event": "eval", **document["eval"]})
        _say(format_report(phase.name, report))
    if settings.plot:
        plot_losses(folder.records(), folder.path / "loss.png", f"phase {phase.name}")
    trainer_run.interrupts.check()  # a Ctrl-C that a library callback caught and dropped
    folder.write_run(document)


def record_stop(trainer_run: PhaseRun, document: dict[str, Any], status: str,
                reason: str) -> None:
    """run.json `failed` or `interrupted`, with the step reached, the step latest/ holds and
    the reason; also a metrics.jsonl event. A write that fails too is left out, so that the
    first error is the one reported."""
    document.update(status=status, step=trainer_run.progress.step,
                    saved_step=trainer_run.saved_step, reason=reason)
    if trainer_run.main and trainer_run.folder.run_file.is_file():
        with contextlib.suppress(OSError):
            trainer_run.folder.write_run(document)
            trainer_run.folder.log({"event": status, "step": trainer_run.progress.step,
                                    "reason": reason})


def interrupted_message(trainer_run: PhaseRun, trained: bool) -> str:
    """Where an interrupted run stands, and how --resume continues it."""
    latest, name = trainer_run.folder.path / LATEST, trainer_run.phase.name
    if trained:
        return (f"interrupted (Ctrl-C) in the end-of-phase evaluation of phase {name}; "
                f"training is complete ({latest} holds step {trainer_run.saved_step}): the same "
                "command with --resume runs the evaluation again")
    where = f"interrupted (Ctrl-C) after step {trainer_run.progress.step} of phase {name}"
    if trainer_run.saved_step is None:
        return (where + ", before the first checkpoint: the same command with --resume starts "
                "the phase again")
    return (where + f"; {latest} holds step {trainer_run.saved_step}: the same command with "
            "--resume continues from there")


def format_report(phase: str, report: Mapping[str, Any]) -> str:
    """The end-of-phase evaluation (`PhaseRun.evaluate`) as printable lines."""
    lines = [f"phase {phase}: {report['method']} captions of {report['images']} validation "
             "images"]
    for sample in report["samples"]:
        lines.append(f"  {sample['image']}: {sample['caption']}")
        lines += [f"  {'':>{len(sample['image'])}}  ref: {r}" for r in sample["references"]]
    lines.append(f"  LensToWords BLEU-4 (mean sentence BLEU): {report['lenstowords_bleu4']:.4f}")
    if "corpus_bleu4" in report:
        lines.append(f"  corpus BLEU-4 (pycocoevalcap, {report['corpus_tokenizer']} tokens): "
                     f"{report['corpus_bleu4']:.4f}")
    return "\n".join(lines)


def _error(message: object, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """The command line; -> the exit status (0 done, 2 bad input, 3 non-finite loss, 130
    interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        run(args, argv)
    except NonFiniteLoss as error:
        return _error(error, EXIT_NON_FINITE)
    except Interrupted as error:
        return _error(error, EXIT_INTERRUPTED)
    except KeyboardInterrupt:  # before the run's own handler was installed
        return _error("interrupted (Ctrl-C) before training started", EXIT_INTERRUPTED)
    except (TrainError, CheckpointError, ValueError) as error:
        return _error(error, EXIT_BAD_INPUT)
    except OSError as error:
        return _error(describe_os_error(error), EXIT_BAD_INPUT)
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
