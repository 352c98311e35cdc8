"""EWC: the penalty is zero at the anchor with gradient lambda * F * (w - w*), the Fisher is
the mean squared per-example gradient, and the step adds the penalty's pull."""

import jax
import numpy as np
import pytest

from lensjax.train.step import EWC, Batch, Trainer, ewc_penalty
from tests.test_training import CFG, _batch, _params


def test_penalty_is_zero_at_the_anchor_and_its_gradient_is_f_times_the_shift():
    rng = np.random.default_rng(0)
    anchor = {"a": rng.standard_normal((3, 4)).astype(np.float32),
              "b": rng.standard_normal(5).astype(np.float32)}
    fisher = {p: rng.uniform(0, 2, v.shape).astype(np.float32) for p, v in anchor.items()}
    assert float(ewc_penalty(anchor, anchor, fisher)) == 0.0
    moved = {p: v + rng.standard_normal(v.shape).astype(np.float32) for p, v in anchor.items()}
    lam = 3.0
    grads = jax.grad(lambda w: lam * ewc_penalty(w, anchor, fisher))(moved)
    for p in anchor:
        np.testing.assert_allclose(grads[p], lam * fisher[p] * (moved[p] - anchor[p]),
                                   rtol=1e-6)


def test_fisher_is_the_mean_squared_per_example_gradient():
    params = _params()
    trainer = Trainer(CFG, {"xattn": 1e-3})
    batch = _batch(rows=3)
    with jax.default_matmul_precision("highest"):
        anchor, fisher = trainer.estimate_ewc(params, [batch])
        state = trainer.init(params)
        assert all(np.array_equal(anchor[p], params[p]) for p in fisher)
        path = "gpt2.xattn.0.cross_attn.q.kernel"
        assert set(fisher) == {p for p in params if p.startswith("gpt2.xattn.")}
        squares = []
        for row in range(3):
            single = Batch(*(np.asarray(x)[row : row + 1] for x in batch))
            loss = trainer._loss_fn  # the same loss the step uses

            def one(w, single=single, loss=loss):
                trainable = {**state.trainable, path: w}
                return loss(trainable, state.frozen, single, None)

            squares.append(np.square(np.asarray(jax.grad(one)(state.trainable[path]))))
    np.testing.assert_allclose(fisher[path], np.mean(squares, axis=0), rtol=1e-4, atol=1e-12)


def test_a_step_with_ewc_follows_the_loss_plus_the_penalty():
    params = _params()
    batch = _batch()
    plain = Trainer(CFG, {"xattn": 1e-3})
    state = plain.init(params)
    fisher = {p: np.full(v.shape, 1e3, np.float32) for p, v in params.items()
              if p.startswith("gpt2.xattn.")}
    shifted = {p: params[p] + np.float32(0.05) for p in fisher}  # the anchor, away from w
    ewc = Trainer(CFG, {"xattn": 1e-3}, ewc_lambda=1.0)
    with pytest.raises(ValueError, match="EWC"):
        ewc.init(params)
    ewc_state = ewc.init(params, ewc=EWC(shifted, fisher))
    _, plain_metrics = plain.step(state, batch)
    after, metrics = ewc.step(ewc_state, batch)
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-6)  # caption loss
    assert metrics["grad_norm"] > 10 * plain_metrics["grad_norm"]  # the penalty dominates
    moved = ewc.params(after)
    path = "gpt2.xattn.0.cross_attn.q.kernel"
    assert np.all(moved[path] > params[path])  # pulled towards the anchor (Adam: +lr each)
