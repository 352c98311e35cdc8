"""LensToWords v1's decoder in Flax: an InceptionV3 vector and a word prefix -> the next word.

The notebook's two Keras variants (`lensjax.models.lstm.V1Config.fusion`):

- "add" (`model`): image Dense(512, relu) -> Dense(512, relu) -> Dropout(0.4); words
  Embedding(V, 256, mask_zero) -> LSTM(512) -> Dropout(0.3); Add -> Dense(256, relu) ->
  Dense(V) (softmax in Keras; logits here);
- "concat" (`model1`, L2 1e-4 on the LSTM kernels, a training-time term): image Dense(512,
  relu) -> Dense(256, relu) -> Dropout(0.4); the same word branch; Concatenate (image
  first) -> Dense(256, relu) -> Dropout(0.3) -> Dense(V).

The LSTM is Keras': gates in the order i, f, c, o, `kernel` (in, 4H), `recurrent_kernel`
(H, 4H), one `bias` (4H,), sigmoid gates and tanh cell. Keras runs it over the padded prefix
and keeps the state after the last word; here it runs once over the sequence and the head is
applied at every position, so position t holds the next-word logits after `ids[:, :t+1]`
(padding, id 0, leaves the state unchanged as Keras' mask does). Parameter names follow the
Keras layers: `image_dense1`, `image_dense2`, `embedding`, `lstm`, `merge_dense`, `output`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from lensjax.models.layers import Linear, dropout


@dataclasses.dataclass(frozen=True)
class V1Config:
    """v1's sizes; `fusion` picks the notebook's variant."""

    vocab_size: int = 10_000
    feature_dim: int = 2048
    embed_dim: int = 256
    hidden: int = 512
    image_dim: int = 512  # the second image Dense: 512 (add) or 256 (concat)
    merge_dim: int = 256
    fusion: Literal["add", "concat"] = "add"
    image_dropout: float = 0.4
    text_dropout: float = 0.3
    merge_dropout: float = 0.0  # 0.3 in the concat variant


def v1_preset(fusion: str = "add", vocab_size: int = 10_000) -> V1Config:
    """The notebook's `model` ("add") or `model1` ("concat")."""
    if fusion == "add":
        return V1Config(vocab_size=vocab_size)
    if fusion == "concat":
        return V1Config(vocab_size=vocab_size, fusion="concat", image_dim=256,
                        merge_dropout=0.3)
    raise ValueError(f"unknown fusion {fusion!r}: use add or concat")


class KerasLSTM(nnx.Module):
    """`keras.layers.LSTM` (default activations), step by step or over a sequence."""

    def __init__(self, n_in: int, hidden: int, *, rngs: nnx.Rngs):
        glorot = nnx.initializers.glorot_uniform()
        self.hidden = hidden
        self.kernel = nnx.Param(glorot(rngs.params(), (n_in, 4 * hidden)))
        self.recurrent_kernel = nnx.Param(nnx.initializers.orthogonal()(
            rngs.params(), (hidden, 4 * hidden)))
        # unit_forget_bias: the forget gate's bias starts at 1
        self.bias = nnx.Param(jnp.zeros((4 * hidden,)).at[hidden:2 * hidden].set(1.0))

    def step(self, state: tuple[jax.Array, jax.Array], x: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
        """(h, c) each (B, H), x (B, in) -> the next (h, c)."""
        h, c = state
        z = x @ self.kernel[...] + h @ self.recurrent_kernel[...] + self.bias[...]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x (B, T, in), mask (B, T) bool -> h after each position (B, T, H); a masked
        position keeps the previous state (Keras' masking)."""
        zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)

        def scan(state, inputs):
            xt, mt = inputs
            h, c = self.step(state, xt)
            keep = mt[:, None]
            state = (jnp.where(keep, h, state[0]), jnp.where(keep, c, state[1]))
            return state, state[0]

        _, hs = lax.scan(scan, (zeros, zeros), (jnp.swapaxes(x, 0, 1), mask.T))
        return jnp.swapaxes(hs, 0, 1)


class V1Decoder(nnx.Module):
    """v1's caption model without its encoder: features (B, 2048), ids (B, T) -> logits
    (B, T, V)."""

    def __init__(self, cfg: V1Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image_dense1 = Linear(cfg.feature_dim, 512, rngs=rngs)
        self.image_dense2 = Linear(512, cfg.image_dim, rngs=rngs)
        self.embedding = nnx.Param(nnx.initializers.uniform(0.1)(
            rngs.params(), (cfg.vocab_size, cfg.embed_dim)) - 0.05)
        self.lstm = KerasLSTM(cfg.embed_dim, cfg.hidden, rngs=rngs)
        merged = cfg.hidden + (cfg.image_dim if cfg.fusion == "concat" else 0)
        self.merge_dense = Linear(merged, cfg.merge_dim, rngs=rngs)
        self.output = Linear(cfg.merge_dim, cfg.vocab_size, rngs=rngs)

    def image(self, features: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """(B, 2048) -> the projected image (B, image_dim)."""
        x = jax.nn.relu(self.image_dense2(jax.nn.relu(self.image_dense1(features))))
        return dropout(x, self.cfg.image_dropout, rngs)

    def head(self, image: jax.Array, h: jax.Array, rngs: nnx.Rngs | None = None
             ) -> jax.Array:
        """image (B, image_dim), LSTM output (B, ..., H) -> logits (B, ..., V)."""
        h = dropout(h, self.cfg.text_dropout, rngs)
        image = jnp.broadcast_to(image.reshape(image.shape[0], *(1,) * (h.ndim - 2), -1),
                                 (*h.shape[:-1], image.shape[-1]))
        merged = (image + h if self.cfg.fusion == "add"
                  else jnp.concatenate([image, h], axis=-1))
        merged = dropout(jax.nn.relu(self.merge_dense(merged)), self.cfg.merge_dropout, rngs)
        return self.output(merged)

    def __call__(self, features: jax.Array, ids: jax.Array, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """features (B, 2048), ids (B, T) int (0 = padding) -> logits (B, T, V): position t
        holds the next word's logits after ids[:, :t+1]."""
        words = jnp.take(self.embedding[...], ids, axis=0)
        hs = self.lstm(words, ids != 0)
        return self.head(self.image(features, rngs), hs, rngs)
