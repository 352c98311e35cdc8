"""GPT-2 small with image cross-attention, in the three forms LensToWords used.

- inject, per-layer cross-attention (`xattn="per_layer"`, the released v3b model): for each layer
  `x += attn(ln_1 x)`; `x += xattn[i].cross_attn(q=xattn[i].layernorm(x), k=v=latents)`;
  `x += mlp(ln_2 x)`.
- inject, one shared post-norm cross-attention after each whole block (`xattn="shared"`,
  `src/model.py`): `x = block(x)`; `x = xattn.norm(x + xattn.attn(x, latents))`.
- prepend (phases 2a/2b): the latents are placed before the token embeddings, positions run
  over the whole sequence, and no cross-attention is applied.

Parameter names follow HF's `GPT2LMHeadModel.transformer` (`wte`, `wpe`, `h.{i}.ln_1`,
`h.{i}.attn.c_attn`, ...). GPT-2's Conv1D weights are (in, out), exactly a Flax kernel.
The LM head is tied to `wte`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lensjax.models import init
from lensjax.models.kv_cache import KVCache, cached_attention, empty_caches, write_cache
from lensjax.models.layers import (
    Linear,
    MultiheadAttention,
    dot_product_attention,
    dropout,
    fusion_fence,
    gelu_tanh,
    layer_norm,
    merge_heads,
    split_heads,
)

Mode = Literal["inject", "prepend"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 shape and dropout rates (HF names); `xattn` picks the cross-attention form."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    eps: float = 1e-5
    attn_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.0
    xattn: Literal["per_layer", "shared"] = "per_layer"
    xattn_heads: int = 12
    xattn_eps: float = 1e-5

    @classmethod
    def gpt2(cls) -> GPT2Config:
        """GPT-2 small as the notebooks ran it (no embedding dropout)."""
        return cls()

    @classmethod
    def src(cls) -> GPT2Config:
        """`src/model.py`: one shared cross-attention, HF's embedding dropout."""
        return cls(xattn="shared", embd_pdrop=0.1)

    @classmethod
    def tiny(cls) -> GPT2Config:
        return cls(n_positions=128, n_embd=64, n_layer=2, n_head=4, xattn_heads=4)


def _gpt2_linear(n_in: int, n_out: int, rngs: nnx.Rngs) -> Linear:
    return Linear(n_in, n_out, kernel_init=init.normal(0.02), rngs=rngs)


class GPT2Attention(nnx.Module):
    """Causal self-attention: `c_attn` (n, 3n) packs q, k, v columns; `c_proj` (n, n)."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.num_heads = cfg.n_head
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_pdrop = cfg.resid_pdrop
        self.c_attn = _gpt2_linear(cfg.n_embd, 3 * cfg.n_embd, rngs)
        self.c_proj = _gpt2_linear(cfg.n_embd, cfg.n_embd, rngs)

    def __call__(
        self,
        x: jax.Array,
        *,
        cache: KVCache | None = None,
        position: jax.Array | int = 0,
        origin: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x (B, T, n) -> (B, T, n), and the cache with this call's keys/values written.

        Without a cache, x is the whole sequence. With one, x holds positions
        `position .. position+T-1` and attends to everything cached before them, through
        `origin` (see `lensjax.models.kv_cache.cached_attention`).
        """
        q, k, v = (split_heads(t, self.num_heads) for t in jnp.split(self.c_attn(x), 3, -1))
        length = x.shape[1]
        if cache is None:
            mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
            out = dot_product_attention(q, k, v, mask, dropout_rate=self.attn_pdrop, rngs=rngs)
        else:
            cache = write_cache(cache, k, v, position)
            out = cached_attention(q, cache, position, origin)
        return dropout(self.c_proj(merge_heads(out)), self.resid_pdrop, rngs), cache


