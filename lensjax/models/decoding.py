"""What a captioner family gives `lensjax.generate`: decode hooks over its own state.

    start_decoding(features (B, S, F), slots, max_new) -> DecodePrefix
    decode_step(context, cache, tokens (B*slots,), position, origin) -> (logits, cache)
    reorder_state(cache, parents (B, slots)) -> cache

`slots` is the number of rows per image (beams; 1 when sampling). The prefix holds what every
step reuses (`context`, e.g. the cross-attention keys and values of the image), the decoder
state after the BOS token (`cache`: a KV cache, or any pytree), the logits of the first
generated token (B*slots, vocab) and that token's position. `origin` (B, slots, positions)
says which slot holds each row's history (beam search; None: every row its own), so KV caches
are never reordered; a state that cannot be read that way (an LSTM's (h, c)) is reordered
by `reorder_state`, which beam search calls after each step (KV-cache families return the
cache unchanged: `KVCacheDecoding`). One greedy / top-k / beam implementation serves every
family.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax


class DecodePrefix(NamedTuple):
    context: Any
    cache: Any
    logits: jax.Array  # (rows, vocab), float32
    offset: int  # position of the first generated token


class Decodable(Protocol):
    """A captioner that `lensjax.generate` can decode."""

    def start_decoding(self, features: jax.Array, slots: int, max_new: int
                       ) -> DecodePrefix: ...

    def decode_step(self, context: Any, cache: Any, tokens: jax.Array,
                    position: jax.Array | int, origin: jax.Array | None = None
                    ) -> tuple[jax.Array, Any]: ...

    def reorder_state(self, cache: Any, parents: jax.Array) -> Any: ...


class KVCacheDecoding:
    """Mixin of the families whose decoder state is a KV cache read through `origin`."""

    def reorder_state(self, cache: Any, parents: jax.Array) -> Any:
        """Beam b of each image continues beam `parents[:, b]`: a KV cache needs no change
        (the origin table already routes each beam to its history)."""
        return cache
