"""`output_cross_entropy` is the cross-entropy of the full logits, its gradients included, and
the training step's loss is `caption_loss` of the model's own logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lensjax.models.output_loss import LossRows, output_cross_entropy
from lensjax.models.v3a.config import PRESETS as V3A_PRESETS
from lensjax.models.v3b.captioner import PRESETS
from lensjax.params import flat_params, module_from_flat, new_module
from lensjax.train.step import Batch, Trainer, caption_loss, loss_row_budget

jax.config.update("jax_default_matmul_precision", "highest")


def _reference(hidden, weight, bias, targets):
    logits = jnp.einsum("...d,vd->...v", hidden, weight)
    if bias is not None:
        logits = logits + bias
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def _case(vocab: int, rows: tuple[int, ...], dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(*rows, dim)), jnp.float32),
            jnp.asarray(rng.normal(size=(vocab, dim)) * 0.3, jnp.float32),
            jnp.asarray(rng.normal(size=(vocab,)), jnp.float32),
            jnp.asarray(rng.integers(0, vocab, rows)))


@pytest.mark.parametrize("vocab, chunk", [(96, 32), (101, 32), (20, 32)],
                         ids=["whole-chunks", "partial-last-chunk", "one-partial-chunk"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_losses_and_gradients_equal_those_of_the_full_logits(vocab, chunk, with_bias):
    hidden, weight, bias, targets = _case(vocab, (3, 5), 8)
    bias = bias if with_bias else None
    weights = jnp.linspace(0.5, 2.0, 15).reshape(3, 5)  # a non-uniform upstream gradient

    def total(fn):
        return lambda h, w, b: jnp.sum(fn(h, w, b) * weights)

    ours = lambda h, w, b: output_cross_entropy(h, w, b, targets, chunk)  # noqa: E731
    theirs = lambda h, w, b: _reference(h, w, b, targets)  # noqa: E731
    np.testing.assert_allclose(ours(hidden, weight, bias), theirs(hidden, weight, bias),
                               rtol=1e-6, atol=1e-6)
    argnums = (0, 1, 2) if with_bias else (0, 1)
    got = jax.grad(total(ours), argnums)(hidden, weight, bias)
    want = jax.grad(total(theirs), argnums)(hidden, weight, bias)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_large_logits_do_not_overflow():
    hidden, weight, bias, targets = _case(50, (4,), 6)
    hidden = hidden * 300.0  # logits in the thousands: exp would overflow without the max
    got = output_cross_entropy(hidden, weight, bias, targets, 16)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _reference(hidden, weight, bias, targets), rtol=1e-5)


def test_bfloat16_inputs_give_float32_losses_close_to_float32():
    hidden, weight, bias, targets = _case(70, (2, 3), 16)
    low = output_cross_entropy(hidden.astype(jnp.bfloat16), weight.astype(jnp.bfloat16),
                               bias, targets, 32)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, _reference(hidden, weight, bias, targets), rtol=0.03,
                               atol=0.03)
    grads = jax.grad(lambda h, w: jnp.sum(output_cross_entropy(h, w, bias, targets, 32)),
                     (0, 1))(hidden.astype(jnp.bfloat16), weight.astype(jnp.bfloat16))
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


# 6 x 9 positions, 25 counted: by groups of 2 rows (3 groups), 4, 11 and 10; of 3 rows, 12
# and 13.
COUNTED = np.arange(9)[None, :] < np.array([[4], [0], [8], [3], [7], [3]])


@pytest.mark.parametrize("budget, groups, gathered", [
    (25, 1, True), (32, 1, True), (26, 2, True), (33, 3, True),
    (24, 1, False), (24, 2, False), (54, 1, False)],
    ids=["exact", "spare", "two-groups", "three-groups", "overflow", "one-group-overflows",
         "no-saving"])
def test_gathered_rows_give_the_losses_and_gradients_of_every_row(budget, groups, gathered):
    hidden, weight, bias, targets = _case(70, (6, 9), 8, seed=3)
    counted = jnp.asarray(COUNTED)

    def total(h, w, b, rows):
        return jnp.sum(output_cross_entropy(h, w, b, targets, 32, rows) * counted)

    rows = LossRows(counted, budget, groups)
    losses = output_cross_entropy(hidden, weight, bias, targets, 32, rows)
    full = output_cross_entropy(hidden, weight, bias, targets, 32)
    np.testing.assert_allclose(losses, jnp.where(counted, full, 0), rtol=1e-6, atol=1e-6)
    got = jax.grad(total, (0, 1, 2))(hidden, weight, bias, rows)
    want = jax.grad(total, (0, 1, 2))(hidden, weight, bias, None)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # The program holds the products on the budget's rows (with all 54 as the fallback)
    # when the budget is below the batch's rows.
    program = str(jax.make_jaxpr(lambda h: total(h, weight, bias, rows))(hidden))
    if budget < 54:
        assert f"f32[{-(-budget // groups) * groups},8]" in program
    # Which branch ran: only the gathered one never reads an uncounted position, so NaN there
    # leaves the weight's gradient finite.
    poisoned = jnp.where(counted[..., None], hidden, jnp.nan)
    weight_grad = jax.grad(total, 1)(poisoned, weight, bias, rows)
    assert bool(jnp.all(jnp.isfinite(weight_grad))) == gathered


def test_the_row_budget_covers_the_expected_count_plus_four_deviations():
    counts = np.array([10, 14] * 50)  # mean 12, standard deviation 2
    assert loss_row_budget(counts, 16) == 16 * 12 + 32  # 224, a multiple of 8
    assert loss_row_budget(counts, 16, groups=4) == 224  # a multiple of 32 too
    assert loss_row_budget(counts, 3) == 56  # 36 + 13.9 rounded up to 8s


def _batch(cfg, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    lengths = np.array([3, 6], np.int32)
    inputs = rng.integers(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    targets = np.full((2, 8), 50256, np.int32)
    for row, length in enumerate(lengths):
        targets[row, :length] = rng.integers(0, 50000, length)
    features = rng.normal(size=(2, 5, cfg.feature_dim)).astype(np.float32)
    return Batch(features, inputs, targets, lengths)


@pytest.mark.parametrize("preset", ["v3b-tiny", "v3b-tiny-prepend", "v3a-tiny"])
def test_the_training_loss_is_caption_loss_of_the_models_logits(preset):
    if preset.startswith("v3a"):
        cfg = dataclasses.replace(V3A_PRESETS["v3a-tiny"], encoder=None, head=None)
    else:
        cfg = dataclasses.replace(PRESETS["tiny"], encoder=None, head=None,
                                  mode="prepend" if preset.endswith("prepend") else "inject")
    params = flat_params(new_module(cfg, seed=1))
    trainer = Trainer(cfg, {name: 1e-3 for name in ("perceiver", "gpt2", "projection_head",
                                                      "decoder")
                            if any(p.startswith(name + ".") for p in params)})
    state = trainer.init(params)
    batch = _batch(cfg)
    logits = module_from_flat(cfg, params)(jnp.asarray(batch.features),
                                           jnp.asarray(batch.inputs))
    want = float(caption_loss(logits, jnp.asarray(batch.targets), jnp.asarray(batch.lengths)))
    assert trainer.eval_loss(state, batch) == pytest.approx(want, rel=1e-5)
    # Gathering the counted rows (9 of 16 here) changes nothing.
    gathered = Trainer(cfg, trainer.learning_rates, loss_rows=10)
    assert gathered.eval_loss(gathered.init(params), batch) == pytest.approx(want, rel=1e-5)
