"""How a captioner's weights are stored for inference: layout and dtype, per backend.

Checkpoints and the bridge always hold float32 kernels laid out (in, out). For decoding, the
decoder side's matmul weights (v3b: the Perceiver, GPT-2 and the cross-attention; v3a: the
projection head and the Transformer) can instead be stored transposed, (out, in), and in
bfloat16; `lensjax.models.layers.Linear` reads either, and the token embedding tables are
stored in that dtype too. The image encoder keeps its checkpoint storage (it runs once per
image, compute-bound).

Layouts were chosen by measurement (BENCHMARKS.md): on XLA:CPU a decode-shaped product
`x (rows, in) @ W` streams an (out, in) weight faster than an (in, out) one; GPUs and TPUs
get their layout from the compiler, so the checkpoint's is kept there.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.models.layers import Linear

Layout = Literal["auto", "in_out", "out_in"]
DTYPES = ("float32", "bfloat16")
IMAGE_COMPONENTS = ("encoder", "encoder_head")


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """"float32" or "bfloat16" (or the numpy dtype) -> the dtype; ValueError otherwise."""
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return jnp.dtype(name)


def preferred_layout(backend: str | None = None) -> Literal["in_out", "out_in"]:
    """The kernel layout that decodes fastest on `backend` (default: JAX's default backend)."""
    return "out_in" if (backend or jax.default_backend()) == "cpu" else "in_out"


def inference_module(module: nnx.Module, dtype: str | jnp.dtype = "float32",
                     layout: Layout = "auto") -> nnx.Module:
    """A copy of `module` (sharing unchanged arrays) whose decoder-side matmul weights and
    token embeddings (the tables with a row per vocabulary entry) are stored in `layout` and
    `dtype`. Biases, norms, position tables and the image encoder keep theirs."""
    dtype = resolve_dtype(dtype)
    if layout == "auto":
        layout = preferred_layout()
    elif layout not in ("in_out", "out_in"):
        raise ValueError(f"layout must be auto, in_out or out_in, got {layout!r}")
    copy = nnx.merge(*nnx.split(module))
    for path, sub in copy.iter_modules():
        if not path or path[0] in IMAGE_COMPONENTS:
            continue
        if isinstance(sub, Linear):
            sub.set_storage(transposed=layout == "out_in", dtype=dtype)
        elif isinstance(sub, nnx.Embed) and sub.num_embeddings == copy.cfg.vocab_size:
            sub.embedding = nnx.Param(jnp.asarray(sub.embedding[...], dtype))
    return copy
