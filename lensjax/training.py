"""The training step: loss, per-component optimisation, data parallelism.

Parameters live as one flat {path: array} dict, split by the phase into a trainable and a
frozen part; gradients are taken with respect to the trainable part only, so frozen
components cost no weight-gradient work. The step is one jitted function over a
`jax.sharding.Mesh` of every device: the batch is sharded on the "data" axis, parameters and
optimizer state are replicated, and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lensjax.data.tokenizer import EOS_ID
from lensjax.models.captioner import CaptionerConfig
from lensjax.optim import build_optimizer, labels_for, split_trainable
from lensjax.params import module_from_flat

LossMode = Literal["seed", "eos"]


def caption_loss(logits: jax.Array, targets: jax.Array, lengths: jax.Array,
                 mode: LossMode = "eos") -> jax.Array:
    """Mean cross-entropy over the target positions that count.

    logits (B, T, V), targets (B, T) int, lengths (B,) caption tokens per row.
    "seed" (LensToWords' exactly): every 50256 target is ignored, so the model never learns to
    stop. "eos": also trains the first 50256 after the caption, so generation ends by itself.
    """
    counted = targets != EOS_ID
    if mode == "eos":
        counted |= jnp.arange(targets.shape[1])[None, :] == lengths[:, None]
    elif mode != "seed":
        raise ValueError(f"unknown loss {mode!r}: use 'seed' or 'eos'")
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * counted) / jnp.maximum(jnp.sum(counted), 1)


class TrainState(NamedTuple):
    """Everything a step changes (and a resume restores)."""

    step: jax.Array
    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any
    key: jax.Array


class Batch(NamedTuple):
    """features (B, S, D) float; inputs, targets (B, T) int32; lengths (B,) int32."""

    features: jax.Array
    inputs: jax.Array
    targets: jax.Array
    lengths: jax.Array


def data_mesh(devices: list | None = None) -> Mesh:
    """A one-axis ("data") mesh over every device (of every process, after
    `jax.distributed.initialize()`)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


class Trainer:
    """Builds the optimizer and the jitted data-parallel step for one configuration/phase."""

    def __init__(
        self,
        cfg: CaptionerConfig,
        learning_rates: Mapping[str, float],
        *,
        loss: LossMode = "eos",
        mesh: Mesh | None = None,
    ):
        self.cfg = cfg
        self.learning_rates = dict(learning_rates)
        self.mesh = mesh or data_mesh()
        self._loss = loss
        self._labels: dict[str, str] | None = None
        self.optimizer: optax.GradientTransformation | None = None
        self._step: Callable | None = None

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def init(self, params: Mapping[str, Any], seed: int = 0) -> TrainState:
        """Initial state from {path: array} params (every path of the configuration)."""
        self._labels = labels_for(params, self.learning_rates)
        self.optimizer = build_optimizer(self._labels, self.learning_rates)
        trainable, frozen = split_trainable(
            {p: jnp.asarray(v, jnp.float32) for p, v in params.items()}, self._labels)
        opt_state = self.optimizer.init({**trainable, **frozen})
        state = TrainState(jnp.int32(0), trainable, frozen, opt_state,
                           jax.random.key(seed))
        self._step = self._build_step()
        return jax.device_put(state, self.replicated)

    def _build_step(self) -> Callable:
        optimizer, loss_mode = self.optimizer, self._loss

        def loss_fn(trainable, frozen, batch: Batch, key):
            model = module_from_flat(self.cfg, {**trainable, **frozen})
            logits = model(batch.features.astype(jnp.float32), batch.inputs,
                           rngs=nnx.Rngs(dropout=key))
            return caption_loss(logits, batch.targets, batch.lengths, loss_mode)

        def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
            key = jax.random.fold_in(state.key, state.step)
            loss, grads = jax.value_and_grad(loss_fn)(state.trainable, state.frozen, batch, key)
            # Frozen components get set_to_zero updates, which nothing reads: XLA drops them.
            full_grads = {**grads, **jax.tree.map(jnp.zeros_like, state.frozen)}
            updates, opt_state = optimizer.update(full_grads, state.opt_state,
                                                  {**state.trainable, **state.frozen})
            trainable = optax.apply_updates(state.trainable,
                                            {p: updates[p] for p in state.trainable})
            return (state._replace(step=state.step + 1, trainable=trainable,
                                   opt_state=opt_state),
                    {"loss": loss, "grad_norm": optax.global_norm(grads)})

        return jax.jit(step, donate_argnums=0,
                       in_shardings=(self.replicated, self.batch_sharding),
                       out_shardings=(self.replicated, self.replicated))

    def shard_batch(self, batch: Batch) -> Batch:
        """Host arrays of the global batch -> arrays sharded on the data axis."""
        return jax.device_put(Batch(*(np.asarray(x) for x in batch)), self.batch_sharding)

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, float]]:
        """One optimisation step on a global batch -> (new state, {"loss", "grad_norm"})."""
        if self._step is None:
            raise RuntimeError("call Trainer.init(params) first")
        state, metrics = self._step(state, self.shard_batch(batch))
        return state, {k: float(v) for k, v in metrics.items()}

    @staticmethod
    def params(state: TrainState) -> dict[str, np.ndarray]:
        """{path: numpy array} of all parameters in `state`."""
        return {p: np.asarray(v) for p, v in {**state.trainable, **state.frozen}.items()}
