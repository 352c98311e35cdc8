"""Cross-entropy of an output layer over a large vocabulary, without its logits.

`output_cross_entropy(hidden, weight, bias, targets)` equals
`optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T + bias, targets)` but never
holds the (rows, vocab) logits: it walks the vocabulary in chunks of `chunk` rows of `weight`,
keeping a running log-sum-exp per row, and its backward pass recomputes each chunk's logits
to form the softmax gradient (one extra product against no full-vocabulary buffers). On CPU
this is what makes a small captioner's training step fast: with GPT-2's 50,257 tokens and a
narrow model, reading and writing the (rows, 50,257) logits and their gradient, and
reducing them along the vocabulary, cost more than the products (BENCHMARKS.md, "make demo").

Each chunk's logits are computed as (chunk, rows), so the reductions run over the leading
axis, which XLA:CPU vectorises across rows; along the 50,257-long trailing axis the same
reductions were 5-8x slower.

A training step needs the losses of the positions its loss counts only (captions are
padded to the batch's longest). Given `rows` (`LossRows`: which positions count, and a row
budget), `output_cross_entropy` gathers those positions' hidden states and runs the
vocabulary products on the budget's rows instead of all of them, falling back to every row
(inside the same compiled program) for a batch whose counted positions overflow the budget.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_CHUNK = 4096


class LossRows(NamedTuple):
    """The positions whose losses are needed: `counted` (...) bool, the shape of the targets;
    `budget`, how many rows (over all groups) the vocabulary products run on when every group
    fits; `groups`, how many equal leading slices of the rows are gathered apart (one per
    device of a data-parallel batch, so each gathers its own rows)."""

    counted: jax.Array
    budget: int
    groups: int = 1


def output_cross_entropy(hidden: jax.Array, weight: jax.Array, bias: jax.Array | None,
                         targets: jax.Array, chunk: int = DEFAULT_CHUNK,
                         rows: LossRows | None = None) -> jax.Array:
    """Per-row cross-entropy of the logits `hidden @ weight.T (+ bias)` against `targets`.

    hidden (..., d), weight (V, d) (the (out, in) layout of an output layer or a tied
    embedding table), bias (V,) or None, targets (...) int in [0, V) -> float32 losses (...).
    With `rows`, the losses at `rows.counted` positions and 0 elsewhere, computed on at most
    `rows.budget` gathered rows while the counted positions fit (module docstring).
    Differentiable in hidden, weight and bias; products run in the inputs' dtype with float32
    accumulation, the softmax in float32.
    """
    if bias is None:
        bias = jnp.zeros((weight.shape[0],), jnp.float32)
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    hidden, targets = hidden.reshape(-1, width), targets.reshape(-1).astype(jnp.int32)
    if rows is None:
        return _cross_entropy(hidden, weight, bias, targets, chunk).reshape(lead)
    groups = rows.groups
    hidden, targets = hidden.reshape(groups, -1, width), targets.reshape(groups, -1)
    counted = rows.counted.reshape(groups, -1)
    size = counted.shape[1]
    per_group = -(-rows.budget // groups)

    def every_row(_):
        losses = _cross_entropy(hidden.reshape(-1, width), weight, bias, targets.reshape(-1),
                                chunk)
        return jnp.where(counted, losses.reshape(groups, size), 0.0)

    def gathered(_):
        index = jax.vmap(lambda c: jnp.nonzero(c, size=per_group, fill_value=size)[0])(counted)
        picked = jnp.take_along_axis(hidden, index[..., None], axis=1, mode="fill",
                                     fill_value=0)
        labels = jnp.take_along_axis(targets, index, axis=1, mode="fill", fill_value=0)
        losses = _cross_entropy(picked.reshape(-1, width), weight, bias, labels.reshape(-1),
                                chunk).reshape(groups, per_group)
        return jax.vmap(lambda i, loss: jnp.zeros((size,), jnp.float32).at[i].set(
            loss, mode="drop"))(index, losses)

    if per_group >= size:
        return every_row(None).reshape(lead)
    fits = jnp.all(counted.sum(axis=1) <= per_group)
    return lax.cond(fits, gathered, every_row, None).reshape(lead)


def _chunk_logits(hidden: jax.Array, weight: jax.Array, bias: jax.Array, start) -> jax.Array:
    """Logits of the vocabulary rows `start..start+C` of `weight` (C, d): (C, N) float32."""
    logits = lax.dot_general(weight, hidden.astype(weight.dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return logits + bias.astype(jnp.float32)[:, None]


def _scan_chunks(weight: jax.Array, bias: jax.Array, chunk: int, body, carry):
    """`carry = body(carry, weight rows, bias rows, start)` over the whole chunks (a scan, one
    compiled body) and then the partial last chunk."""
    whole, rest = divmod(weight.shape[0], chunk)

    def step(carry, index):
        start = index * chunk
        rows = lax.dynamic_slice_in_dim(weight, start, chunk, 0)
        return body(carry, rows, lax.dynamic_slice_in_dim(bias, start, chunk, 0), start), None

    if whole:
        carry, _ = lax.scan(step, carry, jnp.arange(whole))
    if rest:
        start = whole * chunk
        carry = body(carry, weight[start:], bias[start:], start)
    return carry


def _forward(hidden, weight, bias, targets, chunk):
    rows = hidden.shape[0]

    def body(carry, w, b, start):
        top, total, picked = carry
        logits = _chunk_logits(hidden, w, b, start)
        new_top = jnp.maximum(top, logits.max(0))
        total = total * jnp.exp(top - new_top) + jnp.exp(logits - new_top[None]).sum(0)
        hit = (start + jnp.arange(w.shape[0]))[:, None] == targets[None]
        return new_top, total, picked + jnp.where(hit, logits, 0.0).sum(0)

    zeros = jnp.zeros((rows,), jnp.float32)
    top, total, picked = _scan_chunks(weight, bias, chunk, body,
                                      (jnp.full((rows,), -jnp.inf, jnp.float32), zeros, zeros))
    lse = top + jnp.log(total)
    return lse - picked, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _cross_entropy(hidden, weight, bias, targets, chunk):
    return _forward(hidden, weight, bias, targets, chunk)[0]


def _cross_entropy_fwd(hidden, weight, bias, targets, chunk):
    losses, lse = _forward(hidden, weight, bias, targets, chunk)
    return losses, (hidden, weight, bias, targets, lse)


def _cross_entropy_bwd(chunk, residuals, upstream):
    hidden, weight, bias, targets, lse = residuals
    upstream = upstream.astype(jnp.float32)

    def body(carry, w, b, start):
        d_hidden, d_weight, d_bias = carry
        logits = _chunk_logits(hidden, w, b, start)
        hit = (start + jnp.arange(w.shape[0]))[:, None] == targets[None]
        # d loss / d logits = softmax - one-hot, scaled per row by the upstream gradient
        grad = (jnp.exp(logits - lse[None]) - hit) * upstream[None]  # (C, N)
        grad = grad.astype(w.dtype)
        d_hidden = d_hidden + lax.dot_general(grad, w, (((0,), (0,)), ((), ())),
                                              preferred_element_type=jnp.float32)
        d_rows = lax.dot_general(grad, hidden.astype(w.dtype), (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        d_weight = lax.dynamic_update_slice_in_dim(d_weight, d_rows.astype(d_weight.dtype),
                                                   start, 0)
        d_bias = lax.dynamic_update_slice_in_dim(
            d_bias, grad.astype(jnp.float32).sum(1).astype(d_bias.dtype), start, 0)
        return d_hidden, d_weight, d_bias

    carry = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros_like(weight), jnp.zeros_like(bias))
    d_hidden, d_weight, d_bias = _scan_chunks(weight, bias, chunk, body, carry)
    return d_hidden.astype(hidden.dtype), d_weight, d_bias, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)
