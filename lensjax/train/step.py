"""The training step: loss, per-component optimisation, data parallelism, LoRA and EWC.

Parameters live as one flat {path: array} dict, split by the phase into a trainable and a
frozen part; gradients are taken with respect to the trainable part only, so frozen
components cost no weight-gradient work. LoRA adapters (`lensjax.lora`) are parameters of
their own label `lora` beside the frozen base weights. EWC adds `(lambda / 2) * sum F (w -
w*)^2` over the trained weights, with the diagonal Fisher F and the anchor w* estimated
before the phase (`Trainer.estimate_ewc`). The step is one jitted function over a
`jax.sharding.Mesh` of every device: the batch is sharded on the "data" axis, parameters and
optimizer state are replicated, and XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lensjax import lora
from lensjax.data.tokenizer import EOS_ID
from lensjax.models.output_loss import LossRows
from lensjax.optim import build_optimizer, labels_for, split_trainable
from lensjax.params import module_from_flat

LossMode = Literal["seed", "eos", "words", "weighted-words"]
# Every loss mode, for flags: the v3 families' (GPT-2 tokens) and the word families' (v1/v2).
GPT2_LOSSES, WORD_LOSSES = ("eos", "seed"), ("words", "weighted-words")
WORD_PAD = 0  # the word vocabularies' padding index


def caption_loss(logits: jax.Array, targets: jax.Array, lengths: jax.Array,
                 mode: LossMode = "eos", token_weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over the target positions that count.

    logits (B, T, V), targets (B, T) int, lengths (B,) caption tokens per row.
    "seed" (LensToWords' exactly): every 50256 target is ignored, so the model never learns to
    stop. "eos": also trains the first 50256 after the caption, so generation ends by itself.
    "words" (v1/v2, word vocabularies): every target but the padding 0 counts;
    "weighted-words" (v2): the same, each loss weighted by its target's `token_weights` (V,),
    the mean still over the counted positions (the notebook's `masked_weighted_loss`).
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return mean_counted(losses, targets, lengths, mode, token_weights)


def counted_positions(targets, lengths, mode: LossMode = "eos", xp=jnp):
    """Which target positions (B, T) bool the loss of `mode` counts (`xp`: jax.numpy, or
    numpy on the host)."""
    if mode in WORD_LOSSES:
        return targets != WORD_PAD
    counted = targets != EOS_ID
    if mode == "eos":
        counted |= xp.arange(targets.shape[1])[None, :] == lengths[:, None]
    elif mode != "seed":
        raise ValueError(f"unknown loss {mode!r}: use one of "
                         f"{', '.join(GPT2_LOSSES + WORD_LOSSES)}")
    return counted


def mean_counted(losses: jax.Array, targets: jax.Array, lengths: jax.Array,
                 mode: LossMode = "eos", token_weights: jax.Array | None = None
                 ) -> jax.Array:
    """The mean of per-position losses (B, T) over the positions `caption_loss` counts
    ("weighted-words": each weighted by `token_weights[target]`)."""
    counted = counted_positions(targets, lengths, mode)
    if mode == "weighted-words":
        if token_weights is None:
            raise ValueError("the weighted-words loss needs token_weights")
        losses = losses * jnp.take(token_weights, targets)
    return jnp.sum(losses * counted) / jnp.maximum(jnp.sum(counted), 1)


def ewc_penalty(params: Mapping[str, jax.Array], anchor: Mapping[str, jax.Array],
                fisher: Mapping[str, jax.Array]) -> jax.Array:
    """EWC's quadratic penalty without lambda: 0.5 * sum over the paths of `fisher` of
    F * (w - w*)^2 (a scalar; its gradient is F * (w - w*))."""
    terms = [jnp.sum(fisher[p] * jnp.square(params[p] - anchor[p])) for p in fisher]
    return 0.5 * sum(terms, jnp.float32(0))


class EWC(NamedTuple):
    """EWC's anchor w* and diagonal Fisher F, {path: array} over the same trained paths."""

    anchor: dict[str, Any]
    fisher: dict[str, Any]


