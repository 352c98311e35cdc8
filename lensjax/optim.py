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
import jax.numpy as jnp
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


# The optimizers a phase can name: optax's Adam (LensToWords' PyTorch one), or Keras' (v1/v2).
OPTIMIZERS = ("adam", "keras-adam")


def build_optimizer(labels: Mapping[str, str], learning_rates: Mapping[str, float], *,
                    optimizer: str = "adam", clip_norm: float | None = None
                    ) -> optax.GradientTransformation:
    """`optax.multi_transform` over the flat {path: array} tree: Adam(lr) per trained label
    (`optimizer` "adam": `optax.adam`, as torch's; "keras-adam": `keras_adam`), after
    `clip_each_by_norm(clip_norm)` when given; `set_to_zero` (no state) for "frozen"."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")

    def adam(lr: float) -> optax.GradientTransformation:
        transform = optax.adam(lr) if optimizer == "adam" else keras_adam(lr)
        return transform if clip_norm is None else optax.chain(clip_each_by_norm(clip_norm),
                                                               transform)

    transforms: dict[str, optax.GradientTransformation] = {
        label: adam(lr) for label, lr in learning_rates.items()
    }
    transforms[FROZEN] = optax.set_to_zero()
    return optax.multi_transform(transforms, dict(labels))


def clip_each_by_norm(max_norm: float) -> optax.GradientTransformation:
    """Each weight's gradient scaled down to an L2 norm of at most `max_norm`, on its own
    (Keras' optimizer `clipnorm`; `optax.clip_by_global_norm` is Keras' `global_clipnorm`)."""
    def clip(g: jax.Array, _=None) -> jax.Array:
        norm = jnp.sqrt(jnp.sum(jnp.square(g)))
        return g * (max_norm / jnp.maximum(norm, max_norm))

    return optax.stateless_with_tree_map(clip)


def keras_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
               ) -> optax.GradientTransformation:
    """Keras' Adam (v1 and v2 trained with it): the bias corrections fold into the step,
    lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), so its epsilon (1e-7) meets the
    uncorrected sqrt(v), where `optax.adam`'s meets the corrected one. The state is optax's
    `ScaleByAdamState` (count, mu, nu)."""
    def init(params) -> optax.ScaleByAdamState:
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree.map(jnp.zeros_like, params),
                                      nu=jax.tree.map(jnp.zeros_like, params))

    def update(updates, state: optax.ScaleByAdamState, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
        t = count.astype(jnp.float32)
        step = learning_rate * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        updates = jax.tree.map(lambda m, v: -step * m / (jnp.sqrt(v) + eps), mu, nu)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)
