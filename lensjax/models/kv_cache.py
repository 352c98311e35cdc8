"""The self-attention KV cache decoders share (GPT-2 and the v3a Transformer): keys and values
of every generated position, per layer, for B images with W rows (beams) each.

Beam search never reorders a cache: each beam writes into its own slot, and reads its history
through an `origin` table (B, W, max_len) naming the slot that holds each earlier position.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class KVCache(NamedTuple):
    """Self-attention cache of one layer for B images with W slots each (W beams; 1 when
    sampling): keys (B, H, D, W * max_len), values (B, H, W * max_len, D); slot w holds its
    positions at w * max_len + position.

    Laid out so that both attention products are plain batched matmuls over (B, H) against all
    W * max_len cached positions of an image: no per-step transpose of the cache, and beam
    search never reorders it (each row reads its history through an origin table instead).
    The slot and position axes are one axis, not two: with a separate (size-1) slot axis,
    XLA:CPU copied every cache three times per decoding step (7% of a step at batch 32).
    """

    keys: jax.Array
    values: jax.Array


def cached_attention(q: jax.Array, cache: KVCache, position: jax.Array | int,
                      origin: jax.Array | None) -> jax.Array:
    """q (B*W, T, H, D) at positions `position..` attending to the cache -> (B*W, T, H, D).

    Row v of an image reads cached position s from slot `origin[b, v, s]` (B, W, max_len);
    origin None means every row reads its own slot.
    """
    batch, heads, dim, cached = cache.keys.shape
    width, steps = q.shape[0] // batch, q.shape[1]
    length = cached // width
    scale = 1.0 / jnp.sqrt(jnp.float32(dim))
    # (B*W, T, H, D) -> (B, H, W*T, D): queries of all slots of an image, then their steps.
    queries = (q * scale).reshape(batch, width, steps, heads, dim).transpose(0, 3, 1, 2, 4)
    queries = queries.reshape(batch, heads, width * steps, dim)
    scores = jnp.einsum("bhqd,bhdn->bhqn", queries, cache.keys).astype(jnp.float32)
    query_pos = position + jnp.arange(steps)
    visible = jnp.arange(length)[None, :] <= query_pos[:, None]  # (T, S)
    if width == 1:
        mask = visible[None, None]
    else:  # (B, W_query, T, W_slot, S): causal and the slot that holds the row's history
        if origin is None:
            origin = jnp.broadcast_to(jnp.arange(width)[None, :, None], (batch, width, length))
        own = origin[:, :, None, :] == jnp.arange(width)[None, None, :, None]  # (B, W, W, S)
        mask = own[:, :, None] & visible[None, None, :, None, :]
        mask = mask.reshape(batch, 1, width * steps, width * length)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(cache.values.dtype)
    out = jnp.einsum("bhqn,bhnd->bhqd", weights, cache.values)  # (B, H, W*T, D)
    return out.reshape(batch, heads, width, steps, dim).transpose(0, 2, 3, 1, 4).reshape(
        batch * width, steps, heads, dim)


def write_cache(cache: KVCache, k: jax.Array, v: jax.Array, position) -> KVCache:
    """Write k, v (B*W, T, H, D) at positions `position..` of every row's own slot."""
    batch, heads, dim, cached = cache.keys.shape
    width, steps = k.shape[0] // batch, k.shape[1]
    length = cached // width
    k = k.reshape(batch, width, steps, heads, dim).transpose(0, 3, 4, 1, 2)  # (B, H, D, W, T)
    v = v.reshape(batch, width, steps, heads, dim).transpose(0, 3, 1, 2, 4)  # (B, H, W, T, D)
    keys, values = cache
    for slot in range(width):
        start = slot * length + position
        keys = lax.dynamic_update_slice(keys, k[:, :, :, slot].astype(keys.dtype),
                                        (0, 0, 0, start))
        values = lax.dynamic_update_slice(values, v[:, :, slot].astype(values.dtype),
                                          (0, 0, start, 0))
    return KVCache(keys, values)


def empty_caches(layers: int, batch: int, heads: int, head_dim: int, max_len: int,
                 dtype=jnp.float32, slots: int = 1) -> list[KVCache]:
    """One empty cache per layer for `batch` images with `slots` rows each (beams) and
    `max_len` positions."""
    return [KVCache(jnp.zeros((batch, heads, head_dim, slots * max_len), dtype),
                    jnp.zeros((batch, heads, slots * max_len, head_dim), dtype))
            for _ in range(layers)]
