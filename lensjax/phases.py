"""LensToWords' training curriculum as data: one `Phase` per row of the original's phase table,
plus three small `demo-*` phases for the built-in synthetic set.

A phase fixes the architecture mode (prepend or inject), which components train and at which
learning rate (Adam, no schedule), the epoch budget and early-stopping patience, the batch
size, the data it was run on and where each component's initial weights come from:

- `fresh`: a new random initialisation;
- `gpt2`: the public pretrained GPT-2 (an HF `gpt2` folder, or any lensjax checkpoint's
  GPT-2), given as `--init gpt2=PATH`;
- a phase name: that phase's output checkpoint.

Where the original's README and notebooks disagree on a learning rate (phases 2a and 2c; v3a's
notebook text and code), the README's (text's) value is `learning_rates` and the notebook
code's is `notebook_learning_rates`. Every phase but `v3a` trains the v3b family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

from lensjax.models.families import FAMILIES
from lensjax.models.v3b.gpt2 import Mode


def _merged_init_groups() -> Mapping[str, tuple[str, ...]]:
    """Every family's initial-weight groups in one table; a group name two families define
    must cover the same labels in both."""
    merged: dict[str, tuple[str, ...]] = {}
    for family in FAMILIES.values():
        for group, labels in family.init_groups.items():
            if merged.setdefault(group, labels) != labels:
                raise RuntimeError(f"family {family.name}'s init group {group!r} covers "
                                   f"{labels}, another family's {merged[group]}")
    return MappingProxyType(merged)


# Initial-weight groups of every family, and the optimizer labels (lensjax.optim) each covers.
INIT_GROUPS: Mapping[str, tuple[str, ...]] = _merged_init_groups()
FRESH, PRETRAINED_GPT2 = "fresh", "gpt2"
# Data set names a phase can name, and what each means.
DATASETS: Mapping[str, str] = MappingProxyType({
    "flickr30k": "Flickr30k captions.txt, LensToWords' 90/10 split (random.seed(42))",
    "coco-50k": "COCO 2017 train, a seeded 50,000-image subset; validation on val2017",
    "coco": "COCO 2017 train (118,287 images); validation on val2017",
    "instagram": "CLIP-filtered Instagram CSVs, 90/10 split (random.seed(42))",
    "mix": "COCO 2017 train + Instagram train, concatenated",
    "synthetic": "the built-in synthetic shapes set (python -m lensjax.data.synthetic)",
    "instagram-raw": "the original's Instagram CSVs as v1/v2 read them (cleaned and filtered "
                     "by lensjax), 90/10 split (sklearn train_test_split, random_state=42)",
})
ALL_DECODER = ("perceiver", "gpt2", "lm", "xattn")


def _rates(value: float, labels: tuple[str, ...] = ALL_DECODER) -> Mapping[str, float]:
    return MappingProxyType(dict.fromkeys(labels, value))


@dataclasses.dataclass(frozen=True)
class Plateau:
    """Keras' ReduceLROnPlateau on the validation loss, as v1 and v2 used it: after
    `patience` epochs without an improvement of at least `min_delta`, every learning rate is
    multiplied by `factor`, down to `min_lr` (for the phase's largest rate); `reload_best`
    (v2's ReduceLRReloadBest): the best weights so far are loaded back at each reduction."""

    factor: float
    patience: int
    min_lr: float
    reload_best: bool = False
    min_delta: float = 1e-4


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase. `learning_rates` maps optimizer labels to Adam learning rates; labels
    not named are frozen. `init` maps each `INIT_GROUPS` group to its source."""

    name: str
    summary: str
    mode: Mode | None  # v3b's architecture mode; None for families without one (v3a)
    learning_rates: Mapping[str, float]
    init: Mapping[str, str]
    dataset: str
    epochs: int = 25
    patience: int = 5
    batch_size: int = 32
    notebook_learning_rates: Mapping[str, float] | None = None
    preset: str = "v3b"
    max_len: int = 64
    subset: int | None = None
    max_steps: int | None = None
    loss: str = "eos"
    # how the images are split without --val-data: "lenstowords" (random.seed(42)) or
    # "sklearn" (v1/v2's train_test_split); see DATASETS
    split: str = "lenstowords"
    plateau: Plateau | None = None
    clip_norm: float | None = None  # Keras' clipnorm: each weight's gradient on its own
    optimizer: str = "adam"  # lensjax.optim.OPTIMIZERS
    eval_method: str = "topk"  # decoding for the end-of-phase captions

    def sources(self) -> set[str]:
        """The phases (and `gpt2`) whose weights this phase starts from."""
        return {s for s in self.init.values() if s != FRESH}


def _phase(name: str, summary: str, mode: Mode | None, rates: Mapping[str, float], init: dict,
           dataset: str, **extra) -> Phase:
    return Phase(name, summary, mode, rates, MappingProxyType(init), dataset, **extra)


# The demo's scale: a few hundred steps of the small `demo` preset, captions up to 23 tokens.
_DEMO = {"epochs": 2, "patience": 2, "batch_size": 32, "preset": "demo", "max_len": 24}


def _all_from(phase: str) -> dict[str, str]:
    return dict.fromkeys(("perceiver", "gpt2", "xattn"), phase)


PHASES: Mapping[str, Phase] = MappingProxyType({p.name: p for p in (
    _phase("2a", "prepend warm-up: train the Perceiver under a frozen pretrained GPT-2",
           "prepend", _rates(1e-4, ("perceiver",)),
           {"perceiver": FRESH, "gpt2": PRETRAINED_GPT2, "xattn": FRESH}, "flickr30k",
           notebook_learning_rates=_rates(1e-5, ("perceiver",))),
    _phase("2b", "prepend: Perceiver and GPT-2 together", "prepend",
           MappingProxyType({"perceiver": 1e-5, "gpt2": 1e-6, "lm": 1e-6}),
           _all_from("2a"), "flickr30k"),
    _phase("2c", "injection warm-up: train only the cross-attention blocks", "inject",
           _rates(1e-4, ("xattn",)),
           {"perceiver": "2a", "gpt2": PRETRAINED_GPT2, "xattn": FRESH}, "flickr30k",
           notebook_learning_rates=_rates(1e-5, ("xattn",))),
    _phase("2d", "injection: everything except the image encoder (the released v3b)",
           "inject", _rates(1e-5), {"perceiver": "2b", "gpt2": "2b", "xattn": "2c"},
           "flickr30k"),
    _phase("3a", "COCO 2017, 50k-image subset", "inject", _rates(5e-6), _all_from("2d"),
           "coco-50k", batch_size=32, subset=50_000),
    _phase("3a-ext", "COCO 2017 train, all 118,287 images (the released v3c)", "inject",
           _rates(5e-6), _all_from("3a"), "coco"),
    _phase("3b", "CLIP-filtered Instagram", "inject", _rates(1e-5), _all_from("3a-ext"),
           "instagram", epochs=5),
    _phase("recovery", "COCO train + Instagram train, concatenated (recovery 1)", "inject",
           _rates(1e-5), _all_from("3a-ext"), "mix", batch_size=64),
    _phase("3c", "the same mix at a lower learning rate", "inject", _rates(5e-6),
           _all_from("recovery"), "mix", batch_size=64),
    # v3a, the notebook's final run: ProjectionHead at 1e-3 and the Transformer at 1e-5 (its
    # code cell: one 1e-5 for both), batch 64, up to 50 epochs, patience 7, the loss ignoring
    # every 50256.
    _phase("v3a", "v3a: ProjectionHead + 6-layer Transformer decoder, trained together", None,
           MappingProxyType({"projection_head": 1e-3, "decoder": 1e-5}),
           {"projection_head": FRESH, "decoder": FRESH}, "flickr30k", epochs=50, patience=7,
           batch_size=64, preset="v3a", loss="seed",
           notebook_learning_rates=_rates(1e-5, ("projection_head", "decoder"))),
    # v1 and v2, the first generations (notebooks v1_inceptionv3_lstm, v2_inceptionv3_attention):
    # Keras' Adam (its epsilon 1e-7 outside the bias correction), batch 64, up to 50 epochs,
    # the loss over the non-padding targets (v2: weighted by word rarity), ReduceLROnPlateau
    # on the validation loss.
    _phase("v1", "v1: InceptionV3 pooled features -> LSTM(512) word decoder", None,
           MappingProxyType({"decoder": 1e-3}), {"decoder": FRESH}, "instagram-raw",
           epochs=50, patience=5, batch_size=64, preset="v1", max_len=41, loss="words",
           split="sklearn", plateau=Plateau(factor=0.9, patience=2, min_lr=1e-5),
           optimizer="keras-adam", eval_method="greedy"),
    _phase("v2", "v2: InceptionV3 mixed10 -> LSTM(256) with attention over 64 patches", None,
           MappingProxyType({"decoder": 2e-4}), {"decoder": FRESH}, "instagram-raw",
           epochs=50, patience=8, batch_size=64, preset="v2", max_len=41,
           loss="weighted-words", split="sklearn",
           plateau=Plateau(factor=0.5, patience=4, min_lr=1e-5, reload_best=True),
           clip_norm=0.5, optimizer="keras-adam", eval_method="beam"),
    # The seed's curriculum at small scale on the synthetic set (make demo). Offline there is
    # no pretrained GPT-2, so the prepend warm-up trains the language model as well.
    _phase("demo-prepend", "demo: prepend warm-up, Perceiver + GPT-2 from scratch", "prepend",
           _rates(3e-3, ("perceiver", "gpt2", "lm")),
           {"perceiver": FRESH, "gpt2": FRESH, "xattn": FRESH}, "synthetic", max_steps=140,
           **_DEMO),
    _phase("demo-inject", "demo: injection warm-up, cross-attention only", "inject",
           _rates(3e-3, ("xattn",)), _all_from("demo-prepend"), "synthetic", max_steps=30,
           **_DEMO),
    _phase("demo-all", "demo: injection, every decoder component", "inject",
           MappingProxyType({"perceiver": 2e-3, "gpt2": 2e-3, "lm": 2e-3, "xattn": 3e-3}),
           _all_from("demo-inject"), "synthetic", max_steps=650, **_DEMO),
)})


def phase_table() -> str:
    """The phase table as plain text, for `--help`."""
    rows = []
    for p in PHASES.values():
        rates = ", ".join(f"{k} {v:g}" for k, v in p.learning_rates.items())
        if p.notebook_learning_rates:
            rates += " (notebook: " + ", ".join(
                f"{k} {v:g}" for k, v in p.notebook_learning_rates.items()) + ")"
        init = ", ".join(f"{g}<-{s}" for g, s in p.init.items())
        steps = f" (at most {p.max_steps} steps)" if p.max_steps else ""
        extra = ""
        if p.plateau:
            extra = (f"\n  {'':<12} learning rates x{p.plateau.factor:g} after "
                     f"{p.plateau.patience} epochs without improvement (min "
                     f"{p.plateau.min_lr:g})" + (", reloading the best weights"
                                                 if p.plateau.reload_best else ""))
        if p.clip_norm:
            extra += f"\n  {'':<12} each weight's gradient clipped to norm {p.clip_norm:g}"
        rows.append(f"  {p.name:<12} {p.mode or p.preset:<7} {p.dataset:<9} epochs "
                    f"{p.epochs}{steps}, patience {p.patience}, batch {p.batch_size}"
                    + (f", loss {p.loss}" if p.loss != "eos" else "") + "\n"
                    f"  {'':<12} trains: {rates}\n  {'':<12} init: {init}" + extra)
    return "\n".join(rows)
