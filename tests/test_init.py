"""Host-side parameter initialisers (`lensjax.models.init`): the distributions flax's and
Keras' initialisers draw, deterministic per key, the same traced as eager, and no XLA
program compiled per parameter shape (what made a fresh model take 20 s to build)."""

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lensjax.models import init
from lensjax.models.layers import Linear

KEY = jax.random.key(7)
SHAPE = (64, 7, 300)  # a (..., in, out) kernel: fan_in 7 * 64 = 448, fan_out 19,200


def _compiles(fn) -> int:
    """How many XLA programs `fn()` compiles."""
    seen = []

    def listen(name, seconds, **_):
        if name.endswith("backend_compile_duration"):
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return len(seen)


@pytest.mark.parametrize("name, make, mean, std, bounds", [
    ("normal", lambda: init.normal(0.02), 0.0, 0.02, None),
    ("lecun_normal", init.lecun_normal, 0.0, (1 / 448) ** 0.5, 2 * (1 / 448) ** 0.5 / 0.8796),
    ("glorot_uniform", init.glorot_uniform, 0.0, (2 / (448 + 19200)) ** 0.5,
     (6 / (448 + 19200)) ** 0.5),
    ("uniform", lambda: init.uniform(0.1), 0.05, 0.1 / 12 ** 0.5, None),
])
def test_each_initialiser_draws_its_distribution(name, make, mean, std, bounds):
    values = np.asarray(make()(KEY, SHAPE))
    assert values.shape == SHAPE and values.dtype == np.float32
    assert abs(values.mean() - mean) < 0.01 * std + 1e-4, name
    assert values.std() == pytest.approx(std, rel=0.01), name
    if bounds is not None:
        assert np.abs(values).max() <= bounds * (1 + 1e-6), name
    if name == "uniform":
        assert values.min() >= 0 and values.max() < 0.1


def test_orthogonal_rows_or_columns_are_orthonormal():
    tall = np.asarray(init.orthogonal()(KEY, (40, 12)), np.float64)
    np.testing.assert_allclose(tall.T @ tall, np.eye(12), atol=1e-5)
    wide = np.asarray(init.orthogonal()(KEY, (12, 40)), np.float64)  # an LSTM's (h, 4h)
    np.testing.assert_allclose(wide @ wide.T, np.eye(12), atol=1e-5)


def test_the_same_key_gives_the_same_values_and_another_key_others():
    draw = init.lecun_normal()
    np.testing.assert_array_equal(draw(KEY, (5, 3)), draw(jax.random.key(7), (5, 3)))
    assert not np.array_equal(draw(KEY, (5, 3)), draw(jax.random.key(8), (5, 3)))
    raw = jax.random.key_data(KEY)  # an old-style uint32 key draws the same
    np.testing.assert_array_equal(draw(raw, (5, 3)), draw(KEY, (5, 3)))
    # One key at two shapes draws unrelated values, not one the prefix of the other (two
    # modules built from equal seeds, as a captioner and its scene probe, would otherwise
    # start with proportional weights; BENCHMARKS.md, "make demo", has the one run measured).
    small, large = np.asarray(init.normal(1.0)(KEY, (8,))), np.asarray(
        init.normal(1.0)(KEY, (4, 8)))
    assert abs(np.corrcoef(small, large[0])[0, 1]) < 0.9
    assert not np.allclose(small, large.ravel()[:8])


def test_traced_construction_gives_the_eager_values():
    eager = Linear(5, 3, rngs=nnx.Rngs(3))
    traced = nnx.jit(lambda: Linear(5, 3, rngs=nnx.Rngs(3)))()
    np.testing.assert_array_equal(eager.kernel[...], traced.kernel[...])
    shapes = nnx.eval_shape(lambda: Linear(5, 3, rngs=nnx.Rngs(3)))
    assert shapes.kernel.shape == (5, 3)


@pytest.mark.parametrize("make", [lambda: init.normal(1.0), init.lecun_normal,
                                  init.glorot_uniform, init.orthogonal,
                                  lambda: init.uniform(0.1)])
def test_initialisers_compile_nothing_per_shape(make):
    draw = make()
    draw(KEY, (2, 3)), init.zeros(KEY, (2, 3))  # what a first call may compile, once
    assert _compiles(lambda: draw(KEY, (13, 17, 19))) == 0
    assert _compiles(lambda: init.zeros(KEY, (23, 29))) == 0
    assert jnp.asarray(init.ones(KEY, (3,))).tolist() == [1.0, 1.0, 1.0]
