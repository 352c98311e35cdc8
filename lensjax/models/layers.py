"""Building blocks shared by the model families, each matching its PyTorch counterpart.

- `Linear`: `nnx.Linear` whose kernel can be stored transposed and in another dtype for fast
  inference (`set_storage`); checkpoints always see the (in, out) float32 kernel.
- `MultiheadAttention`: `torch.nn.MultiheadAttention(batch_first=True)` with the packed
  `in_proj_weight` split into separate `q`, `k`, `v` Linear layers (the bridge packs/unpacks).
- `dot_product_attention` / `attend`: softmax attention per head; `attend` takes keys and values
  in the layouts its products read, as `MultiheadAttention.project_kv` returns them.
- `layer_norm`: LayerNorm with an explicit epsilon and the exact (two-pass) variance.
- `adaptive_avg_pool2d`: torch's `AdaptiveAvgPool2d` window rule, overlap included.
- `dropout`: inverted dropout that is active only when an `nnx.Rngs` is passed (training).
- `fusion_fence`: the identity, as a value XLA computes once (between transformer blocks).
- `DepthwiseConv2d`: `nn.Conv2d(C, C, k, padding=k // 2, groups=C)` as k*k shifted
  multiply-adds, which XLA fuses into one loop (its grouped convolution is 15-70x slower on
  CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lensjax.models import init


def layer_norm(num_features: int, eps: float, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with torch's exact variance; params `scale`, `bias`."""
    return nnx.LayerNorm(num_features, epsilon=eps, use_fast_variance=False,
                         scale_init=init.ones, bias_init=init.zeros, rngs=rngs)


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
    return attend(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), mask,
                  dropout_rate=dropout_rate, rngs=rngs)


def attend(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array | None = None,
    *,
    dropout_rate: float = 0.0,
    rngs: nnx.Rngs | None = None,
) -> jax.Array:
    """`dot_product_attention` with keys (B, H, D, S) and values (B, H, S, D), the layouts its
    two products read: keys and values computed once (cross-attention while decoding) are
    stored this way, so that no step transposes them again. q (B, T, H, D) -> (B, T, H, D).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bthd,bhds->bhts", q * scale, keys).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    weights = dropout(weights, dropout_rate, rngs)
    return jnp.einsum("bhts,bhsd->bthd", weights, values)


class Linear(nnx.Linear):
    """`nnx.Linear` (params `kernel` (in, out), `bias` (out,)) whose kernel may be stored
    transposed, (out, in), and in a lower precision, for inference speed (`set_storage`).

    The input is cast to the kernel's dtype for the product, which accumulates and returns in
    the input's dtype: with a bfloat16 kernel and float32 activations only the weights shrink.
    """

    def __init__(self, in_features: int, out_features: int, **kwargs):
        kwargs.setdefault("kernel_init", init.lecun_normal())
        kwargs.setdefault("bias_init", init.zeros)
        super().__init__(in_features, out_features, **kwargs)
        self.transposed = False
        # (A (in, r), B (r, out), scale) while training a LoRA adapter (lensjax.lora.attach)
        self.lora: tuple[jax.Array, jax.Array, float] | None = None

    def set_storage(self, *, transposed: bool, dtype: jnp.dtype) -> None:
        """Store the kernel as (out, in) when `transposed`, else (in, out), in `dtype`."""
        kernel = self.kernel[...]
        if transposed != self.transposed:
            kernel = kernel.T
        self.kernel = nnx.Param(jnp.asarray(kernel, dtype))
        self.transposed = transposed

    def output_weight(self) -> jax.Array:
        """The kernel as an (out, in) matrix, a LoRA adapter merged in: what
        `lensjax.models.output_loss` reads."""
        kernel = self.kernel[...]
        kernel = kernel if self.transposed else kernel.T
        if self.lora is None:
            return kernel
        a, b, scale = self.lora
        return kernel + (scale * (a @ b)).T.astype(kernel.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., in) -> (..., out), in x's dtype."""
        kernel = self.kernel[...]
        contract = ((x.ndim - 1,), (1 if self.transposed else 0,))
        y = lax.dot_general(x.astype(kernel.dtype), kernel, (contract, ((), ())),
                            preferred_element_type=x.dtype)
        if self.lora is not None:
            a, b, scale = self.lora
            y = y + scale * ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))
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
        """Keys (B, H, D, S) and values (B, H, S, D) of `context` (B, S, dim), in the layouts
        `attend` reads.

        Computing these once lets a decoder reuse them for every generated token.
        """
        keys = split_heads(self.k(context), self.num_heads).transpose(0, 2, 3, 1)
        values = split_heads(self.v(context), self.num_heads).transpose(0, 2, 1, 3)
        return keys, values

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
        out = attend(q, *kv, mask, dropout_rate=self.dropout_rate, rngs=rngs)
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


def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise 'same' cross-correlation: x (B, H, W, C), kernel (k, k, C) -> (B, H, W, C)."""
    k = kernel.shape[0]
    batch, height, width, channels = x.shape
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))

    def row(i: jax.Array, out: jax.Array) -> jax.Array:  # the k taps of kernel row i
        rows = lax.dynamic_slice_in_dim(padded, i, height, axis=1)
        taps = lax.dynamic_index_in_dim(kernel, i, keepdims=False)
        for j in range(k):
            out = out + rows[:, :, j : j + width] * taps[j]
        return out

    return lax.fori_loop(0, k, row, jnp.zeros((batch, height, width, channels), x.dtype))


@jax.custom_vjp
def depthwise_conv2d(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (B, H, W, C), kernel (k, k, C), k odd -> (B, H, W, C), zero padding k // 2.

    The backward pass is written out: the input gradient is the same sum over the flipped
    kernel, and the kernel gradient a loop of k*k multiply-reductions (autodiff of the slices
    would build k*k padded copies)."""
    return _shifted_sum(x, kernel)


def _depthwise_forward(x: jax.Array, kernel: jax.Array):
    return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_backward(residuals, grad: jax.Array):
    x, kernel = residuals
    k = kernel.shape[0]
    height, width = x.shape[1:3]
    padded = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))

    def tap(offset: jax.Array) -> jax.Array:  # d_kernel[i, j] for offset = i * k + j
        window = lax.dynamic_slice(padded, (0, offset // k, offset % k, 0), grad.shape)
        return jnp.sum(window * grad, axis=(0, 1, 2))

    # One loop body for the k*k taps, not k*k reductions: XLA compiles it in a fraction of
    # the time (the unrolled form took 5x longer to compile for the same speed).
    d_kernel = lax.map(tap, jnp.arange(k * k)).reshape(k, k, -1)
    return _shifted_sum(grad, kernel[::-1, ::-1]), d_kernel.astype(kernel.dtype)


depthwise_conv2d.defvjp(_depthwise_forward, _depthwise_backward)


class DepthwiseConv2d(nnx.Module):
    """`nn.Conv2d(C, C, k, padding=k // 2, groups=C)` on NHWC input. Parameters as
    `nnx.Conv(C, C, (k, k), feature_group_count=C)` holds them: `kernel` (k, k, 1, C) (HWIO)
    and `bias` (C,), initialised the same way."""

    def __init__(self, channels: int, kernel_size: int, *, rngs: nnx.Rngs):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.kernel = nnx.Param(init.lecun_normal()(
            rngs.params(), (kernel_size, kernel_size, 1, channels), jnp.float32))
        self.bias = nnx.Param(init.zeros(None, (channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        kernel = self.kernel[...][:, :, 0, :]
        return depthwise_conv2d(x, kernel.astype(x.dtype)) + self.bias[...].astype(x.dtype)
