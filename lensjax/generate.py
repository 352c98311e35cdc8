"""Jit-compiled caption decoding: greedy, top-k sampling and beam search.

One `lax.while_loop` per (batch size, method) over a family's decode hooks
(`lensjax.models.decoding`): what the image gives the decoder (for v3b the Perceiver and the
cross-attention keys and values of its latents) is computed once per image, the BOS step is
prefilled, then one token per step runs against a preallocated KV cache. Rows stop by
LensToWords' rules (EOS or token 0, '.' and three equal tokens for sampling) and the loop exits
early when every row is done.
Beam search keeps the beams of all images flattened into the batch axis.

Output: int32 (B, max_new_tokens), the generated tokens without the BOS, EOS after each row's
end. Sampling keys are per row, derived from (seed, the row's identity, attempt, step), so an
image's caption does not depend on the batch it is in.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from lensjax.checks import check_bool, check_int
from lensjax.data.tokenizer import EOS_ID
from lensjax.models.decoding import Decodable

PERIOD_ID = 764  # "."
Method = Literal["greedy", "topk", "beam"]
BeamRule = Literal["v3b", "v2"]


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Static decoding settings (a change compiles a new program).

    `stop_on_repeat` None means LensToWords' choice: on for greedy and top-k, off for beam.
    `eos_id` ends a row (as token 0 does): GPT-2's 50256, or a word vocabulary's `<end>`;
    `period_id` is the token `stop_at_period` stops after. `beam_rule` picks the beam search:
    "v3b" (`beam_search`) or "v2" (`ranked_beam_search`, the v2 notebook's), which never
    proposes `unk_id` and, with `argsort_quirk`, proposes exactly what the notebook's
    `np.argsort` slip did.
    """

    method: Method = "topk"
    max_new_tokens: int = 50
    min_new_tokens: int = 0
    top_k: int = 20
    beam_width: int = 5
    stop_at_period: bool = True
    stop_on_repeat: bool | None = None
    eos_id: int = EOS_ID
    period_id: int = PERIOD_ID
    beam_rule: BeamRule = "v3b"
    unk_id: int = 1
    argsort_quirk: bool = False

    def __post_init__(self):
        if self.method not in ("greedy", "topk", "beam"):
            raise ValueError(f"unknown method {self.method!r}: use greedy, topk or beam")
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        check_int("top_k", self.top_k, 1)
        check_int("beam_width", self.beam_width, 1)
        check_bool("stop_at_period", self.stop_at_period)
        if self.stop_on_repeat is not None:
            check_bool("stop_on_repeat", self.stop_on_repeat)
        check_int("eos_id", self.eos_id, 0)
        check_int("period_id", self.period_id, 0)
        if self.beam_rule not in ("v3b", "v2"):
            raise ValueError(f"unknown beam rule {self.beam_rule!r}: use v3b or v2")
        check_int("unk_id", self.unk_id, 0)
        check_bool("argsort_quirk", self.argsort_quirk)

    @property
    def repeat_stop(self) -> bool:
        return self.method != "beam" if self.stop_on_repeat is None else self.stop_on_repeat


def _mask_stops(logits: jax.Array, step, min_new: int, eos_id: int = EOS_ID) -> jax.Array:
    """Before `min_new` tokens, EOS and token 0 (both end a row) cannot be chosen. Only the
    two columns are rewritten (in place), not the whole (rows, vocab) array."""
    if min_new == 0:
        return logits
    early = step < min_new
    for token in (0, eos_id):
        logits = logits.at[:, token].set(jnp.where(early, -jnp.inf, logits[:, token]))
    return logits


def _top_log_probs(logits: jax.Array, k: int, step, min_new: int, eos_id: int = EOS_ID
                   ) -> tuple[jax.Array, jax.Array]:
    """The k best log-probabilities of each row (EOS and 0 masked before `min_new` tokens,
    after normalising, as LensToWords masks them) and their tokens, without materialising the
    whole log-softmax: top-k of the logits minus their log-sum-exp. (rows, V) -> 2 x (rows, k)."""
    values, tokens = lax.top_k(_mask_stops(logits, step, min_new, eos_id), k)
    return values - jax.nn.logsumexp(logits, axis=-1, keepdims=True), tokens


