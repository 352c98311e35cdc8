"""Parameter initialisers that draw on the host, with numpy, instead of in XLA.

`jax.nn.initializers` compile one XLA program per parameter shape (`jax.random.normal` and
`truncated_normal` carry an inverse error function each): about 0.3 s a shape on a 2-core
CPU, so building a fresh `demo` captioner took 22 s and a fresh v3b 19 s, all of it
compiling. These initialisers draw the same distributions with numpy, from a generator
seeded by the JAX key they are given, and build a model in well under a second. They keep
`nnx`'s initialiser signature `init(key, shape, dtype)` and are deterministic per key (the
values are not `jax.random`'s). Under tracing (`nnx.eval_shape`, `jax.jit`), the draw runs
as a host callback, so a traced construction gives the same values as an eager one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]
# The standard deviation of a standard normal truncated to [-2, 2] (jax's constant).
_TRUNCATED_STD = 0.87962566103423978


def _key_words(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def _on_host(draw: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
             ) -> Initializer:
    """An initialiser from `draw(generator, shape) -> array` (cast to the dtype asked for)."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(s) for s in shape)

        def host(words) -> np.ndarray:
            # The shape is part of the seed: one key drawn at two shapes gives unrelated
            # values, as jax.random's do, not one the prefix of the other.
            seed = [*np.asarray(words, np.uint32).ravel().tolist(), len(shape), *shape]
            return np.asarray(draw(np.random.default_rng(seed), shape), dtype)

        words = _key_words(key)
        if isinstance(words, jax.core.Tracer):
            return jax.pure_callback(host, jax.ShapeDtypeStruct(shape, dtype), words)
        return jax.device_put(host(words))  # (jnp.asarray compiles a copy per shape)

    return init


def _truncated(generator: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A standard normal truncated to [-2, 2] (redrawing what falls outside), float32."""
    values = generator.standard_normal(shape, np.float32)
    outside = np.abs(values) > 2
    while outside.any():
        values[outside] = generator.standard_normal(int(outside.sum()), np.float32)
        outside = np.abs(values) > 2
    return values


def normal(stddev: float = 1e-2) -> Initializer:
    """N(0, stddev^2)."""
    return _on_host(lambda g, shape: g.standard_normal(shape, np.float32) * np.float32(stddev))


def uniform(scale: float = 1e-2) -> Initializer:
    """U[0, scale), as `jax.nn.initializers.uniform`."""
    return _on_host(lambda g, shape: g.uniform(0.0, scale, shape))


def _fans(shape: tuple[int, ...]) -> tuple[float, float]:
    """(fan_in, fan_out) of a (..., in, out) kernel, the leading axes its receptive field."""
    if len(shape) < 2:
        raise ValueError(f"fans of a {len(shape)}-d shape {shape}: need (..., in, out)")
    receptive = math.prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def lecun_normal() -> Initializer:
    """A normal truncated to two standard deviations, scaled to variance 1 / fan_in (flax's
    default kernel initialiser)."""
    return _on_host(lambda g, shape: _truncated(g, shape) * np.float32(
        math.sqrt(1.0 / _fans(shape)[0]) / _TRUNCATED_STD))


def glorot_uniform() -> Initializer:
    """U(-limit, limit) with limit = sqrt(6 / (fan_in + fan_out)) (Keras' default)."""

    def draw(g, shape):
        limit = math.sqrt(6.0 / sum(_fans(shape)))
        return g.uniform(-limit, limit, shape)

    return _on_host(draw)


def orthogonal() -> Initializer:
    """A matrix with orthonormal rows or columns (whichever are fewer), columns on the last
    axis (Keras' recurrent initialiser)."""

    def draw(g, shape):
        rows, columns = math.prod(shape[:-1]), shape[-1]
        matrix = g.standard_normal((max(rows, columns), min(rows, columns)))
        q, r = np.linalg.qr(matrix)
        q = q * np.sign(np.diag(r))
        return (q if rows >= columns else q.T).reshape(shape)

    return _on_host(draw)


def zeros(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Zeros, made on the host (no compiled broadcast per shape)."""
    return jax.device_put(np.zeros(tuple(shape), dtype))


def ones(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Ones, made on the host."""
    return jax.device_put(np.ones(tuple(shape), dtype))
