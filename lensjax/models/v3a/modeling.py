"""v3a, LensToWords' first ConvNeXt captioner, in Flax NNX.

features (B, 64, feature_dim) -> ProjectionHead -> memory (B, 64, d_model);
ids (B, T) -> Embedding + sinusoidal positions -> n_layer post-norm decoder layers (causal
self-attention, cross-attention over the memory, exact-GELU feed-forward) -> output_proj ->
logits (B, T, vocab): the notebook's `Transformer.forward` before its final transpose.

Parameter paths follow the notebook's state dicts: `projection_head.{linear1, linear2,
layernorm}`; `decoder.{positional_encoding, embedding, layers.{i}, output_proj}` with each
layer's `self_attn`, `multihead_attn` (q, k, v, out), `linear1`, `linear2`, `norm1..3`.
`positional_encoding` is the notebook's buffer, kept as a parameter that never trains (the
optimizer labels it `fixed`) so that a file's table round-trips bit for bit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.data.tokenizer import EOS_ID
from lensjax.models import init
from lensjax.models.decoding import DecodePrefix, KVCacheDecoding
from lensjax.models.encoding import ImageEncoding
from lensjax.models.kv_cache import KVCache, cached_attention, empty_caches, write_cache
from lensjax.models.layers import (
    Linear,
    MultiheadAttention,
    dot_product_attention,
    dropout,
    fusion_fence,
    gelu_exact,
    layer_norm,
    merge_heads,
    split_heads,
)
from lensjax.models.output_loss import LossRows, output_cross_entropy
from lensjax.models.v3a.config import TransformerConfig, V3AConfig


def sinusoidal_table(positions: int, dim: int) -> np.ndarray:
    """The notebook's `positionalencoding(positions, dim)`: float32 (positions, dim), sin on
    even columns, cos on odd, frequencies exp(-2i log(10000) / dim). Computed in float64 and
    rounded once (torch's float32 arithmetic is off by up to ~1e-4 at position 2000; a
    released file's own table is imported as it is)."""
    angles = np.arange(positions)[:, None] * np.exp(
        np.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = np.zeros((positions, dim), np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles)
    return table.astype(np.float32)


class ProjectionHead(nnx.Module):
    """Linear(feature_dim, d) - exact GELU - Linear(d, d) - LayerNorm(d, eps 1e-5)."""

    def __init__(self, in_dim: int, dim: int, *, rngs: nnx.Rngs):
        self.linear1 = Linear(in_dim, dim, rngs=rngs)
        self.linear2 = Linear(dim, dim, rngs=rngs)
        self.layernorm = layer_norm(dim, 1e-5, rngs=rngs)

    def __call__(self, features: jax.Array) -> jax.Array:
        """(B, S, feature_dim) -> (B, S, d)."""
        return self.layernorm(self.linear2(gelu_exact(self.linear1(features))))


class DecoderLayer(nnx.Module):
    """`nn.TransformerDecoderLayer(d, heads, ff, dropout, activation='gelu',
    batch_first=True)`: x = norm1(x + sa(x)); x = norm2(x + mha(x, memory));
    x = norm3(x + linear2(dropout(gelu(linear1(x)))))."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.num_heads = cfg.n_head
        self.rate = cfg.dropout
        self.self_attn = MultiheadAttention(cfg.d_model, cfg.n_head, dropout_rate=cfg.dropout,
                                            rngs=rngs)
        self.multihead_attn = MultiheadAttention(cfg.d_model, cfg.n_head,
                                                 dropout_rate=cfg.dropout, rngs=rngs)
        self.linear1 = Linear(cfg.d_model, cfg.ff_dim, rngs=rngs)
        self.linear2 = Linear(cfg.ff_dim, cfg.d_model, rngs=rngs)
        self.norm1 = layer_norm(cfg.d_model, cfg.eps, rngs=rngs)
        self.norm2 = layer_norm(cfg.d_model, cfg.eps, rngs=rngs)
        self.norm3 = layer_norm(cfg.d_model, cfg.eps, rngs=rngs)

    def __call__(
        self,
        x: jax.Array,
        memory_kv: tuple[jax.Array, jax.Array],
        *,
        cache: KVCache | None = None,
        position: jax.Array | int = 0,
        origin: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """x (B, T, d) at positions `position..` -> (B, T, d), and the cache with this
        call's self-attention keys and values written (no cache: x is the whole caption)."""
        attn = self.self_attn
        q = split_heads(attn.q(x), self.num_heads)
        k = split_heads(attn.k(x), self.num_heads)
        v = split_heads(attn.v(x), self.num_heads)
        if cache is None:
            length = x.shape[1]
            mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
            out = dot_product_attention(q, k, v, mask, dropout_rate=attn.dropout_rate,
                                        rngs=rngs)
        else:
            cache = write_cache(cache, k, v, position)
            out = cached_attention(q, cache, position, origin)
        x = self.norm1(x + dropout(attn.out(merge_heads(out)), self.rate, rngs))
        x = self.norm2(x + dropout(self.multihead_attn(x, kv=memory_kv, rngs=rngs),
                                   self.rate, rngs))
        hidden = dropout(gelu_exact(self.linear1(x)), self.rate, rngs)
        return self.norm3(x + dropout(self.linear2(hidden), self.rate, rngs)), cache


class TransformerDecoder(nnx.Module):
    """The notebook's `Transformer`: params `positional_encoding` (max_positions, d),
    `embedding` (vocab, d), `layers.{i}`, `output_proj` (d -> vocab)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.positional_encoding = nnx.Param(
            jnp.asarray(sinusoidal_table(cfg.max_positions, cfg.d_model)))
        self.embedding = nnx.Embed(cfg.vocab_size, cfg.d_model,
                                   embedding_init=init.normal(1.0), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.output_proj = Linear(cfg.d_model, cfg.vocab_size, rngs=rngs)

    def memory_kv(self, memory: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Cross-attention keys and values of the memory (B, S, d), one pair per layer."""
        return [layer.multihead_attn.project_kv(memory) for layer in self.layers]

    def transform(
        self,
        input_ids: jax.Array,
        memory_kv: list[tuple[jax.Array, jax.Array]],
        *,
        position: jax.Array | int = 0,
        cache: list[KVCache] | None = None,
        origin: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, list[KVCache] | None]:
        """ids (B, T) at `position..` -> (hidden states (B, T, d), updated caches)."""
        length = input_ids.shape[1]
        if cache is None and length > self.cfg.max_positions:
            raise ValueError(f"caption of {length} tokens exceeds the "
                             f"{self.cfg.max_positions} positions of the sinusoidal table")
        table = self.positional_encoding[...]
        positions = jax.lax.dynamic_slice_in_dim(table, position, length) if cache is not None \
            else table[:length]
        x = self.embedding(input_ids).astype(table.dtype) + positions[None]
        new_cache = []
        for index, layer in enumerate(self.layers):
            if cache is None:
                x = fusion_fence(layer(x, memory_kv[index], rngs=rngs)[0])
                continue
            x, layer_cache = layer(x, memory_kv[index], cache=cache[index], position=position,
                                   origin=origin)
            new_cache.append(layer_cache)
        return x, None if cache is None else new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Hidden states (..., d) -> float32 logits (..., vocab)."""
        return self.output_proj(hidden).astype(jnp.float32)


class V3ACaptioner(ImageEncoding, KVCacheDecoding):
    """The whole v3a model: optional encoder and head, `projection_head`, `decoder`."""

    def __init__(self, cfg: V3AConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        super().__init__(cfg.encoder, cfg.head, rngs=rngs)
        self.projection_head = ProjectionHead(cfg.feature_dim, cfg.decoder.d_model, rngs=rngs)
        self.decoder = TransformerDecoder(cfg.decoder, rngs=rngs)

    def __call__(self, features: jax.Array, input_ids: jax.Array, *,
                 rngs: nnx.Rngs | None = None, remat: bool = False) -> jax.Array:
        """Features (B, S, feature_dim), ids (B, T) -> logits float32 (B, T, vocab).
        Passing `rngs` turns dropout on; `remat` is accepted for the training step's sake
        (v3a's layers are small: nothing is recomputed)."""
        memory_kv = self.decoder.memory_kv(self.projection_head(features))
        hidden, _ = self.decoder.transform(input_ids, memory_kv, rngs=rngs)
        return self.decoder.logits(hidden)

    def token_losses(self, features: jax.Array, input_ids: jax.Array, targets: jax.Array, *,
                     rngs: nnx.Rngs | None = None, remat: bool = False,
                     rows: LossRows | None = None) -> jax.Array:
        """Features (B, S, feature_dim), ids and targets (B, T) int -> cross-entropy of each
        position float32 (B, T), as from `__call__`'s logits, without forming them
        (`lensjax.models.output_loss`; with `rows`, only the counted positions', 0 elsewhere)."""
        memory_kv = self.decoder.memory_kv(self.projection_head(features))
        hidden, _ = self.decoder.transform(input_ids, memory_kv, rngs=rngs)
        head = self.decoder.output_proj
        return output_cross_entropy(hidden, head.output_weight(), head.bias[...], targets,
                                    rows=rows)

    def start_decoding(self, features: jax.Array, slots: int, max_new: int) -> DecodePrefix:
        """Decode hook (`lensjax.models.decoding`): the projected memory's cross-attention
        keys and values (once per image, shared by its `slots` rows) and the BOS step."""
        cfg = self.cfg.decoder
        if 1 + max_new > cfg.max_positions:
            raise ValueError(f"{1 + max_new} positions exceed the {cfg.max_positions} of the "
                             "sinusoidal table")
        memory_kv = jax.tree.map(lambda a: jnp.repeat(a, slots, axis=0),
                                 self.decoder.memory_kv(self.projection_head(features)))
        cache = empty_caches(cfg.n_layer, features.shape[0], cfg.n_head,
                             cfg.d_model // cfg.n_head, 1 + max_new,
                             self.decoder.positional_encoding[...].dtype, slots)
        bos = jnp.full((features.shape[0] * slots, 1), EOS_ID, jnp.int32)
        hidden, cache = self.decoder.transform(bos, memory_kv, position=0, cache=cache)
        return DecodePrefix(memory_kv, cache, self.decoder.logits(hidden[:, -1]), 1)

    def decode_step(self, context, cache: list[KVCache], tokens: jax.Array,
                    position: jax.Array | int, origin: jax.Array | None = None
                    ) -> tuple[jax.Array, list[KVCache]]:
        """Decode hook: one token per row (rows,) at `position` -> (logits (rows, vocab),
        cache); `context` is the memory's cross-attention keys and values."""
        hidden, cache = self.decoder.transform(tokens[:, None], context, position=position,
                                               cache=cache, origin=origin)
        return self.decoder.logits(hidden[:, 0]), cache