class _SampleState(NamedTuple):
    step: jax.Array
    tokens: jax.Array  # (B, max_new)
    done: jax.Array  # (B,)
    cache: Any  # the family's decoder state (KV caches)
    logits: jax.Array  # (B, vocab)


def sample(
    model: Decodable,
    features: jax.Array,
    row_keys: jax.Array,
    temperature: jax.Array,
    options: DecodeOptions,
) -> jax.Array:
    """Greedy or top-k decoding. features (B, S, D), row_keys (B,) PRNG keys -> (B, max_new)."""
    batch, max_new, eos = features.shape[0], options.max_new_tokens, options.eos_id
    prefix = model.start_decoding(features, 1, max_new)

    def choose(state: _SampleState) -> _SampleState:
        step = state.step
        logits = _mask_stops(state.logits, step, options.min_new_tokens, eos)
        if options.method == "greedy":
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            values, indices = lax.top_k(logits, options.top_k)
            keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
            choice = jax.vmap(jax.random.categorical)(keys, values / temperature)
            token = jnp.take_along_axis(indices, choice[:, None], axis=1)[:, 0].astype(jnp.int32)
        ends = (token == eos) | (token == 0)
        written = jnp.where(state.done | ends, eos, token)
        tokens = lax.dynamic_update_slice(state.tokens, written[:, None], (0, step))
        allowed = step + 1 >= options.min_new_tokens
        stop = ends
        if options.stop_at_period:
            stop |= allowed & (token == options.period_id)
        if options.repeat_stop:
            previous = lax.dynamic_slice(tokens, (0, jnp.maximum(step - 2, 0)), (batch, 3))
            stop |= allowed & (step >= 2) & (previous[:, 0] == token) & (previous[:, 1] == token)
        return state._replace(step=step + 1, tokens=tokens, done=state.done | stop)

    def advance(state: _SampleState) -> _SampleState:
        last = lax.dynamic_slice(state.tokens, (0, state.step - 1), (batch, 1))[:, 0]
        logits, cache = model.decode_step(prefix.context, state.cache, last,
                                          prefix.offset + state.step - 1)
        return choose(state._replace(cache=cache, logits=logits))

    state = choose(_SampleState(
        jnp.int32(0), jnp.full((batch, max_new), eos, jnp.int32), jnp.zeros(batch, bool),
        prefix.cache, prefix.logits,
    ))
    state = lax.while_loop(
        lambda s: (s.step < max_new) & ~jnp.all(s.done), advance, state
    )
    return state.tokens


class _BeamState(NamedTuple):
    step: jax.Array
    tokens: jax.Array  # (B, W, max_new) live beams' tokens
    scores: jax.Array  # (B, W) summed log-probabilities
    cache: Any  # B images x W slots, never reordered
    origin: jax.Array  # (B, W, positions): the slot that holds each beam's cached position
    logits: jax.Array  # (B*W, vocab)
    best_tokens: jax.Array  # (B, max_new) best completed sequence (EOS-padded)
    best_norm: jax.Array  # (B,) its normalised score, -inf if none


