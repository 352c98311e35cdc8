"""A phase's settings: its defaults (lensjax.phases) with the command line's overrides,
checked before any work starts."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from lensjax.cli import SEED_MAX
from lensjax.phases import Phase
from lensjax.train.messages import TrainError

ENCODER_LABELS = frozenset({"encoder", "encoder_head"})
# Integer flags -> (lowest, highest or None) allowed; checked before any work starts.
INT_FLAGS: Mapping[str, tuple[int, int | None]] = MappingProxyType({
    "epochs": (1, None), "max_steps": (1, None), "patience": (1, None),
    "batch_size": (1, None), "max_len": (3, None), "subset": (1, None), "seed": (0, SEED_MAX),
    "log_every": (1, None), "save_every": (1, None), "val_batches": (1, None),
    "eval_images": (0, None), "num_processes": (1, None), "process_id": (0, None),
    "image_size": (32, 4096), "ewc_batches": (1, None),
})
# With --lora and no `--lr lora=`, the adapters train at this multiple of the phase's largest
# learning rate (PEFT practice: LoRA takes about 10x a full fine-tune's rate).
LORA_RATE_FACTOR = 10.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """A phase's settings after the command-line overrides; stored in run.json."""

    phase: str
    mode: str | None  # v3b's prepend or inject; None for families without modes
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
    lora: dict[str, Any] | None = None  # LoRASpec.to_dict(); targets [] until `fit_model`
    mix: dict[str, float] | None = None  # source name -> share of each batch; first: target
    ewc: float | None = None  # EWC's lambda
    ewc_batches: int | None = None  # batches of --ewc-data the Fisher is estimated on
    split: str = "lenstowords"  # lensjax.phases.Phase.split
    plateau: dict[str, Any] | None = None  # lensjax.phases.Plateau's fields
    clip_norm: float | None = None
    optimizer: str = "adam"  # lensjax.optim.OPTIMIZERS

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


def learning_rates(phase: Phase, notebook: bool, overrides: Sequence[str], lora: bool = False
                   ) -> dict[str, float]:
    """The phase's learning rates (README's, or the notebook's with `notebook`), then the
    `--lr` overrides: `gpt2=` sets both GPT-2 labels (blocks and embeddings) unless `lm=` is
    also given; a rate of 0 freezes the component. With `lora`, only the adapters train
    (`lora`, default LORA_RATE_FACTOR times the phase's largest rate) and the components
    `--lr` names."""
    from lensjax.optim import LABELS

    rates = dict(phase.notebook_learning_rates if notebook and phase.notebook_learning_rates
                 else phase.learning_rates)
    if lora:
        rates = {"lora": LORA_RATE_FACTOR * max(rates.values())}
    given: dict[str, str] = {}
    for text in overrides:
        given.update(parse_assignments(text, "--lr"))
    if "gpt2" in given and "lm" not in given:
        given["lm"] = given["gpt2"]
    if "lora" in given and not lora:
        raise TrainError("--lr lora=: there are no LoRA adapters without --lora")
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

    rates = learning_rates(phase, args.notebook_lr, args.lr or [], args.lora is not None)
    settings = Settings(
        phase=phase.name,
        mode=phase.mode,
        learning_rates=rates,
        epochs=pick(args.epochs, phase.epochs),
        patience=pick(args.patience, phase.patience),
        batch_size=pick(args.batch_size, phase.batch_size),
        max_len=pick(args.max_len, phase.max_len),
        max_steps=pick(args.max_steps, phase.max_steps),
        loss=pick(args.loss, phase.loss),
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
        eval_method=args.eval_method or phase.eval_method,
        plot=args.plot,
        lora=None if args.lora is None else _lora_spec(args.lora).to_dict(),
        mix=None if args.mix is None else mix_weights(args.mix),
        ewc=_ewc_lambda(args),
        ewc_batches=args.ewc_batches if args.ewc is not None else None,
        split=phase.split,
        plateau=None if phase.plateau is None else dataclasses.asdict(phase.plateau),
        clip_norm=phase.clip_norm,
        optimizer=phase.optimizer,
    )
    if settings.batch_size % devices:
        raise TrainError(f"--batch-size {settings.batch_size} must be divisible by the "
                         f"{devices} devices the batch is split over")
    return settings


