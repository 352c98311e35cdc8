"""How a Captioner's weights are stored for inference: layout and dtype, per backend.

Checkpoints and the bridge always hold float32 kernels laid out (in, out). For decoding, the
matmul weights of the Perceiver, GPT-2 and the cross-attention can instead be stored
transposed, (out, in), and in bfloat16; `lensjax.models.layers.Linear` reads either. The
image encoder keeps its checkpoint storage (it runs once per image, compute-bound).

Layouts were chosen by measurement (BENCHMARKS.md): on XLA:CPU a decode-shaped product
`x (rows, in) @ W` streams an (out, in) weight faster than an (in, out) one; GPUs and TPUs
get their layout from the compiler, so the checkpoint's is kept there.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.models.captioner import Captioner
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


def inference_module(module: Captioner, dtype: str | jnp.dtype = "float32",
                     layout: Layout = "auto") -> Captioner:
    """A copy of `module` (sharing unchanged arrays) whose decoder-side matmul weights are
    stored in `layout` and `dtype`. Biases, norms and the image encoder keep theirs."""
    dtype = resolve_dtype(dtype)
    if layout == "auto":
        layout = preferred_layout()
    elif layout not in ("in_out", "out_in"):
        raise ValueError(f"layout must be auto, in_out or out_in, got {layout!r}")
    copy = nnx.merge(*nnx.split(module))
    for path, sub in copy.iter_modules():
        if isinstance(sub, Linear) and path[0] not in IMAGE_COMPONENTS:
            sub.set_storage(transposed=layout == "out_in", dtype=dtype)
    copy.gpt2.wte.embedding = nnx.Param(jnp.asarray(copy.gpt2.wte.embedding[...], dtype))
    return copy