def beam_search(
    model: Decodable, features: jax.Array, alpha: jax.Array, options: DecodeOptions
) -> jax.Array:
    """LensToWords' beam search, batched. features (B, S, D) -> (B, max_new) best sequences.

    Each live beam proposes its top-`width` tokens; all width^2 candidates are ranked by
    summed log-probability (equal lengths within a step); in rank order, a candidate ending
    in EOS is completed, the others fill the `width` live beams. At the end, the live beams
    join the completed ones and the best by score / len(seq) ** alpha wins, len counting BOS.

    Beams live in fixed cache slots: a step writes each beam's keys and values into its own
    slot, and a reorder only permutes the small `origin` table that tells each beam which
    slot holds each of its earlier positions, never the caches themselves.
    """
    batch, width, max_new = features.shape[0], options.beam_width, options.max_new_tokens
    eos = options.eos_id
    prefix = model.start_decoding(features, width, max_new)
    positions = prefix.offset + max_new
    slots = jnp.arange(width, dtype=jnp.int32)
    # Only beam 0 exists at first; the others start at -inf so they propose nothing.
    scores = jnp.where(slots == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)

    def choose(state: _BeamState) -> _BeamState:
        step = state.step
        top_logp, top_tokens = _top_log_probs(state.logits, width, step,
                                              options.min_new_tokens, eos)  # (B*W, W)
        candidates = (state.scores[:, :, None] + top_logp.reshape(batch, width, width)
                      ).reshape(batch, width * width)
        ranked, order = lax.top_k(candidates, width * width)  # descending, ties by index
        tokens = top_tokens.reshape(batch, width * width)
        tokens = jnp.take_along_axis(tokens, order, axis=1)
        parents = order // width
        is_eos = tokens == eos
        live_rank = jnp.cumsum(~is_eos, axis=1)
        live = ~is_eos & (live_rank <= width)
        before_last_live = jnp.cumsum(live, axis=1) - live < width
        completed = is_eos & before_last_live & jnp.isfinite(ranked)

        length = (step + 2).astype(jnp.float32)  # BOS + step tokens + the new one
        norm = jnp.where(completed, ranked / length**alpha, -jnp.inf)
        first = jnp.argmax(norm, axis=1)
        new_norm = jnp.take_along_axis(norm, first[:, None], axis=1)[:, 0]
        parent_tokens = jnp.take_along_axis(
            state.tokens, jnp.take_along_axis(parents, first[:, None], axis=1)[:, :, None], 1
        )[:, 0]
        better = new_norm > state.best_norm
        best_tokens = jnp.where(better[:, None], parent_tokens, state.best_tokens)
        best_norm = jnp.where(better, new_norm, state.best_norm)

        # The live beams, in rank order: their parent's history plus the new token.
        chosen = jnp.argsort(~live, axis=1, stable=True)[:, :width]
        new_parents = jnp.take_along_axis(parents, chosen, axis=1)
        new_tokens = jnp.take_along_axis(tokens, chosen, axis=1)
        history = jnp.take_along_axis(state.tokens, new_parents[:, :, None], axis=1)
        history = lax.dynamic_update_slice(history, new_tokens[:, :, None], (0, 0, step))
        origin = jnp.take_along_axis(state.origin, new_parents[:, :, None], axis=1)
        return _BeamState(step + 1, history, jnp.take_along_axis(ranked, chosen, axis=1),
                          model.reorder_state(state.cache, new_parents), origin, state.logits,
                          best_tokens, best_norm)

    def advance(state: _BeamState) -> _BeamState:
        last = state.tokens[:, :, state.step - 1].reshape(-1)
        position = prefix.offset + state.step - 1
        # This step's keys and values go into each beam's own slot.
        origin = lax.dynamic_update_slice(
            state.origin, jnp.broadcast_to(slots[None, :, None], (batch, width, 1)),
            (0, 0, position))
        logits, cache = model.decode_step(prefix.context, state.cache, last, position, origin)
        return choose(state._replace(cache=cache, origin=origin, logits=logits))

    state = choose(_BeamState(
        jnp.int32(0), jnp.full((batch, width, max_new), eos, jnp.int32), scores,
        prefix.cache, jnp.broadcast_to(slots[None, :, None], (batch, width, positions)),
        prefix.logits, jnp.full((batch, max_new), eos, jnp.int32),
        jnp.full((batch,), -jnp.inf),
    ))
    state = lax.while_loop(lambda s: s.step < max_new, advance, state)
    live_norm = state.scores / jnp.float32(max_new + 1) ** alpha
    top = jnp.argmax(live_norm, axis=1)
    top_norm = jnp.take_along_axis(live_norm, top[:, None], axis=1)[:, 0]
    top_tokens = jnp.take_along_axis(state.tokens, top[:, None, None], axis=1)[:, 0]
    return jnp.where((top_norm > state.best_norm)[:, None], top_tokens, state.best_tokens)


