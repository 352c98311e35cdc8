"""python -m lensjax.train: LensToWords' phase curriculum, data-parallel over every device.

Each phase (see the table below) trains some components of the captioner on pre-extracted
image features (`python -m lensjax.extract`), from initial weights that earlier phases wrote.
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
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.phases import DATASETS, FRESH, INIT_GROUPS, PHASES, PRETRAINED_GPT2, Phase, phase_table

# Default data locations per data set: (caption sources, validation source, feature caches).
DEFAULT_DATA: Mapping[str, tuple[list[str], str | None, list[str]]] = {
    "flickr30k": (["data/flickr30k/captions.txt"], None, ["features/flickr30k"]),
    "coco-50k": (["data/coco/annotations/captions_train2017.json"],
                 "data/coco/annotations/captions_val2017.json", ["features/coco"]),
    "coco": (["data/coco/annotations/captions_train2017.json"],
             "data/coco/annotations/captions_val2017.json", ["features/coco"]),
    "synthetic": (["demo_out/shapes/captions.txt"], None, ["demo_out/features"]),
}
LATEST, BEST, RUN_FILE, METRICS_FILE, TRAIN_STATE = (
    "latest", "best", "run.json", "metrics.jsonl", "train_state")
# Settings a resumed run may change (extending a run); everything else must match.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "patience", "eval_images", "eval_method",
                               "plot"})

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
                    The encoder is never trained; it is carried from the first checkpoint
                    that has one, so the result can caption image files

examples:
  python -m lensjax.train --phase 2a --init gpt2=weights/gpt2 --data data/flickr30k/captions.txt \\
      --features features/flickr30k
  python -m lensjax.train --phase 2c --notebook-lr       # 2c at the notebook's 1e-5
  python -m lensjax.train --phase 2d --lr perceiver=2e-5,gpt2=5e-6 --epochs 10
  python -m lensjax.train --phase 3a --init 2d=weights/v3b --batch-size 64 --plot
  python -m lensjax.train --phase 2d --resume            # continue a killed run

exit status: 0 done, 2 bad input, 3 stopped on a non-finite loss.
"""


