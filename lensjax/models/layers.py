"""Building blocks shared by the model families, each matching its PyTorch counterpart.

- `Linear`: `nnx.Linear` whose kernel can be stored transposed and in another dtype for fast
  inference (`set_storage`); checkpoints always see the (in, out) float32 kernel.
- `MultiheadAttention`: `torch.nn.MultiheadAttention(batch_first=True)` with the packed
  `in_proj_weight` split into separate `q`, `k`, `v` Linear layers (the bridge packs/unpacks).
- `layer_norm`: LayerNorm with an explicit epsilon and the exact (two-pass) variance.
- `adaptive_avg_pool2d`: torch's `AdaptiveAvgPool2d` window rule, overlap included.
- `dropout`: inverted dropout that is active only when an `nnx.Rngs` is passed (training).
- `fusion_fence`: the identity, as a value XLA computes once (between transformer blocks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax


def layer_norm(num_features: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with torch's exact variance; params `scale`, `bias`."""
    return nnx.LayerNorm(num_features, epsilon=eps, use_fast_variance=False, rngs=rngs)


def gelu_exact(x: jax.Array) -> jax.Array:
    """torch `nn.GELU()` / `F.gelu`: the erf form (timm and torch encoder layers use it)."""
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GPT-2's `gelu_new`: the tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout with probability `rate`; the identity when `rngs` is None (eval)."""
    if rngs is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def fusion_fence(x: jax.Array) -> jax.Array:
    """x (any shape, at least one element), unchanged, as a value XLA must compute once.

    Without it, XLA:CPU fuses the residual stream of every earlier block into the transposed
    operand of each block's weight-gradient product, so the backward pass recomputes it per
    layer with strided reads: a quarter of the v3b training step on CPU. A conditional is a
    fusion boundary that XLA keeps (`lax.optimization_barrier` is dropped by the CPU
    pipeline); its predicate depends on the data and its branches differ (`v + 0` turns -0
    into +0, and runs only when the first element is NaN) so that XLA cannot fold it away.
    Under `vmap` it becomes a select, still the identity."""
    return lax.cond(jnp.isnan(x.reshape(-1)[0]), lambda v: v + 0, lambda v: v, x)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v per head.

    q: (B, T, H, D); k, v: (B, S, H, D); mask: bool, broadcastable to (B, H, T, S), True = attend.
    Returns (B, T, H, D). Softmax runs in float32 whatever the input dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthd,bshd->bhts", q * scale, k).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    weights = dropout(weights, dropout_rate, rngs)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


class Linear(nnx.Linear):
    """`nnx.Linear` (params `kernel` (in, out), `bias` (out,)) whose kernel may be stored
    transposed, (out, in), and in a lower precision, for inference speed (`set_storage`).

    The input is cast to the kernel's dtype for the product, which accumulates and returns in
    the input's dtype: with a bfloat16 kernel and float32 activations only the weights shrink.
    """

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.transposed = False

    def set_storage(self, *, transposed: bool, dtype: jnp.dtype) -> None:
        """Store the kernel as (out, in) when `transposed`, else (in, out), in `dtype`."""
        kernel = self.kernel[...]
        if transposed != self.transposed:
            kernel = kernel.T
        self.kernel = nnx.Param(jnp.asarray(kernel, dtype))
        self.transposed = transposed

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., out), in x's dtype."""
        kernel = self.kernel[...]
        contract = ((x.ndim - 1,), (1 if self.transposed else 0,))
        y = lax.dot_general(x.astype(kernel.dtype), kernel, (contract, ((), ())),
                            preferred_element_type=x.dtype)
        return y + self.bias[...].astype(y.dtype)


def split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(B, T, H*D) -> (B, T, H, D)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, T, H, D) -> (B, T, H*D)."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


class MultiheadAttention(nnx.Module):
    """`torch.nn.MultiheadAttention(dim, num_heads, batch_first=True)`, q/k/v/out as Linears.

    Params: `q`, `k`, `v`, `out` (each `kernel` (dim, dim), `bias` (dim,)).
    """

    def __init__(self, dim: int, num_heads: int, *, dropout_rate: float = 0.0, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.q = Linear(dim, dim, rngs=rngs)
        self.k = Linear(dim, dim, rngs=rngs)
        self.v = Linear(dim, dim, rngs=rngs)
        self.out = Linear(dim, dim, rngs=rngs)

    def project_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of `context` (B, S, dim) -> two (B, S, H, D) arrays.

        Computing these once lets a decoder reuse them for every generated token.
        """
        return split_heads(self.k(context), self.num_heads), split_heads(
            self.v(context), self.num_heads
        )

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        kv: tuple[jax.Array, jax.Array] | None = None,
        mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Attend queries x (B, T, dim) to `context` (B, S, dim), or to precomputed `kv`.

        Returns (B, T, dim).
        """
        if kv is None:
            kv = self.project_kv(x if context is None else context)
        q = split_heads(self.q(x), self.num_heads)
        out = dot_product_attention(
            q, *kv, mask, dropout_rate=self.dropout_rate, rngs=rngs
        )
        return self.out(merge_heads(out))


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) averaging matrix of torch's adaptive average pooling.

    Output cell i averages inputs [floor(i*in/out), ceil((i+1)*in/out)); for in < out
    (7 -> 8) the windows overlap, exactly as `torch.nn.AdaptiveAvgPool2d` does.
    """
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool2d(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torch `AdaptiveAvgPool2d(out_hw)` on NHWC input: (B, H, W, C) -> (B, oh, ow, C)."""
    ph = jnp.asarray(adaptive_pool_matrix(x.shape[1], out_hw[0]), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(x.shape[2], out_hw[1]), x.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", ph, x, pw)