class _RankedState(NamedTuple):
    step: jax.Array
    tokens: jax.Array  # (B, W, max_new)
    scores: jax.Array  # (B, W) summed log(p + 1e-9)
    lengths: jax.Array  # (B, W) words in the beam, <start> included
    ended: jax.Array  # (B, W) the beam's last word is `<end>`
    cache: Any  # (h, c) per beam, reordered each step
    logits: jax.Array  # (B*W, vocab)


def _proposals(logits: jax.Array, width: int, unk: int, quirk: bool
               ) -> tuple[jax.Array, jax.Array]:
    """Each row's `width` proposed tokens and their log(p + 1e-9), as the v2 notebook takes
    them: the `width` most likely tokens other than `unk`, or with `quirk` what its
    `np.argsort(p)[-(w+1):]` (ascending) did after removing `unk` and keeping the first `w`:
    the same set when `unk` is among the w+1 most likely, else those w+1 without the best.
    (rows, V) -> 2 x (rows, width)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    if not quirk:
        values, tokens = lax.top_k(log_p.at[:, unk].set(-jnp.inf), width)
    else:
        values, tokens = lax.top_k(log_p, width + 1)  # descending
        drop = tokens == unk
        drop = drop.at[:, 0].set(drop[:, 0] | ~drop.any(axis=1))
        keep = jnp.argsort(drop, axis=1, stable=True)[:, :width]
        values = jnp.take_along_axis(values, keep, axis=1)
        tokens = jnp.take_along_axis(tokens, keep, axis=1)
    return jnp.log(jnp.exp(values) + 1e-9), tokens


def ranked_beam_search(
    model: Decodable, features: jax.Array, alpha: jax.Array, options: DecodeOptions
) -> jax.Array:
    """The v2 notebook's beam search, batched. features -> (B, max_new) best sequences.

    Each live beam proposes `width` words (`_proposals`); a beam that has written `<end>` is
    carried on unchanged. Every step keeps the `width` candidates with the best
    score / len(seq) ** alpha (len counting `<start>`), and after `max_new` steps the best of
    them wins. Unlike `beam_search`, ended and live beams compete on normalised scores at every
    step. The decoder state (h, c) is reordered to the kept beams' parents each step.
    """
    batch, width, max_new = features.shape[0], options.beam_width, options.max_new_tokens
    end = options.eos_id
    prefix = model.start_decoding(features, width, max_new)
    slots = jnp.arange(width, dtype=jnp.int32)
    scores = jnp.where(slots == 0, 0.0, -jnp.inf)[None].repeat(batch, 0)

    def choose(state: _RankedState) -> _RankedState:
        step = state.step
        logits = _mask_stops(state.logits, step, options.min_new_tokens, end)
        values, proposed = _proposals(logits, width, options.unk_id, options.argsort_quirk)
        values = values.reshape(batch, width, width)
        proposed = proposed.reshape(batch, width, width)
        # an ended beam's only candidate is itself: its first slot, unchanged
        ended = state.ended[:, :, None]
        first = slots[None, None, :] == 0
        scores = jnp.where(ended, jnp.where(first, state.scores[:, :, None], -jnp.inf),
                           state.scores[:, :, None] + values)
        tokens = jnp.where(ended, end, proposed)
        lengths = jnp.broadcast_to(state.lengths[:, :, None] + jnp.where(ended, 0, 1),
                                   tokens.shape)
        key = (scores / lengths.astype(jnp.float32) ** alpha).reshape(batch, width * width)
        _, order = lax.top_k(key, width)  # descending, ties by index (Python's stable sort)
        parents = order // width

        def pick(x):
            return jnp.take_along_axis(x.reshape(batch, width * width), order, axis=1)

        new_tokens = pick(tokens)
        history = jnp.take_along_axis(state.tokens, parents[:, :, None], axis=1)
        history = lax.dynamic_update_slice(history, new_tokens[:, :, None], (0, 0, step))
        return _RankedState(step + 1, history, pick(scores), pick(lengths),
                            pick(jnp.broadcast_to(ended, tokens.shape)) | (new_tokens == end),
                            model.reorder_state(state.cache, parents), state.logits)

    def advance(state: _RankedState) -> _RankedState:
        last = state.tokens[:, :, state.step - 1].reshape(-1)
        logits, cache = model.decode_step(prefix.context, state.cache, last,
                                          prefix.offset + state.step - 1)
        return choose(state._replace(cache=cache, logits=logits))

    state = choose(_RankedState(
        jnp.int32(0), jnp.full((batch, width, max_new), end, jnp.int32), scores,
        jnp.ones((batch, width), jnp.int32), jnp.zeros((batch, width), bool), prefix.cache,
        prefix.logits))
    state = lax.while_loop(lambda s: s.step < max_new, advance, state)
    return state.tokens[:, 0]


def decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    features: jax.Array,
    row_keys: jax.Array,
    temperature: jax.Array,
    alpha: jax.Array,
    options: DecodeOptions,
) -> jax.Array:
    """Pure entry point for `jax.jit` (options static): -> int32 (B, max_new_tokens)."""
    model = nnx.merge(graphdef, state)
    if options.method == "beam" and options.beam_rule == "v2":
        return ranked_beam_search(model, features, alpha, options)
    if options.method == "beam":
        return beam_search(model, features, alpha, options)
    return sample(model, features, row_keys, temperature, options)


# --- LensToWords' retry rule for top-k sampling (host side) ---------------------------------


def english_words() -> frozenset[str]:
    """The lower-cased web2 word list (the list behind nltk's `words` corpus), offline."""
    from english_words import get_english_words_set

    return frozenset(get_english_words_set(["web2"], lower=True))


def is_degenerate(first_token_text: str, caption: str, words: frozenset[str]) -> bool:
    """LensToWords resamples a caption when its first token is not an English word, a word
    longer than 3 letters is all capitals, or a word repeats three times in a row."""
    if first_token_text.strip().lower() not in words:
        return True
    tokens = caption.split()
    if any(len(t) > 3 and t.isupper() for t in tokens):
        return True
    return any(tokens[i] == tokens[i + 1] == tokens[i + 2] for i in range(len(tokens) - 2))


def row_identity(data: bytes | np.ndarray) -> int:
    """A 64-bit identity of one input (a file's bytes, an image or a feature array), from which
    its sampling keys derive: equal inputs get equal captions wherever they are batched."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def row_keys(seed: int, identities: np.ndarray, attempt: int) -> jax.Array:
    """PRNG keys (N,) for rows with uint64 `identities` (N,) at retry `attempt`."""
    halves = np.stack([identities >> np.uint64(32), identities & np.uint64(0xFFFFFFFF)],
                      axis=1).astype(np.uint32)
    base = jax.random.key(seed)
    return jax.vmap(lambda hi_lo: jax.random.fold_in(jax.random.fold_in(
        jax.random.fold_in(base, hi_lo[0]), hi_lo[1]), attempt))(jnp.asarray(halves))


def bucket_sizes(batch_size: int) -> list[int]:
    """Padded batch sizes: powers of two below `batch_size`, and `batch_size` itself."""
    sizes = {batch_size}
    size = 1
    while size < batch_size:
        sizes.add(size)
        size *= 2
    return sorted(sizes)


def bucket_for(rows: int, batch_size: int) -> int:
    return next(size for size in bucket_sizes(batch_size) if size >= rows)


def pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` (N, ...) zero-padded to (rows, ...), rows >= N."""
    padded = np.zeros((rows, *array.shape[1:]), array.dtype)
    padded[: len(array)] = array
    return padded
