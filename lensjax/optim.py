"""Per-component optimisation: parameter labels from paths, and Adam per label.

Every parameter path gets a component label (`encoder`, `encoder_head`, `perceiver`, `gpt2`,
`xattn`, `lm`). A phase trains some labels, each at its own learning rate; the rest are
frozen. The optimizer is `optax.multi_transform` over the labels, applied to the pure
parameter pytree (not inside `nnx.Optimizer`): trained labels get Adam (LensToWords' optimizer:
no weight decay, no schedule), frozen labels `optax.set_to_zero()`, which keeps no state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import optax

# (label, path pattern); the first match wins.
LABEL_RULES: tuple[tuple[str, str], ...] = (
    ("encoder_head", r"^encoder_head\."),
    ("encoder", r"^encoder\."),
    ("perceiver", r"^perceiver\."),
    ("xattn", r"^gpt2\.xattn\."),
    ("lm", r"^gpt2\.(wte|wpe|ln_f)\."),
    ("gpt2", r"^gpt2\.h\."),
)
LABELS = tuple(label for label, _ in LABEL_RULES)
FROZEN = "frozen"


def label_of(path: str) -> str:
    """The component label of a dotted parameter path."""
    for label, pattern in LABEL_RULES:
        if re.match(pattern, path):
            return label
    raise ValueError(f"parameter {path!r} has no component label")


def labels_for(params: Mapping[str, jax.Array], learning_rates: Mapping[str, float]
               ) -> dict[str, str]:
    """{path: its label if that label trains, else "frozen"}."""
    unknown = set(learning_rates) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; known: {list(LABELS)}")
    return {p: label if (label := label_of(p)) in learning_rates else FROZEN for p in params}


def split_trainable(params: Mapping[str, jax.Array], labels: Mapping[str, str]
                    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """-> (trainable, frozen) flat dicts. Gradients are taken w.r.t. `trainable` only."""
    trainable = {p: v for p, v in params.items() if labels[p] != FROZEN}
    frozen = {p: v for p, v in params.items() if labels[p] == FROZEN}
    return trainable, frozen


def build_optimizer(labels: Mapping[str, str], learning_rates: Mapping[str, float]
                    ) -> optax.GradientTransformation:
    """`optax.multi_transform` over the flat {path: array} tree: Adam(lr) per trained label,
    `set_to_zero` (no state) for "frozen"."""
    transforms: dict[str, optax.GradientTransformation] = {
        label: optax.adam(lr) for label, lr in learning_rates.items()
    }
    transforms[FROZEN] = optax.set_to_zero()
    return optax.multi_transform(transforms, dict(labels))
