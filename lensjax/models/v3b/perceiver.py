"""Perceiver resampler: image tokens (B, 64, in_dim) -> latents (B, num_latents, dim).

Two forms, chosen by `PerceiverConfig.layout`:

- `"notebook"` (the trained one, `best_perciever.pth`): `linear` on the image tokens, learned
  `latents`, one `cross_attn` whose output replaces the latents (no residual, no norm), then
  `num_layers` post-norm `nn.TransformerEncoderLayer`s (`self_attn.{i}`).
- `"src"` (LensToWords' `src/model.py`): `img_proj`, `latents`, `cross_attn`,
  `norm1(latents + attn)`, then `norm2(x + ff(x))` with a 4x GELU feed-forward.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.models import init
from lensjax.models.layers import Linear, MultiheadAttention, dropout, gelu_exact, layer_norm


@dataclasses.dataclass(frozen=True)
class PerceiverConfig:
    """Perceiver shape. `ff_dim` is the encoder layers' (notebook) or the 4x block's (src)."""

    layout: Literal["notebook", "src"] = "notebook"
    in_dim: int = 768
    dim: int = 768
    num_latents: int = 16
    num_heads: int = 8
    num_layers: int = 4
    ff_dim: int = 2048
    dropout: float = 0.1
    eps: float = 1e-5

    @classmethod
    def notebook(cls) -> PerceiverConfig:
        return cls()

    @classmethod
    def src(cls) -> PerceiverConfig:
        return cls(layout="src", num_layers=0, ff_dim=3072)

    def build(self, *, rngs: nnx.Rngs) -> Perceiver | SrcPerceiver:
        return (Perceiver if self.layout == "notebook" else SrcPerceiver)(self, rngs=rngs)


class TransformerEncoderLayer(nnx.Module):
    """`nn.TransformerEncoderLayer(dim, heads, ff_dim, activation='gelu', batch_first=True)`.

    Post-norm: x = norm1(x + sa(x)); x = norm2(x + linear2(gelu(linear1(x)))), eps 1e-5.
    """

    def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
        self.rate = cfg.dropout
        self.self_attn = MultiheadAttention(
            cfg.dim, cfg.num_heads, dropout_rate=cfg.dropout, rngs=rngs
        )
        self.linear1 = Linear(cfg.dim, cfg.ff_dim, rngs=rngs)
        self.linear2 = Linear(cfg.ff_dim, cfg.dim, rngs=rngs)
        self.norm1 = layer_norm(cfg.dim, cfg.eps, rngs=rngs)
        self.norm2 = layer_norm(cfg.dim, cfg.eps, rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """(B, N, dim) -> (B, N, dim)."""
        x = self.norm1(x + dropout(self.self_attn(x, rngs=rngs), self.rate, rngs))
        hidden = dropout(gelu_exact(self.linear1(x)), self.rate, rngs)
        return self.norm2(x + dropout(self.linear2(hidden), self.rate, rngs))


def _broadcast_latents(latents: nnx.Param, batch: int) -> jax.Array:
    return jnp.broadcast_to(latents[...], (batch, *latents.shape))


class Perceiver(nnx.Module):
    """The trained (notebook) Perceiver. (B, S, in_dim) -> (B, num_latents, dim)."""

    def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
        self.linear = Linear(cfg.in_dim, cfg.dim, rngs=rngs)
        self.latents = nnx.Param(init.normal(1.0)(rngs.params(), (cfg.num_latents, cfg.dim)))
        self.cross_attn = MultiheadAttention(cfg.dim, cfg.num_heads, rngs=rngs)
        self.self_attn = nnx.List(
            [TransformerEncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        )

    def __call__(self, features: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        tokens = self.linear(features)
        x = self.cross_attn(_broadcast_latents(self.latents, features.shape[0]), tokens)
        for layer in self.self_attn:
            x = layer(x, rngs=rngs)
        return x


class SrcPerceiver(nnx.Module):
    """The `src/model.py` Perceiver. (B, S, in_dim) -> (B, num_latents, dim)."""

    def __init__(self, cfg: PerceiverConfig, *, rngs: nnx.Rngs):
        self.latents = nnx.Param(init.normal(1.0)(rngs.params(), (cfg.num_latents, cfg.dim)))
        self.img_proj = Linear(cfg.in_dim, cfg.dim, rngs=rngs)
        self.cross_attn = MultiheadAttention(cfg.dim, cfg.num_heads, rngs=rngs)
        self.norm1 = layer_norm(cfg.dim, cfg.eps, rngs=rngs)
        self.ff_in = Linear(cfg.dim, cfg.ff_dim, rngs=rngs)
        self.ff_out = Linear(cfg.ff_dim, cfg.dim, rngs=rngs)
        self.norm2 = layer_norm(cfg.dim, cfg.eps, rngs=rngs)

    def __call__(self, features: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """`rngs` is accepted for a uniform interface; this form has no dropout."""
        latents = _broadcast_latents(self.latents, features.shape[0])
        x = self.norm1(latents + self.cross_attn(latents, self.img_proj(features)))
        return self.norm2(x + self.ff_out(gelu_exact(self.ff_in(x))))
