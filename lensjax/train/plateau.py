"""Keras' ReduceLROnPlateau for the v1 and v2 phases, with optax's schedule logic.

`optax.contrib.reduce_on_plateau` is fed the validation loss once per epoch (accumulation
size 1), on the host; its scale multiplies every learning rate of the phase in the training
step (`Trainer.with_lr_scale`). Its rule is Keras': an improvement is a loss below the best by
more than `min_delta` (`atol`, no relative tolerance); after `patience` epochs without one,
scale *= factor, never below `min_lr` over the phase's largest learning rate. The state is
saved with every latest/ checkpoint (`Progress.plateau`), so a resumed run continues it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The ReduceLROnPlateauState fields a checkpoint keeps (the others restart at each epoch).
_SAVED = ("scale", "best_value", "plateau_count", "cooldown_count")


class PlateauSchedule:
    """The learning-rate scale of a phase with a `lensjax.phases.Plateau` (given as its
    fields' dict), updated by each epoch's validation loss."""

    def __init__(self, plateau: Mapping[str, Any], learning_rates: Mapping[str, float]):
        self.reload_best = bool(plateau["reload_best"])
        top = max(learning_rates.values())
        self._transform = optax.contrib.reduce_on_plateau(
            factor=plateau["factor"], patience=plateau["patience"], rtol=0.0,
            atol=plateau["min_delta"], min_scale=min(1.0, plateau["min_lr"] / top))
        self._update = jax.jit(lambda state, value: self._transform.update(
            {}, state, value=value)[1])
        self._initial = self._transform.init(jnp.zeros((), jnp.float32))

    def initial(self) -> dict[str, float]:
        """The state before the first epoch (scale 1)."""
        return self._saved(self._initial)

    def update(self, saved: Mapping[str, float], val_loss: float) -> dict[str, float]:
        """The state after an epoch whose validation loss is `val_loss`."""
        dtypes = {k: getattr(self._initial, k).dtype for k in _SAVED}
        state = self._initial._replace(**{k: jnp.asarray(saved[k], dtypes[k]) for k in _SAVED})
        return self._saved(self._update(state, jnp.float32(val_loss)))

    @staticmethod
    def _saved(state) -> dict[str, float]:
        return {k: float(np.asarray(getattr(state, k))) for k in _SAVED}