class TrainState(NamedTuple):
    """Everything a step changes (and a resume restores), and EWC's constants (empty dicts
    without EWC)."""

    step: jax.Array
    trainable: dict[str, jax.Array]
    frozen: dict[str, jax.Array]
    opt_state: Any
    key: jax.Array  # raw uint32 key data (jax.random.key_data), so hosts can share it
    ewc: EWC = EWC({}, {})
    lr_scale: Any = np.float32(1)  # every learning rate's factor (ReduceLROnPlateau's)


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
    counted = counted_positions(targets, np.asarray(batch.lengths), mode, np)
    used = int(columns[counted.any(axis=0)].max(initial=0)) + 1
    keep = min(targets.shape[1], -(-used // bucket) * bucket)
    if keep == targets.shape[1]:
        return batch
    return batch._replace(inputs=np.asarray(batch.inputs)[:, :keep], targets=targets[:, :keep])


def loss_row_budget(counts: np.ndarray, batch_size: int, groups: int = 1) -> int:
    """How many rows of a batch the output layer's products run on (`LossRows`), from the
    counted positions of every training example (N,) int: the batch's expected count plus
    four standard deviations, rounded up to a multiple of 8 per group (of `groups` devices).
    A batch that needs more (about 1 in 30,000) runs on all its rows, so this is a speed
    setting, never a limit."""
    counts = np.asarray(counts, np.float64)
    expected = batch_size * counts.mean() + 4 * np.sqrt(batch_size) * counts.std()
    step = 8 * groups
    return int(-(-np.ceil(expected) // step) * step)


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
        lora_spec: lora.LoRASpec | None = None,
        ewc_lambda: float = 0.0,
        token_weights: np.ndarray | None = None,
        clip_norm: float | None = None,
        optimizer: str = "adam",
        loss_rows: int | None = None,
    ):
        """`remat`: gradient checkpointing of the GPT-2 blocks (and of the encoder stages).
        `dtype` bfloat16: compute in bfloat16 (mixed precision); parameters and optimizer
        state stay float32. `from_pixels`: batches carry images, which the model's encoder
        and head turn into features inside the step (so the encoder can train).
        `lora_spec`: adapters on its targets (trained at `learning_rates["lora"]`).
        `ewc_lambda` > 0: the EWC penalty with the `EWC` given to `init`.
        `token_weights` (V,): the "weighted-words" loss's per-word weights. `clip_norm`:
        each weight's gradient clipped to that norm on its own (Keras' `clipnorm`).
        `optimizer`: "adam" (optax's) or "keras-adam" (Keras', for v1/v2). `loss_rows`
        (GPT-2 token losses only): the output layer's row budget per global batch
        (`loss_row_budget`), so its products skip the padding; None runs them on every
        position."""
        if loss_rows is not None and loss not in GPT2_LOSSES:
            raise ValueError(f"loss_rows is for the GPT-2 token losses, not {loss!r}")
        if (loss == "weighted-words") != (token_weights is not None):
            raise ValueError("token_weights go with the weighted-words loss, and only there")
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
        self.lora_spec = lora_spec
        self.ewc_lambda = float(ewc_lambda)
        self.token_weights = (None if token_weights is None
                              else np.asarray(token_weights, np.float32))
        self.clip_norm, self.optimizer_name = clip_norm, optimizer
        self.loss_rows = loss_rows
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

    def init(self, params: Mapping[str, Any], seed: int = 0, ewc: EWC | None = None
             ) -> TrainState:
        """Initial state from {path: array} params (every path of the configuration; with a
        LoRA spec, fresh adapters are added unless `params` holds them). `ewc`: the anchor
        and Fisher when `ewc_lambda` > 0."""
        params = self._with_adapters(params, seed)
        if (self.ewc_lambda > 0) != (ewc is not None):
            raise ValueError("EWC needs both ewc_lambda > 0 and its anchor and Fisher")
        self._labels = labels_for(params, self.learning_rates)
        self.optimizer = build_optimizer(self._labels, self.learning_rates,
                                         optimizer=self.optimizer_name,
                                         clip_norm=self.clip_norm)
        trainable, frozen = split_trainable(
            {p: np.asarray(v, np.float32) for p, v in params.items()}, self._labels)
        opt_state = self.optimizer.init({**trainable, **frozen})
        state = TrainState(np.int32(0), trainable, frozen, opt_state,
                           jax.random.key_data(jax.random.key(seed)), ewc or EWC({}, {}))
        self._step, self._eval = self._build_step(), self._build_eval()
        return self._replicate(state)

    def _with_adapters(self, params: Mapping[str, Any], seed: int = 0) -> dict[str, Any]:
        """`params`, plus fresh LoRA adapters when the spec asks for them and none are there."""
        params = dict(params)
        if self.lora_spec is not None and not lora.split_adapters(params)[1]:
            params.update(lora.init_adapters(params, self.lora_spec, seed))
        return params

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
                key_data: np.ndarray, step: int, ewc: EWC | None = None) -> TrainState:
        """The state `host_state` saved: params, optimizer state leaves, RNG key, step (and
        the run's EWC constants)."""
        state = self.init(params, ewc=ewc)
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
        params, adapters = lora.split_adapters(params)
        model = module_from_flat(self.cfg, params)
        if adapters:
            lora.attach(model, adapters, self.lora_spec.scale)
        remat = self.remat and key is not None
        features = features.astype(self.dtype)
        if self.from_pixels:
            features = model.encode(features, remat=remat)
        extra = {}
        if self.loss_rows is not None:
            counted = counted_positions(batch.targets, batch.lengths, self._loss)
            extra["rows"] = LossRows(counted, self.loss_rows, self.mesh.devices.size)
        losses = model.token_losses(features, batch.inputs, batch.targets,
                                    rngs=None if key is None else nnx.Rngs(dropout=key),
                                    remat=remat, **extra)
        loss = mean_counted(losses, batch.targets, batch.lengths, self._loss,
                            self.token_weights)
        return loss + model.regularization() if hasattr(model, "regularization") else loss

    def _build_eval(self) -> Callable:
        def evaluate(state: TrainState, batch: Batch) -> jax.Array:
            return self._loss_fn(state.trainable, state.frozen, batch, None)

        return jax.jit(evaluate, in_shardings=(self.replicated, self.batch_sharding),
                       out_shardings=self.replicated)

    def _build_step(self) -> Callable:
        optimizer, loss_fn, ewc_lambda = self.optimizer, self._loss_fn, self.ewc_lambda

        def objective(trainable, frozen, batch, key, ewc: EWC):
            loss = loss_fn(trainable, frozen, batch, key)
            if not ewc.fisher:
                return loss, loss
            return loss + ewc_lambda * ewc_penalty(trainable, ewc.anchor, ewc.fisher), loss

        def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
            key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
            (_, loss), grads = jax.value_and_grad(objective, has_aux=True)(
                state.trainable, state.frozen, batch, key, state.ewc)
            # Frozen components get set_to_zero updates, which nothing reads: XLA drops them.
            full_grads = {**grads, **jax.tree.map(jnp.zeros_like, state.frozen)}
            updates, opt_state = optimizer.update(full_grads, state.opt_state,
                                                  {**state.trainable, **state.frozen})
            # Adam's update is linear in its learning rate: scaling it scales every rate.
            trainable = optax.apply_updates(
                state.trainable, {p: updates[p] * state.lr_scale for p in state.trainable})
            return (state._replace(step=state.step + 1, trainable=trainable,
                                   opt_state=opt_state),
                    {"loss": loss, "grad_norm": optax.global_norm(grads)})

        return jax.jit(step, donate_argnums=0,
                       in_shardings=(self.replicated, self.batch_sharding),
                       out_shardings=(self.replicated, self.replicated))

    def estimate_ewc(self, params: Mapping[str, Any], batches: Iterable[Batch]) -> EWC:
        """EWC's anchor and diagonal empirical Fisher at `params` (before `init`): for every
        weight this trainer trains (LoRA adapters aside), the weight itself and the mean over
        the examples of `batches` of its squared loss gradient (one example at a time, no
        dropout). ValueError when only adapters train."""
        params = self._with_adapters(params)
        labels = labels_for(params, self.learning_rates)
        paths = [p for p, label in labels.items() if label not in ("frozen", "lora")]
        if not paths:
            raise ValueError("EWC anchors trained weights, and this phase trains none (only "
                             "LoRA adapters)")
        anchored = {p: np.asarray(params[p], np.float32) for p in paths}
        rest = {p: np.asarray(v, np.float32) for p, v in params.items() if p not in anchored}
        loss_fn = self._loss_fn

        def squared_grads(anchored, rest, batch: Batch) -> dict[str, jax.Array]:
            def one(total, row):
                single = Batch(*(x[None] for x in row))
                grads = jax.grad(lambda w: loss_fn(w, rest, single, None))(anchored)
                return jax.tree.map(lambda t, g: t + jnp.square(g), total, grads), None

            return jax.lax.scan(one, jax.tree.map(jnp.zeros_like, anchored), tuple(batch))[0]

        squared = jax.jit(squared_grads, in_shardings=(self.replicated, self.replicated,
                                                       self.batch_sharding))
        anchored_on, rest_on = self._replicate(anchored), self._replicate(rest)
        total, examples = None, 0
        for batch in batches:
            sums = squared(anchored_on, rest_on, self.shard_batch(batch))
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
            examples += len(batch.lengths) * jax.process_count()  # this process's rows
        if total is None:
            raise ValueError("the Fisher needs at least one batch")
        return EWC(anchored, {p: np.asarray(v, np.float32) / examples
                              for p, v in total.items()})

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

    def with_lr_scale(self, state: TrainState, scale: float) -> TrainState:
        """`state` with every learning rate multiplied by `scale` (relative to the phase's)."""
        return state._replace(lr_scale=self._replicate(np.float32(scale)))

    def with_params(self, state: TrainState, params: Mapping[str, Any]) -> TrainState:
        """`state` with the trained weights `params` holds put back (optimizer state and
        everything else kept: Keras' `set_weights`)."""
        trainable = {p: params[p] for p in state.trainable if p in params}
        return state._replace(trainable={**state.trainable, **self._replicate(
            {p: np.asarray(v, np.float32) for p, v in trainable.items()})})

    @staticmethod
    def params(state: TrainState) -> dict[str, np.ndarray]:
        """{path: numpy array} of all parameters in `state`."""
        return {p: np.asarray(v) for p, v in {**state.trainable, **state.frozen}.items()}
