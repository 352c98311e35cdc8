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
    key: jax.Array  # raw uint32 key data (jax.random.key_data), so hosts can share it


class Batch(NamedTuple):
    """features (B, S, D) float, or normalised images (B, H, W, 3) for a Trainer
    `from_pixels`; inputs, targets (B, T) int32; lengths (B,) int32."""

    features: jax.Array
    inputs: jax.Array
    targets: jax.Array
    lengths: jax.Array


LENGTH_BUCKET = 8


def trim_padding(batch: Batch, mode: LossMode = "eos", bucket: int = LENGTH_BUCKET) -> Batch:
    """The batch cut after its last position that counts in `caption_loss`, rounded up to a
    multiple of `bucket` (at most one compiled step per bucket); features and lengths as they
    are. inputs, targets (B, T) -> (B, T') with T' <= T.

    Under causal attention no kept position sees a cut one, and the cut positions add nothing
    to the loss, so loss and gradients are those of the whole batch (dropout masks are drawn
    for the kept shape). LensToWords pads every caption to 64 tokens; batches of COCO
    captions rarely need more than 32."""
    targets = np.asarray(batch.targets)
    columns = np.arange(targets.shape[1])
    counted = targets != EOS_ID
    if mode == "eos":
        counted |= columns[None, :] == np.asarray(batch.lengths)[:, None]
    used = int(columns[counted.any(axis=0)].max(initial=0)) + 1
    keep = min(targets.shape[1], -(-used // bucket) * bucket)
    if keep == targets.shape[1]:
        return batch
    return batch._replace(inputs=np.asarray(batch.inputs)[:, :keep], targets=targets[:, :keep])


def data_mesh(devices: list | None = None) -> Mesh:
    """A one-axis ("data") mesh over every device (of every process, after
    `jax.distributed.initialize()`)."""
    return Mesh(np.array(devices if devices is not None else jax.devices()), ("data",))


class Trainer:
    """Builds the optimizer and the jitted data-parallel step for one configuration/phase."""

    def __init__(
        self,
        cfg: Any,
        learning_rates: Mapping[str, float],
        *,
        loss: LossMode = "eos",
        mesh: Mesh | None = None,
        remat: bool = False,
        dtype: jnp.dtype = jnp.float32,
        from_pixels: bool = False,
    ):
        """`remat`: gradient checkpointing of the GPT-2 blocks (and of the encoder stages).
        `dtype` bfloat16: compute in bfloat16 (mixed precision); parameters and optimizer
        state stay float32. `from_pixels`: batches carry images, which the model's encoder
        and head turn into features inside the step (so the encoder can train)."""
        if from_pixels and (cfg.encoder is None or cfg.head is None):
            raise ValueError("training from pixels needs a model with an image encoder and "
                             "its head")
        self.cfg = cfg
        self.from_pixels = from_pixels
        self.learning_rates = dict(learning_rates)
        self.mesh = mesh or data_mesh()
        self.remat = remat
        self.dtype = jnp.dtype(dtype)
        self._loss = loss
        self._labels: dict[str, str] | None = None
        self.optimizer: optax.GradientTransformation | None = None
        self._step: Callable | None = None
        self._eval: Callable | None = None

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
            {p: np.asarray(v, np.float32) for p, v in params.items()}, self._labels)
        opt_state = self.optimizer.init({**trainable, **frozen})
        state = TrainState(np.int32(0), trainable, frozen, opt_state,
                           jax.random.key_data(jax.random.key(seed)))
        self._step, self._eval = self._build_step(), self._build_eval()
        return self._replicate(state)

    def _replicate(self, tree):
        """Values identical in every process -> arrays replicated over the mesh. Across
        processes `jax.device_put` cannot reach other hosts' devices, so each process then
        supplies its own devices' copies."""
        if jax.process_count() == 1:
            return jax.device_put(tree, self.replicated)

        def put(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, self.replicated, lambda index: x[index])

        return jax.tree.map(put, tree)

    def restore(self, params: Mapping[str, Any], opt_leaves: list[np.ndarray],
                key_data: np.ndarray, step: int) -> TrainState:
        """The state `host_state` saved: params, optimizer state leaves, RNG key, step."""
        state = self.init(params)
        treedef = jax.tree.structure(state.opt_state)
        if treedef.num_leaves != len(opt_leaves):
            raise ValueError(f"the saved optimizer state has {len(opt_leaves)} arrays, this "
                             f"phase's optimizer {treedef.num_leaves}: a different phase?")
        opt_state = jax.tree.unflatten(treedef, list(opt_leaves))
        return self._replicate(state._replace(step=np.int32(step), opt_state=opt_state,
                                              key=np.asarray(key_data)))

    @staticmethod
    def host_state(state: TrainState) -> tuple[list[np.ndarray], np.ndarray, int]:
        """(optimizer state leaves, RNG key data, step) as host values, for a checkpoint."""
        return ([np.asarray(x) for x in jax.tree.leaves(state.opt_state)],
                np.asarray(state.key), int(state.step))

    def _loss_fn(self, trainable, frozen, batch: Batch, key: jax.Array | None) -> jax.Array:
        params = {**trainable, **frozen}
        features = batch.features
        if self.dtype != jnp.float32:  # mixed precision: float32 masters, low-precision math
            params = {p: v.astype(self.dtype) for p, v in params.items()}
        model = module_from_flat(self.cfg, params)
        remat = self.remat and key is not None
        features = features.astype(self.dtype)
        if self.from_pixels:
            features = model.encode(features, remat=remat)
        logits = model(features, batch.inputs,
                       rngs=None if key is None else nnx.Rngs(dropout=key), remat=remat)
        return caption_loss(logits, batch.targets, batch.lengths, self._loss)

    def _build_eval(self) -> Callable:
        def evaluate(state: TrainState, batch: Batch) -> jax.Array:
            return self._loss_fn(state.trainable, state.frozen, batch, None)

        return jax.jit(evaluate, in_shardings=(self.replicated, self.batch_sharding),
                       out_shardings=self.replicated)

    def _build_step(self) -> Callable:
        optimizer, loss_fn = self.optimizer, self._loss_fn

        def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
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
        """This process's rows of the global batch (all rows with one process) -> global
        arrays sharded on the data axis, without trailing padding that no loss term reads
        (`trim_padding`; with one process only, since each process sees only its rows)."""
        if jax.process_count() == 1:
            batch = trim_padding(batch, self._loss)
        return Batch(*(jax.make_array_from_process_local_data(self.batch_sharding,
                                                              np.asarray(x)) for x in batch))

    def step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, float]]:
        """One optimisation step on a global batch -> (new state, {"loss", "grad_norm"})."""
        if self._step is None:
            raise RuntimeError("call Trainer.init(params) first")
        state, metrics = self._step(state, self.shard_batch(batch))
        return state, {k: float(v) for k, v in metrics.items()}

    def eval_loss(self, state: TrainState, batch: Batch) -> float:
        """The loss of a global batch without dropout and without updating anything."""
        if self._eval is None:
            raise RuntimeError("call Trainer.init(params) first")
        return float(self._eval(state, self.shard_batch(batch)))

    @staticmethod
    def params(state: TrainState) -> dict[str, np.ndarray]:
        """{path: numpy array} of all parameters in `state`."""
        return {p: np.asarray(v) for p, v in {**state.trainable, **state.frozen}.items()}
