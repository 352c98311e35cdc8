"""LensToWords' LSTM decoders in Flax (v1 and v2): InceptionV3 features and a word prefix ->
the next word at every position.

v1 (`V1Decoder`), from the pooled 2048-d vector:

The notebook's two Keras variants (`V1DecoderConfig.fusion`):

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

v2 (`V2Decoder`), from mixed10's 64 patches (B, 64, 2048): patches Dense(256) (no
activation); their mean -> Dense(256, tanh) for h0 and for c0; Embedding(V, 256, mask_zero)
-> LSTM(256, return_sequences) from (h0, c0) (unmasked: Keras passes no mask to an LSTM
called with `initial_state`); `TemporalImageAttention` (additive: softmax over
the 64 patches of V(tanh(W_img patches + W_txt h)), a padded position's scores lowered by
1e9 as the notebook does, the context a weighted sum of the projected patches); Add(context,
h); times a sigmoid Dense(256) gate of that sum; Dense(256, relu); Dropout(0.5); Dense(V).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from lensjax.models import init
from lensjax.models.config_fields import JsonConfig
from lensjax.models.decoding import DecodePrefix
from lensjax.models.inception import InceptionEncoding
from lensjax.models.layers import Linear, dropout


@dataclasses.dataclass(frozen=True)
class V1DecoderConfig:
    """v1's decoder sizes; `fusion` picks the notebook's variant. `start_id` / `end_id`: the
    vocabulary's `<start>` and `<end>` (2 and 3 in a vocabulary where they are the most
    frequent words, the notebooks' fallback)."""

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
    start_id: int = 2
    end_id: int = 3

    @property
    def lstm_l2(self) -> float:
        """The L2 factor on the LSTM's kernel and recurrent kernel: 1e-4 in the concat
        variant (`model1`), none in `model`."""
        return 1e-4 if self.fusion == "concat" else 0.0


def v1_decoder(fusion: str = "add", vocab_size: int = 10_000) -> V1DecoderConfig:
    """The notebook's `model` ("add") or `model1` ("concat")."""
    if fusion == "add":
        return V1DecoderConfig(vocab_size=vocab_size)
    if fusion == "concat":
        return V1DecoderConfig(vocab_size=vocab_size, fusion="concat", image_dim=256,
                               merge_dropout=0.3)
    raise ValueError(f"unknown fusion {fusion!r}: use add or concat")


class LSTMDecoding:
    """The decode hooks of `lensjax.models.decoding` for an LSTM decoder: the carried state
    is (h, c) per row, advanced one word per step (the notebooks re-ran the whole prefix
    each step), reordered by `reorder_state` in beam search. Subclasses give `_image_context`
    (the per-row image part), `_initial_state` and `_step_logits`."""

    def start_decoding(self, features: jax.Array, slots: int, max_new: int) -> DecodePrefix:
        """features -> the prefix after `<start>`: context (rows, ...), (h, c) (rows, H),
        the first word's logits (rows, V); rows = B * slots."""
        context, state = self._image_context(features)
        context, state = jax.tree.map(lambda x: jnp.repeat(x, slots, axis=0), (context, state))
        start = jnp.full((context.shape[0],), self.cfg.start_id, jnp.int32)
        logits, state = self._advance(context, state, start)
        return DecodePrefix(context, state, logits, 1)

    def decode_step(self, context, cache, tokens: jax.Array, position, origin=None):
        """tokens (rows,) -> (the next logits (rows, V) float32, the advanced (h, c))."""
        return self._advance(context, cache, tokens)

    def reorder_state(self, cache, parents: jax.Array):
        """Beam s of image b continues beam `parents[b, s]`: gather its (h, c)."""
        batch, slots = parents.shape
        rows = (jnp.arange(batch)[:, None] * slots + parents).reshape(-1)
        return jax.tree.map(lambda x: x[rows], cache)

    def _advance(self, context, state, tokens):
        state = self.lstm.step(state, jnp.take(self.embedding[...], tokens, axis=0))
        return self._step_logits(context, state[0]).astype(jnp.float32), state


