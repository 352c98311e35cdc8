"""Per-component optimisation: parameter labels from paths, and Adam per label.

Every parameter path gets a component label from its family's rules (v3b: `encoder`,
`encoder_head`, `perceiver`, `gpt2`, `xattn`, `lm`; v3a: `encoder`, `encoder_head`,
`projection_head`, `decoder`, and `fixed` for the sinusoidal table, which never trains; any
family's LoRA adapters: `lora`). A phase trains some labels, each at its own learning rate;
the rest are frozen. The optimizer
is `optax.multi_transform` over the labels, applied to the pure parameter pytree (not inside
`nnx.Optimizer`): trained labels get Adam (LensToWords' optimizer: no weight decay, no
schedule), frozen labels `optax.set_to_zero()`, which keeps no state.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import optax

from lensjax.models.families import FAMILIES

# (label, path pattern) of every family (their parameter paths do not overlap); the first
# match wins.
LABEL_RULES: tuple[tuple[str, str], ...] = (
    ("lora", r"^lora\."),  # LoRA adapters (lensjax.lora), of any family
    *dict.fromkeys(rule for family in FAMILIES.values() for rule in family.label_rules))
UNTRAINABLE = frozenset({"fixed"})
# The labels a learning rate can be given to.
LABELS = tuple(dict.fromkeys(label for label, _ in LABEL_RULES if label not in UNTRAINABLE))
FROZEN = "frozen"


def label_of(path: str) -> str:
    """The component label of a dotted parameter path."""
    for label, pattern in LABEL_RULES:
        if re.match(pattern, path):
            return label
    raise ValueError(f"parameter {path!r} has no component label")


def labels_for(params: Mapping[str, jax.Array], learning_rates: Mapping[str, float]
               ) -> dict[str, str]:
    """{path: its label if that label trains, else "frozen"}. A learning rate for a label
    the model does not have (e.g. `perceiver` for v3a) is a ValueError naming the ones it has."""
    unknown = set(learning_rates) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; known: {list(LABELS)}")
    labels = {p: label_of(p) for p in params}
    present = set(labels.values()) - UNTRAINABLE
    absent = set(learning_rates) - present
    if absent:
        raise ValueError(f"this model has no {', '.join(sorted(absent))} to train; its "
                         f"components: {', '.join(c for c in LABELS if c in present)}")
    return {p: label if label in learning_rates else FROZEN for p, label in labels.items()}


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