class GPT2MLP(nnx.Module):
    """`c_fc` (n, 4n), tanh GELU, `c_proj` (4n, n), residual dropout."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.resid_pdrop = cfg.resid_pdrop
        self.c_fc = _gpt2_linear(cfg.n_embd, 4 * cfg.n_embd, rngs)
        self.c_proj = _gpt2_linear(4 * cfg.n_embd, cfg.n_embd, rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return dropout(self.c_proj(gelu_tanh(self.c_fc(x))), self.resid_pdrop, rngs)


class GPT2Block(nnx.Module):
    """One GPT-2 layer, split in two halves so cross-attention can go between them."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = layer_norm(cfg.n_embd, cfg.eps, rngs=rngs)
        self.attn = GPT2Attention(cfg, rngs=rngs)
        self.ln_2 = layer_norm(cfg.n_embd, cfg.eps, rngs=rngs)
        self.mlp = GPT2MLP(cfg, rngs=rngs)

    def self_attention(
        self,
        x: jax.Array,
        *,
        cache: KVCache | None = None,
        position: jax.Array | int = 0,
        origin: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        out, cache = self.attn(self.ln_1(x), cache=cache, position=position, origin=origin,
                               rngs=rngs)
        return x + out, cache

    def feed_forward(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        return x + self.mlp(self.ln_2(x), rngs=rngs)


class CrossAttentionBlock(nnx.Module):
    """Per-layer, pre-norm: x + cross_attn(q=layernorm(x), k=v=latents)."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.layernorm = layer_norm(cfg.n_embd, cfg.xattn_eps, rngs=rngs)
        self.cross_attn = MultiheadAttention(cfg.n_embd, cfg.xattn_heads, rngs=rngs)

    def project_kv(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.cross_attn.project_kv(latents)

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array]) -> jax.Array:
        """x (B, T, n), kv = project_kv(latents (B, L, n)) -> (B, T, n)."""
        return x + self.cross_attn(self.layernorm(x), kv=kv)


class SharedCrossAttention(nnx.Module):
    """`src/model.py`'s CrossAttention, post-norm: norm(x + attn(x, latents, latents))."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.attn = MultiheadAttention(cfg.n_embd, cfg.xattn_heads, rngs=rngs)
        self.norm = layer_norm(cfg.n_embd, cfg.xattn_eps, rngs=rngs)

    def project_kv(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.attn.project_kv(latents)

    def __call__(self, x: jax.Array, kv: tuple[jax.Array, jax.Array]) -> jax.Array:
        return self.norm(x + self.attn(x, kv=kv))


class GPT2Decoder(nnx.Module):
    """GPT-2 LM with image conditioning. Params: `wte`, `wpe`, `h.{i}`, `xattn`, `ln_f`."""

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        embed_init = init.normal(0.02)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed_init, rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, embedding_init=embed_init, rngs=rngs)
        self.h = nnx.List([GPT2Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.xattn = (
            nnx.List([CrossAttentionBlock(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
            if cfg.xattn == "per_layer"
            else SharedCrossAttention(cfg, rngs=rngs)
        )
        self.ln_f = layer_norm(cfg.n_embd, cfg.eps, rngs=rngs)

    def cross_kv(self, latents: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Cross-attention keys/values of the latents, one pair per layer (shared: one pair).

        Computed once per image and reused for every generated token.
        """
        if isinstance(self.xattn, SharedCrossAttention):
            return [self.xattn.project_kv(latents)]
        return [block.project_kv(latents) for block in self.xattn]

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, slots: int = 1
                   ) -> list[KVCache]:
        """Empty self-attention caches for `batch` images with `slots` rows each (beams) and
        `max_len` positions, one per layer."""
        if max_len > self.cfg.n_positions:
            raise ValueError(f"{max_len} positions exceed n_positions={self.cfg.n_positions}")
        return empty_caches(self.cfg.n_layer, batch, self.cfg.n_head,
                            self.cfg.n_embd // self.cfg.n_head, max_len, dtype, slots)

    def embed(self, input_ids: jax.Array, latents: jax.Array | None = None) -> jax.Array:
        """Token embeddings (B, T, n); in prepend mode pass `latents` to put them first.

        They take the dtype of the position table: `wte` may be stored in bfloat16 for
        inference (`lensjax.runtime`) while the residual stream stays float32."""
        x = self.wte(input_ids).astype(self.wpe.embedding.dtype)
        if latents is not None:
            x = jnp.concatenate([latents.astype(x.dtype), x], axis=1)
        return x

    def transform(
        self,
        x: jax.Array,
        cross_kv: list[tuple[jax.Array, jax.Array]] | None,
        *,
        position: jax.Array | int = 0,
        cache: list[KVCache] | None = None,
        origin: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        remat: bool = False,
    ) -> tuple[jax.Array, list[KVCache] | None]:
        """Embeddings x (B, T, n) at `position..` -> (final hidden states, updated caches).

        `cross_kv` None means no cross-attention (prepend mode). With a cache of W slots per
        image, `origin` (B, W, max_len) says which slot holds each row's history (beam
        search). `remat` recomputes each block in the backward pass instead of storing its
        activations (training only; not with a cache).
        """
        length = x.shape[1]
        if cache is None and length > self.cfg.n_positions:
            raise ValueError(
                f"sequence of {length} positions exceeds n_positions={self.cfg.n_positions}"
            )
        x = x + self.wpe(position + jnp.arange(length))
        x = dropout(x, self.cfg.embd_pdrop, rngs)
        new_cache = []
        for layer in range(self.cfg.n_layer):
            # One dropout key per layer, drawn here, so that recomputation under remat draws
            # exactly the masks the forward pass drew.
            key = None if rngs is None else rngs.dropout()
            kv = None if cross_kv is None else cross_kv[0 if len(cross_kv) == 1 else layer]
            if cache is None:  # training or scoring: every position at once
                x = fusion_fence(self._remat_layer(layer, x, kv, key) if remat
                                 else self._layer(layer, x, kv, key)[0])
                continue
            x, layer_cache = self._layer(layer, x, kv, key, cache[layer], position, origin)
            new_cache.append(layer_cache)
        return self.ln_f(x), None if cache is None else new_cache

    def _layer(
        self,
        layer: int,
        x: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None,
        key: jax.Array | None,
        cache: KVCache | None = None,
        position: jax.Array | int = 0,
        origin: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Block `layer` with its cross-attention: x (B, T, n) -> (B, T, n), its cache."""
        rngs = None if key is None else nnx.Rngs(dropout=key)
        block, shared = self.h[layer], isinstance(self.xattn, SharedCrossAttention)
        x, cache = block.self_attention(x, cache=cache, position=position, origin=origin,
                                        rngs=rngs)
        if kv is not None and not shared:
            x = self.xattn[layer](x, kv)
        x = block.feed_forward(x, rngs=rngs)
        if kv is not None and shared:
            x = self.xattn(x, kv)
        return x, cache

    def _remat_layer(self, layer: int, x: jax.Array, kv: tuple[jax.Array, jax.Array] | None,
                     key: jax.Array | None) -> jax.Array:
        """`_layer` under `jax.checkpoint`: only its input is kept for the backward pass, and
        the block is recomputed there (gradient checkpointing)."""
        graphdef, state = nnx.split(self)

        @jax.checkpoint
        def run(state: nnx.State, x: jax.Array, kv, key) -> jax.Array:
            return nnx.merge(graphdef, state)._layer(layer, x, kv, key)[0]

        return run(state, x, kv, key)

    def lm_logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states (B, T, n) -> float32 logits (B, T, vocab), tied to wte.

        `wte` is (vocab, n), so the product reads it as the (out, in) weight it already is."""
        wte = self.wte.embedding[...]
        return lax.dot_general(hidden.astype(wte.dtype), wte,
                               (((hidden.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)

    def hidden_states(
        self,
        input_ids: jax.Array,
        latents: jax.Array,
        *,
        mode: Mode = "inject",
        rngs: nnx.Rngs | None = None,
        remat: bool = False,
    ) -> jax.Array:
        """input_ids (B, T) int, latents (B, L, n) -> final hidden states (B, T, n), after
        `ln_f`: what the tied LM head reads.

        In prepend mode the L latent positions are dropped. `remat`: gradient checkpointing of
        every block (see `transform`).
        """
        prepend = mode == "prepend"
        x = self.embed(input_ids, latents if prepend else None)
        hidden, _ = self.transform(x, None if prepend else self.cross_kv(latents), rngs=rngs,
                                   remat=remat)
        return hidden[:, latents.shape[1] :] if prepend else hidden

    def __call__(
        self,
        input_ids: jax.Array,
        latents: jax.Array,
        *,
        mode: Mode = "inject",
        rngs: nnx.Rngs | None = None,
        remat: bool = False,
    ) -> jax.Array:
        """input_ids (B, T) int, latents (B, L, n) -> logits float32 (B, T, vocab)
        (`hidden_states` through the tied LM head)."""
        return self.lm_logits(self.hidden_states(input_ids, latents, mode=mode, rngs=rngs,
                                                 remat=remat))