class TrainError(RuntimeError):
    """A problem with the command's input, explained for the user."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


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
    remat: bool
    dtype: str
    log_every: int
    save_every: int
    val_batches: int | None
    eval_images: int
    eval_method: str
    plot: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    if {"encoder", "encoder_head"} & set(rates):
        raise TrainError("training reads pre-extracted features, so the image encoder and its "
                         "head cannot train here")
    if not rates:
        raise TrainError("no component trains: every learning rate is 0")
    return rates


def resolve_settings(args: argparse.Namespace, phase: Phase, preset_is_full: bool) -> Settings:
    def pick(value, default):
        return default if value is None else value

    settings = Settings(
        phase=phase.name,
        mode=phase.mode,
        learning_rates=learning_rates(phase, args.notebook_lr, args.lr or []),
        epochs=pick(args.epochs, phase.epochs),
        patience=pick(args.patience, phase.patience),
        batch_size=pick(args.batch_size, phase.batch_size),
        max_len=pick(args.max_len, phase.max_len),
        max_steps=pick(args.max_steps, phase.max_steps),
        loss=args.loss,
        seed=args.seed,
        subset=pick(args.subset, phase.subset),
        remat=pick(args.remat, preset_is_full),
        dtype=args.dtype,
        log_every=args.log_every,
        save_every=args.save_every,
        val_batches=args.val_batches,
        eval_images=args.eval_images,
        eval_method=args.eval_method,
        plot=args.plot,
    )
    for name in ("epochs", "batch_size", "log_every", "save_every"):
        if getattr(settings, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.max_steps is not None and settings.max_steps < 1:
        raise TrainError("--max-steps must be at least 1")
    if settings.patience < 1:
        raise TrainError("--patience must be at least 1")
    if settings.max_len < 3:
        raise TrainError("--max-len must be at least 3 (BOS, a token, EOS)")
    return settings


# --- data ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """Training and validation captions ({image key: [captions]}) and their feature cache."""

    train: dict[str, list[str]]
    val: dict[str, list[str]]
    cache: Any  # lensjax.data.cache.FeatureCache
    sources: list[str]


def _captions(paths: Sequence[str]) -> dict[str, list[str]]:
    from lensjax.data.captions import caption_source

    merged: dict[str, list[str]] = {}
    for path in paths:
        if not Path(path).exists():
            raise TrainError(f"caption source {path} does not exist")
        for key, caps in caption_source(path).captions.items():
            merged.setdefault(key, []).extend(caps)
    return merged


def _feature_cache(folders: Sequence[str]):
    from lensjax.data.cache import SHARD_PREFIX, FeatureCache

    for folder in folders:
        if not Path(folder).is_dir():
            raise TrainError(f"feature cache {folder} does not exist; make it with "
                             "`python -m lensjax.extract IMAGES --weights W --out "
                             f"{folder}`")
    if len(folders) == 1:
        return FeatureCache(folders[0])
    return FeatureCache([s for f in folders for s in sorted(Path(f).glob(SHARD_PREFIX + "*"))])


def load_data(args: argparse.Namespace, phase: Phase, settings: Settings) -> Data:
    """Captions and features for `phase`, split as LensToWords split them."""
    from lensjax.data.captions import coco_subset, seed_split

    data, val_data, features = DEFAULT_DATA.get(phase.dataset, ([], None, []))
    data = args.data or data
    features = args.features or features
    val_data = args.val_data or (None if args.data else val_data)
    if not data or not features:
        raise TrainError(f"phase {phase.name} trains on {DATASETS[phase.dataset]}: give the "
                         "caption source(s) with --data and the feature cache with --features")
    captions = _captions(data)
    if val_data is not None:
        train, val = captions, _captions([val_data])
    else:
        train_keys, val_keys = seed_split(list(captions), seed=42, train_frac=0.9)
        train = {k: captions[k] for k in train_keys}
        val = {k: captions[k] for k in val_keys}
    if settings.subset is not None and settings.subset < len(train):
        train = {k: train[k] for k in coco_subset(list(train), settings.subset,
                                                    seed=settings.seed)}
    return Data(train, val, _feature_cache(features), [*data, *([val_data] if val_data else [])])


def usable(captions: Mapping[str, list[str]], cache, strict: bool, what: str, say
           ) -> list[tuple[str, str]]:
    """(key, caption) pairs with features; missing images are counted and skipped (or an error
    with `strict`)."""
    from lensjax.data.batching import available_pairs

    try:
        pairs, missing = available_pairs(captions, cache, strict=strict)
    except KeyError as error:
        raise TrainError(f"{what}: {error.args[0]} (--strict)") from None
    if missing:
        say(f"{what}: {len(missing)} of {len(captions)} images have no features in the cache "
            f"and are skipped (first: {', '.join(missing[:3])}); --strict makes this an error")
    if not pairs:
        raise TrainError(f"{what}: no image has features in the cache")
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
        from lensjax.checkpoint import CheckpointError, load_checkpoint

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


class RunFolder:
    """run.json, metrics.jsonl and the checkpoints of one run."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def read_run(self) -> dict[str, Any] | None:
        return json.loads(self.run_file.read_text()) if self.run_file.is_file() else None

    def write_run(self, document: Mapping[str, Any]) -> None:
        from lensjax.files import write_text_atomic

        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_file, json.dumps(document, indent=2, sort_keys=True))

    def log(self, record: Mapping[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rewind_metrics(self, step: int) -> None:
        """Drop log lines after `step`: a resumed run logs them again."""
        from lensjax.files import write_text_atomic

        kept = [r for r in self.records() if r.get("step", 0) <= step and "event" not in r]
        write_text_atomic(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    def prepare(self, settings: Settings, resume: bool, force: bool, say) -> bool:
        """Check or clear the folder; -> whether a checkpoint to resume from exists."""
        existing = self.read_run()
        if existing is None:
            if self.path.exists() and any(self.path.iterdir()) and not force:
                raise TrainError(f"{self.path} is not empty and holds no lensjax run; choose "
                                 "another --out or pass --force to clear it")
            if force and self.path.exists():
                shutil.rmtree(self.path)
            return False
        if force:
            say(f"--force: clearing the earlier run in {self.path}")
            shutil.rmtree(self.path)
            return False
        if not resume:
            raise TrainError(f"{self.path} already holds a run of phase "
                             f"{existing['settings']['phase']}: pass --resume to continue it "
                             "or --force to start over")
        changed = {k: (v, settings.to_dict().get(k)) for k, v in existing["settings"].items()
                   if settings.to_dict().get(k) != v and k not in RESUMABLE_CHANGES}
        if changed:
            raise TrainError(f"{self.path} holds a run with different settings; --resume needs "
                             "the same ones: " + "; ".join(
                                 f"{k}: {old!r} there, {new!r} now"
                                 for k, (old, new) in changed.items()))
        if not (self.path / LATEST).is_dir():
            say(f"{self.path} has no checkpoint yet: starting the phase from the beginning")
            return False
        return True


# --- training --------------------------------------------------------------------------------


@dataclasses.dataclass
class Progress:
    """Where a run is; saved with every `latest` checkpoint."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    stopped_early: bool = False


def _say(message: str) -> None:
    import jax

    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


class PhaseRun:
    """One phase run: the loop, checkpoints, metrics and the end-of-phase evaluation."""

    def __init__(self, args: argparse.Namespace, phase: Phase, settings: Settings, cfg,
                 params: dict[str, np.ndarray], provenance: dict[str, str], data: Data,
                 folder: RunFolder):
        import jax

        from lensjax.data.batching import CaptionBatches
        from lensjax.data.tokenizer import GPT2Tokenizer
        from lensjax.training import Trainer

        self.args, self.phase, self.settings, self.cfg = args, phase, settings, cfg
        self.provenance, self.data, self.folder = provenance, data, folder
        self.main = jax.process_index() == 0
        devices = jax.device_count()
        if settings.batch_size % devices:
            raise TrainError(f"--batch-size {settings.batch_size} is not divisible by the "
                             f"{devices} devices the batch is split over")
        tokenizer = GPT2Tokenizer()
        process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        train_pairs = usable(data.train, data.cache, args.strict, "training set", _say)
        val_pairs = usable(data.val, data.cache, args.strict, "validation set", _say)
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
                               remat=settings.remat, dtype=settings.dtype)
        self.params = params

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
        from lensjax.checkpoint import save_checkpoint

        if not self.main:
            return
        extra = None
        if progress is not None:
            leaves, key, _ = self.trainer.host_state(state)
            extra = {TRAIN_STATE: {"key": key, **{f"opt_{i}": x for i, x in enumerate(leaves)}}}
        save_checkpoint(self.folder.path / name, self.trainer.params(state),
                        self._metadata(progress), overwrite=True, extra=extra)

    def restore(self):
        from lensjax.checkpoint import load_checkpoint, load_extra

        latest = self.folder.path / LATEST
        params, metadata = load_checkpoint(latest)
        saved = load_extra(latest, TRAIN_STATE)
        progress = Progress(**metadata["training"])
        leaves = [saved[f"opt_{i}"] for i in range(len(saved) - 1)]
        state = self.trainer.restore(params, leaves, saved["key"], progress.step)
        if self.main:
            self.folder.rewind_metrics(progress.step)
        _say(f"resuming {self.folder.path} at epoch {progress.epoch + 1}, batch "
             f"{progress.batch}, step {progress.step}")
        return state, progress

    # -- the loop

    def run(self, resume: bool) -> Progress:
        from tqdm import tqdm

        from lensjax.training import Batch

        settings = self.settings
        if resume:
            state, progress = self.restore()
        else:
            state, progress = self.trainer.init(self.params, settings.seed), Progress()
            self.params = {}  # the state holds them now
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
                        f"{epoch + 1}, batch {index + 1}); nothing after step "
                        f"{self._saved_step()} was saved: {self.folder.path / LATEST} is the "
                        "last good checkpoint. Lower the learning rate (--lr) and --resume, "
                        "or check the input features")
                progress.step, progress.batch = progress.step + 1, index + 1
                window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if progress.step % settings.log_every == 0:
                    rate = len(window) * settings.batch_size / (time.perf_counter()
                                                                - window_start)
                    bar.set_postfix(loss=f"{np.mean(window):.4f}", samples_s=f"{rate:.1f}")
                    flush(epoch)
                if index + 1 == last:  # the epoch's end, or --max-steps
                    break
                if progress.step % settings.save_every == 0:
                    flush(epoch)
                    self.save(LATEST, state, progress)
            bar.close()
            flush(epoch)
            val = self.validate(state)
            if not math.isfinite(val):
                raise NonFiniteLoss(
                    f"the validation loss is {val} after epoch {epoch + 1} (step "
                    f"{progress.step}); {self.folder.path / LATEST} (step "
                    f"{self._saved_step()}) is the last good checkpoint")
            improved = val < progress.best_val
            progress = dataclasses.replace(
                progress, epoch=epoch + 1, batch=0,
                best_val=min(val, progress.best_val),
                bad_epochs=0 if improved else progress.bad_epochs + 1)
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

    def _saved_step(self) -> int:
        from lensjax.checkpoint import read_metadata

        latest = self.folder.path / LATEST
        return read_metadata(latest)["training"]["step"] if latest.is_dir() else 0

    def validate(self, state) -> float:
        from lensjax.training import Batch

        count = len(self.val_batches)
        if self.settings.val_batches is not None:
            count = min(count, self.settings.val_batches)
        losses = [self.trainer.eval_loss(state, Batch(b.features, b.inputs, b.targets,
                                                      b.lengths))
                  for b in (self.val_batches.batch(0, i) for i in range(count))]
        return float(np.mean(losses))

    # -- end of phase

    def evaluate(self) -> dict[str, Any]:
        """Caption validation images with the best weights; both BLEU-4 protocols."""
        from lensjax.api import load_pretrained
        from lensjax.evaluate import EvaluationError, corpus_bleu4, seed_bleu4

        model = load_pretrained(self.folder.path / BEST)
        keys = [k for k in self.data.val if k in self.data.cache][: self.settings.eval_images]
        features = self.data.cache.get_batch(keys).astype(np.float32)
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
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(path)


# --- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    where.add_argument("--init", action="append", metavar="KEY=SOURCE",
                       help="initial weights (see below)")
    where.add_argument("--runs-dir", type=Path, default=Path("runs"),
                       help="where phases write and find each other's outputs (default: runs)")
    where.add_argument("--out", type=Path, help="run folder (default: RUNS_DIR/PHASE)")
    where.add_argument("--preset", help="model preset for fresh weights (default: the "
                       "init checkpoint's config, else the phase's: v3b, demo for demo-*)")
    hyper = parser.add_argument_group("overrides of the phase's defaults")
    hyper.add_argument("--lr", action="append", metavar="COMPONENT=RATE,...",
                       help="learning rates: perceiver, gpt2 (blocks and embeddings; `lm` "
                       "alone for wte/wpe/ln_f), xattn; 0 freezes a component")
    hyper.add_argument("--notebook-lr", action="store_true",
                       help="2a/2c: the notebooks' learning rate (1e-5) instead of the README's")
    hyper.add_argument("--epochs", type=int, help="at most N epochs (default: per phase)")
    hyper.add_argument("--max-steps", type=int,
                       help="end the phase after N steps (validating and saving as at an "
                       "epoch end)")
    hyper.add_argument("--patience", type=int,
                       help="epochs without validation improvement before stopping")
    hyper.add_argument("--batch-size", type=int, help="global batch, split over all devices")
    hyper.add_argument("--max-len", type=int, help="token sequence length (LensToWords: 64)")
    hyper.add_argument("--subset", type=int, help="train on a seeded subset of N images")
    hyper.add_argument("--loss", choices=("eos", "seed"), default="eos",
                       help="eos (default): also learn the end-of-caption token; seed: "
                       "LensToWords' loss, which ignores every 50256 target")
    hyper.add_argument("--seed", type=int, default=0,
                       help="data order, dropout, fresh weights (default: 0)")
    running = parser.add_argument_group("running")
    running.add_argument("--resume", action="store_true", help="continue the run in --out")
    running.add_argument("--force", action="store_true", help="clear --out and start over")
    running.add_argument("--strict", action="store_true",
                     help="images without features are an error, not skipped")
    running.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="compute dtype (default: float32); bfloat16 is mixed precision "
                     "for GPUs/TPUs (parameters and optimizer state stay float32)")
    running.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                     help="gradient checkpointing of the GPT-2 blocks (default: on for "
                     "full-size presets)")
    running.add_argument("--log-every", type=int, default=50,
                         help="steps per metrics.jsonl line (default: 50)")
    running.add_argument("--save-every", type=int, default=500,
                     help="steps between latest/ checkpoints, also saved at every epoch "
                         "end (default: 500)")
    running.add_argument("--val-batches", type=int,
                         help="validate on at most N batches (default: all)")
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
    """The whole phase; -> the final run.json document. `argv` is recorded in run.json."""
    import jax

    if args.distributed:
        # CPU-only clusters need a collectives backend for cross-process all-reduces.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    phase = PHASES[args.phase]
    init: dict[str, str] = {}
    for text in args.init or []:
        init.update(parse_assignments(text, "--init"))
    folder = RunFolder(args.out or args.runs_dir / phase.name)
    store = Checkpoints()
    latest = folder.path / LATEST
    if args.resume and latest.is_dir():  # the model and its weights come from latest/
        from lensjax.checkpoint import CheckpointError, read_metadata
        from lensjax.models.captioner import CaptionerConfig

        try:
            cfg = CaptionerConfig.from_dict(read_metadata(latest)["config"])
        except CheckpointError as error:
            raise TrainError(f"cannot resume: {error}") from None
        sources: dict[str, str | Path] = {}
    else:
        sources = resolve_sources(phase, init, args.runs_dir)
        cfg = model_config(phase, sources, args.preset, store)
    settings = resolve_settings(args, phase, preset_is_full=cfg.gpt2.n_layer >= 12)
    if jax.process_index() == 0:
        resume = folder.prepare(settings, args.resume, args.force, _say)
    else:  # process 0 checks and clears the folder; the others only read it
        resume = args.resume and (folder.path / LATEST).is_dir()
    data = load_data(args, phase, settings)
    if resume:  # the weights come from latest/
        params, provenance = {}, folder.read_run()["init"]
    else:
        params, provenance = initial_params(cfg, sources, args.seed, store, _say)
    trainer_run = PhaseRun(args, phase, settings, cfg, params, provenance, data, folder)
    document: dict[str, Any] = {
        "phase": phase.name, "summary": phase.summary, "settings": settings.to_dict(),
        "init": provenance, "data": data.sources, "status": "running",
        "command": ["python", "-m", "lensjax.train", *(argv or [])],
        "devices": jax.device_count(), "processes": jax.process_count(),
    }
    if trainer_run.main:
        folder.write_run(document)
    _say(f"phase {phase.name} ({phase.summary}): {len(trainer_run.batches)} steps per epoch "
         f"of {settings.batch_size} on {jax.device_count()} device(s); training "
         + ", ".join(f"{k} at {v:g}" for k, v in settings.learning_rates.items()))
    try:
        progress = trainer_run.run(resume)
    except NonFiniteLoss as error:
        document["status"] = f"stopped: {error}"
        if trainer_run.main:
            folder.write_run(document)
            folder.log({"event": "non-finite loss", "message": str(error)})
        raise
    document["status"] = "stopped early" if progress.stopped_early else "finished"
    document["best_val_loss"] = progress.best_val
    if trainer_run.main and settings.eval_images > 0:
        report = trainer_run.evaluate()
        document["eval"] = {k: v for k, v in report.items() if k != "samples"}
        from lensjax.files import write_text_atomic

        write_text_atomic(folder.path / "eval.json", json.dumps(report, indent=2))
        folder.log({"event": "eval", **document["eval"]})
        _say(format_report(phase.name, report))
    if trainer_run.main:
        if settings.plot:
            plot_losses(folder.records(), folder.path / "loss.png", f"phase {phase.name}")
        folder.write_run(document)
    return document


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        run(args, argv)
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except (TrainError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