class KerasLSTM(nnx.Module):
    """`keras.layers.LSTM` (default activations), step by step or over a sequence."""

    def __init__(self, n_in: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = hidden
        self.kernel = nnx.Param(init.glorot_uniform()(rngs.params(), (n_in, 4 * hidden)))
        self.recurrent_kernel = nnx.Param(init.orthogonal()(
            rngs.params(), (hidden, 4 * hidden)))
        # unit_forget_bias: the forget gate's bias starts at 1
        self.bias = nnx.Param(jax.device_put(np.repeat(np.float32([0, 1, 0, 0]), hidden)))

    def step(self, state: tuple[jax.Array, jax.Array], x: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
        """(h, c) each (B, H), x (B, in) -> the next (h, c)."""
        h, c = state
        z = x @ self.kernel[...] + h @ self.recurrent_kernel[...] + self.bias[...]
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        return jax.nn.sigmoid(o) * jnp.tanh(c), c

    def __call__(self, x: jax.Array, mask: jax.Array,
                 initial: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        """x (B, T, in), mask (B, T) bool -> h after each position (B, T, H), from `initial`
        (h0, c0) or zeros; a masked position keeps the previous state and output (Keras'
        masking)."""
        zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        initial = (zeros, zeros) if initial is None else initial

        def scan(state, inputs):
            xt, mt = inputs
            h, c = self.step(state, xt)
            keep = mt[:, None]
            state = (jnp.where(keep, h, state[0]), jnp.where(keep, c, state[1]))
            return state, state[0]

        _, hs = lax.scan(scan, initial, (jnp.swapaxes(x, 0, 1), mask.T))
        return jnp.swapaxes(hs, 0, 1)


class V1Decoder(LSTMDecoding, nnx.Module):
    """v1's caption model without its encoder: features (B, 2048), ids (B, T) -> logits
    (B, T, V); decode hooks with (h, c) from zeros."""

    def __init__(self, cfg: V1DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image_dense1 = Linear(cfg.feature_dim, 512, rngs=rngs)
        self.image_dense2 = Linear(512, cfg.image_dim, rngs=rngs)
        self.embedding = nnx.Param(init.uniform(0.1)(
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

    def regularization(self) -> jax.Array:
        """Keras' `l2(lstm_l2)` kernel and recurrent regularizers: lstm_l2 * sum(w^2)."""
        weights = (self.lstm.kernel[...], self.lstm.recurrent_kernel[...])
        return self.cfg.lstm_l2 * sum(jnp.sum(jnp.square(w.astype(jnp.float32)))
                                      for w in weights)

    def _image_context(self, features):
        zeros = jnp.zeros((features.shape[0], self.cfg.hidden), jnp.float32)
        return self.image(features), (zeros, zeros)

    def _step_logits(self, image, h):
        return self.head(image, h)

    def __call__(self, features: jax.Array, ids: jax.Array, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """features (B, 2048), ids (B, T) int (0 = padding) -> logits (B, T, V): position t
        holds the next word's logits after ids[:, :t+1]."""
        words = jnp.take(self.embedding[...], ids, axis=0)
        hs = self.lstm(words, ids != 0)
        return self.head(self.image(features, rngs), hs, rngs)


@dataclasses.dataclass(frozen=True)
class V2DecoderConfig:
    """v2's decoder sizes (the notebook's final model, attention version 4); `start_id` /
    `end_id` as for v1."""

    vocab_size: int = 8_000
    feature_dim: int = 2048
    patches: int = 64
    dim: int = 256  # patch projection, embedding, LSTM, attention units, gate, dense
    dropout: float = 0.5
    start_id: int = 2
    end_id: int = 3


class TemporalImageAttention(nnx.Module):
    """The notebook's additive attention: for each position t, softmax over the patches of
    V(tanh(W_img p + W_txt h_t)); context_t = sum of the weights times the patches."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.W_img = Linear(dim, dim, rngs=rngs)
        self.W_txt = Linear(dim, dim, rngs=rngs)
        self.V = Linear(dim, 1, rngs=rngs)

    def __call__(self, patches: jax.Array, h: jax.Array, mask: jax.Array) -> jax.Array:
        """patches (B, P, D), h (B, T, D), mask (B, T) bool -> context (B, T, D). A padded
        position's scores all drop by 1e9, which in float32 makes its weights uniform."""
        scores = self.V(jnp.tanh(self.W_img(patches)[:, None] + self.W_txt(h)[:, :, None]))
        scores = scores[..., 0] - (1.0 - mask.astype(scores.dtype))[..., None] * 1e9
        weights = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("btp,bpd->btd", weights, patches)


class V2Decoder(LSTMDecoding, nnx.Module):
    """v2's caption model without its encoder: patches (B, 64, 2048), ids (B, T) -> logits
    (B, T, V); decode hooks with (h, c) from the image."""

    def __init__(self, cfg: V2DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.image_dense = Linear(cfg.feature_dim, cfg.dim, rngs=rngs)
        self.init_h = Linear(cfg.dim, cfg.dim, rngs=rngs)
        self.init_c = Linear(cfg.dim, cfg.dim, rngs=rngs)
        self.embedding = nnx.Param(init.uniform(0.1)(
            rngs.params(), (cfg.vocab_size, cfg.dim)) - 0.05)
        self.lstm = KerasLSTM(cfg.dim, cfg.dim, rngs=rngs)
        self.attention = TemporalImageAttention(cfg.dim, rngs=rngs)
        self.gate = Linear(cfg.dim, cfg.dim, rngs=rngs)
        self.dense = Linear(cfg.dim, cfg.dim, rngs=rngs)
        self.output = Linear(cfg.dim, cfg.vocab_size, rngs=rngs)

    def image(self, features: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """(B, 64, 2048) -> projected patches (B, 64, D) and the LSTM's (h0, c0)."""
        patches = self.image_dense(features)
        mean = jnp.mean(patches, axis=1)
        return patches, (jnp.tanh(self.init_h(mean)), jnp.tanh(self.init_c(mean)))

    def _image_context(self, features):
        return self.image(features)

    def _step_logits(self, patches, h):
        return self.head(patches, h[:, None], jnp.ones((h.shape[0], 1), bool))[:, 0]

    def head(self, patches: jax.Array, h: jax.Array, mask: jax.Array,
             rngs: nnx.Rngs | None = None) -> jax.Array:
        """patches (B, 64, D), LSTM outputs (B, T, D), mask (B, T) -> logits (B, T, V)."""
        fused = self.attention(patches, h, mask) + h
        gated = fused * jax.nn.sigmoid(self.gate(fused))
        x = dropout(jax.nn.relu(self.dense(gated)), self.cfg.dropout, rngs)
        return self.output(x)

    def __call__(self, features: jax.Array, ids: jax.Array, *,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        """features (B, 64, 2048), ids (B, T) int (0 = padding) -> logits (B, T, V): position
        t holds the next word's logits after ids[:, :t+1]."""
        patches, initial = self.image(features)
        mask = ids != 0
        # Keras runs this LSTM over the padding too: called with initial_state, it gets no
        # mask (only the attention does). Positions before the padding are unaffected.
        hs = self.lstm(jnp.take(self.embedding[...], ids, axis=0), jnp.ones_like(mask),
                       initial)
        return self.head(patches, hs, mask, rngs)


class WordModelConfig(JsonConfig):
    """What v1's and v2's configurations share (each a dataclass with the fields `decoder`,
    `encoder` (InceptionConfig or None), `image_size`, `max_len`, `preset`)."""

    head: ClassVar[None] = None  # no ConvNeXt head: the features are InceptionV3's own
    decoder: V1DecoderConfig | V2DecoderConfig
    max_len: int

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def feature_dim(self) -> int:
        return self.decoder.feature_dim

    @property
    def decoder_layers(self) -> int:
        return 1

    @property
    def max_new_tokens(self) -> int:
        """The longest caption, in words (the notebooks' `max_len`)."""
        return self.max_len


class WordCaptioner(InceptionEncoding):
    """A whole v1/v2 model: the optional InceptionV3 `encoder` and the LSTM `decoder`
    (`V1Decoder` or `V2Decoder`), whose decode hooks it passes on. Subclasses name their
    `decoder_class` and give `_features`."""

    decoder_class: ClassVar[type[V1Decoder] | type[V2Decoder]]

    def __init__(self, cfg: WordModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg.encoder, rngs=rngs)
        self.cfg = cfg
        self.decoder = self.decoder_class(cfg.decoder, rngs=rngs)

    def __call__(self, features: jax.Array, input_ids: jax.Array, *,
                 rngs: nnx.Rngs | None = None, remat: bool = False) -> jax.Array:
        """Features (v1 (B, 2048), v2 (B, 64, 2048)), ids (B, T) int (0 = padding) ->
        float32 logits (B, T, V): position t holds the next word's logits after
        ids[:, :t+1]. `remat` is accepted for the training step's sake."""
        return self.decoder(features, input_ids, rngs=rngs).astype(jnp.float32)

    def token_losses(self, features: jax.Array, input_ids: jax.Array, targets: jax.Array, *,
                     rngs: nnx.Rngs | None = None, remat: bool = False) -> jax.Array:
        """Cross-entropy of each position float32 (B, T) against targets (B, T) int."""
        logits = self(features, input_ids, rngs=rngs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

    def regularization(self) -> jax.Array:
        """The weight penalty Keras adds to the loss (v1's concat variant), float32 ()."""
        if isinstance(self.decoder, V1Decoder) and self.decoder.cfg.lstm_l2:
            return self.decoder.regularization()
        return jnp.float32(0)

    def start_decoding(self, features: jax.Array, slots: int, max_new: int) -> DecodePrefix:
        return self.decoder.start_decoding(features, slots, max_new)

    def decode_step(self, context, cache, tokens: jax.Array, position, origin=None):
        return self.decoder.decode_step(context, cache, tokens, position, origin)

    def reorder_state(self, cache, parents: jax.Array):
        return self.decoder.reorder_state(cache, parents)