def _lora_spec(text: str):
    from lensjax.lora import parse_spec

    try:
        return parse_spec(text, ())
    except ValueError as error:
        raise TrainError(f"--lora: {error}") from None


def mix_weights(text: str) -> dict[str, float]:
    """'--mix target=0.5,old=0.5' -> {name: share}, shares normalised to sum 1."""
    weights: dict[str, float] = {}
    for name, value in parse_assignments(text, "--mix").items():
        try:
            weight = float(value)
        except ValueError:
            raise TrainError(f"--mix: {name}={value!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise TrainError(f"--mix: {name}={value} must be a finite number > 0")
        weights[name] = weight
    if not weights:
        raise TrainError("--mix names no source")
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def _ewc_lambda(args: argparse.Namespace) -> float | None:
    if args.ewc is None:
        if args.ewc_data:
            raise TrainError("--ewc-data without --ewc LAMBDA")
        return None
    if not math.isfinite(args.ewc) or args.ewc <= 0:
        raise TrainError(f"--ewc must be a finite number > 0, got {args.ewc}")
    if not args.ewc_data:
        raise TrainError("--ewc needs --ewc-data: the caption source(s) of the previous domain "
                         "the Fisher information is estimated on")
    return float(args.ewc)


def fit_model(settings: Settings, cfg) -> Settings:
    """`settings` for the model `cfg`: `--remat` defaults to on for deep decoders (12 layers
    or more: full-size GPT-2), `--max-len` must fit the model's positions (in v3b's prepend
    mode the latents take some; the end-of-phase captions take BOS + max_len - 1 new tokens),
    and a phase that reads images needs a model with an encoder; the image size is the
    model's."""
    from lensjax.models.lstm import WordModelConfig
    from lensjax.train.step import GPT2_LOSSES, WORD_LOSSES

    words = isinstance(cfg, WordModelConfig)
    losses = WORD_LOSSES if words else GPT2_LOSSES
    if settings.loss not in losses:
        raise TrainError(f"--loss {settings.loss}: a {type(cfg).family} model takes "
                         f"{' or '.join(losses)}")
    if words and settings.from_pixels:
        raise TrainError(f"{type(cfg).family} phases train on InceptionV3 features (python -m "
                         f"lensjax.extract --family {type(cfg).family}), not images: the "
                         "original never trained its InceptionV3")
    if settings.image_size is not None and settings.image_size != cfg.image_size:
        raise TrainError(f"--image-size {settings.image_size}: the run's model takes "
                         f"{cfg.image_size}-pixel images")
    if settings.from_pixels and (cfg.encoder is None or cfg.head is None):
        raise TrainError("this phase reads images, but its model has no image encoder: give "
                         "one with --init encoder=CHECKPOINT (or encoder=fresh)")
    from lensjax import lora
    from lensjax.models.families import family_of
    from lensjax.optim import labels_for
    from lensjax.params import abstract_params

    params = abstract_params(cfg)
    if settings.lora is not None:
        spec = lora.LoRASpec.from_dict(settings.lora)
        if not spec.targets:
            spec = dataclasses.replace(spec, targets=family_of(cfg).lora_targets)
        try:
            layers = lora.target_layers(params, spec)
        except ValueError as error:
            raise TrainError(f"--lora: {error}") from None
        settings = dataclasses.replace(settings, lora=spec.to_dict())
        params = {**params, **{p: None for layer in layers for p in lora.adapter_paths(layer)}}
    try:
        labels_for(params, settings.learning_rates)
    except ValueError as error:
        raise TrainError(f"--lr: {error}") from None
    longest = cfg.max_new_tokens + 1  # BOS + the caption's tokens
    if settings.max_len > longest:
        raise TrainError(f"--max-len must be between 3 and {longest} for this model "
                         f"({cfg.describe()}), got {settings.max_len}")
    remat = cfg.decoder_layers >= 12 if settings.remat is None else settings.remat
    return dataclasses.replace(settings, remat=remat, image_size=cfg.image_size)
