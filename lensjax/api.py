"""The public model object: `load_pretrained`, `build_model` and `CaptionModel`.

Hot paths are pure functions jitted over the parameter state (the graph definition is
static), so no Python graph traversal happens per call.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.checkpoint import (
    GPT2_TOKENIZER,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from lensjax.checks import SEED_MAX, check_bool, check_int, check_real
from lensjax.data.images import load_image, read_file_bytes
from lensjax.data.tokenizer import EOS_ID, GPT2Tokenizer
from lensjax.data.word_vocab import WORDS, WordVocabulary
from lensjax.generate import (
    PERIOD_ID,
    DecodeOptions,
    Method,
    bucket_for,
    decode,
    english_words,
    is_degenerate,
    pad_rows,
    row_identity,
    row_keys,
)
from lensjax.models.families import config_from_metadata, family_of
from lensjax.params import build_captioner, flat_params
from lensjax.runtime import Layout, inference_module, resolve_dtype


class CaptionModel:
    """A captioner of any family (`lensjax.models.families`: v3b, v3a, v2, v1) plus its
    metadata (tokenizer, components, provenance), with jitted entry points."""

    def __init__(self, module: nnx.Module, metadata: Mapping[str, Any] | None = None, *,
                 dtype: str = "float32", layout: Layout = "auto"):
        """`dtype` "bfloat16" stores the decoder's matmul weights in bfloat16 (products
        accumulate in float32; norms, softmax and the image encoder stay float32); `layout`
        how they are laid out ("auto": the fastest for this backend, see `lensjax.runtime`)."""
        self.dtype = resolve_dtype(dtype).name
        self.module = inference_module(module, self.dtype, layout)
        self.config: Any = module.cfg  # the family's config (CaptionerConfig, V3AConfig)
        self.family = family_of(self.config)
        self.metadata: dict[str, Any] = dict(metadata or {})
        graphdef, self.state = nnx.split(self.module)

        def encode(state: nnx.State, images: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).encode(images)

        def logits(state: nnx.State, features: jax.Array, input_ids: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state)(features, input_ids)

        self._encode = jax.jit(encode)
        self._logits = jax.jit(logits)
        self._decode = jax.jit(functools.partial(decode, graphdef), static_argnames="options")
        self._tokenizer: GPT2Tokenizer | WordVocabulary | None = None
        self._tokenizer_entry = self.metadata.get("tokenizer", GPT2_TOKENIZER)
        self._word_model = self._tokenizer_entry.get("name") == WORDS  # v1/v2
        self._words: frozenset[str] | None = None

    @classmethod
    def from_params(
        cls, cfg: Any, params: Mapping[str, np.ndarray], metadata: Mapping | None,
        *, dtype: str = "float32",
    ) -> CaptionModel:
        return cls(build_captioner(cfg, params), metadata, dtype=dtype)

    def astype(self, dtype: str) -> CaptionModel:
        """This model with its decoder weights stored in `dtype` ("float32" or "bfloat16").
        Going to bfloat16 rounds the weights; going back does not restore the lost bits."""
        return CaptionModel(self.module, self.metadata, dtype=dtype)

    @property
    def params(self) -> dict[str, jax.Array]:
        """{dotted path: array} of every parameter, kernels laid out (in, out) as in
        checkpoints, in the dtype the model holds them."""
        return flat_params(self.module)

    def encode(self, images: np.ndarray | jax.Array) -> jax.Array:
        """ImageNet-normalised float32 NHWC images (B, H, W, 3) at the model's `image_size`
        -> features (v3b (B, 64, 768), v3a (B, 64, 768), v2 (B, 64, 2048), v1 (B, 2048))."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"encode expects NHWC images (B, H, W, 3), got shape {tuple(images.shape)}"
                + (" (NCHW? transpose with x.transpose(0, 2, 3, 1))" if images.ndim == 4
                   and images.shape[1] == 3 else "")
            )
        if min(images.shape[1:3]) < MIN_IMAGE_SIDE:
            raise ValueError(
                f"images of {images.shape[1]}x{images.shape[2]} pixels are too small for the "
                f"encoder (at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}; the model was trained at "
                f"{self.config.image_size}x{self.config.image_size})")
        _check_finite("images", images)
        self.module.check_can_encode()
        return self._encode(self.state, jnp.asarray(images))

    def logits(self, features: np.ndarray | jax.Array, input_ids: np.ndarray | jax.Array
               ) -> jax.Array:
        """Features (B, 64, feature_dim), or (B, feature_dim) for v1, and ids int (B, T) ->
        float32 logits (B, T, vocab); position t predicts the token after ids[:, :t+1] (for
        v1/v2 the ids are word indices, 0 = padding)."""
        features = self._check_features(features)
        input_ids = np.asarray(input_ids)
        vocab = self.config.vocab_size
        if input_ids.ndim != 2 or input_ids.shape[0] != features.shape[0] or not (
                input_ids.shape[1] >= 1):
            raise ValueError(
                f"input_ids must be (B, T) with B = {features.shape[0]} and T >= 1, got "
                f"{tuple(input_ids.shape)}"
            )
        if not np.issubdtype(input_ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(f"input_ids must be token ids in 0..{vocab - 1}, found "
                             f"{input_ids.min()}..{input_ids.max()}")
        return self._logits(self.state, jnp.asarray(features), jnp.asarray(input_ids, jnp.int32))

    @property
    def tokenizer(self) -> GPT2Tokenizer | WordVocabulary:
        """The checkpoint's tokenizer, made on first use: the GPT-2 BPE (offline default), or
        for v1/v2 their word vocabulary (stored in the checkpoint)."""
        if self._tokenizer is None:
            self._tokenizer = (WordVocabulary.from_metadata(self._tokenizer_entry)
                               if self._word_model else GPT2Tokenizer())
        return self._tokenizer

    def generate(
        self,
        features: np.ndarray | jax.Array,
        method: Method = "topk",
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        top_k: int | None = None,
        temperature: float | None = None,
        beam_width: int = 5,
        alpha: float = 0.7,
        seed: int = 0,
        *,
        stop_at_period: bool | None = None,
        stop_on_repeat: bool | None = None,
        retry: bool | None = None,
        batch_size: int = 32,
        identities: Sequence[int] | None = None,
        argsort_quirk: bool = False,
    ) -> np.ndarray:
        """Caption tokens for features float32 (B, 64, D) (v1: (B, D)) -> int32 (B,
        max_new_tokens).

        Tokens exclude the BOS; each row is EOS (50256; v1/v2: `<end>`) after its end.
        `max_new_tokens` None: 50, or the model's longest caption where that is shorter (v1/v2:
        their `max_len`, 40).
        Methods: "greedy", "topk" (temperature 0 is greedy), "beam" (beam_width 5, alpha
        0.7). `top_k`, `temperature`, `retry` (LensToWords' resampling of degenerate top-k
        captions), `stop_at_period` and `stop_on_repeat` (three equal tokens; None: on except
        in beam search) default to the family's sampler: v3b top-k 20 at 0.7 with the retry
        rule, v3a top-k 50 at 1.0 without it, both stopping at a period; v1/v2 greedy to
        `<end>` only, and the v2 notebook's beam search (`ranked_beam_search`: never `[UNK]`;
        `argsort_quirk` proposes what the notebook's `np.argsort` slip did, for exact
        reproduction). Batches of at most `batch_size` are padded to a few fixed sizes,
        compiled once each.

        A row's sampling keys come from `seed` and its identity: `identities[i]` (an int in
        0..2**64-1, e.g. `lensjax.generate.row_identity(file_bytes)`), else the bytes of
        `features[i]`. Features computed in batches of different sizes can differ in their
        last bits, so pass the inputs' identities to make captions independent of batching
        (`caption` does). Every argument is checked before any work (ValueError naming it).
        """
        defaults = self.family.decoding
        if max_new_tokens is None:
            max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, self.config.max_new_tokens)
        top_k = defaults["top_k"] if top_k is None else top_k
        temperature = defaults["temperature"] if temperature is None else temperature
        retry = defaults["retry"] if retry is None else retry
        if stop_at_period is None:
            stop_at_period = defaults["stop_at_period"]
        if stop_on_repeat is None:
            stop_on_repeat = defaults["stop_on_repeat"]
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, 0, SEED_MAX)
        check_real("alpha", alpha)
        temperature = check_real("temperature", temperature, 0.0)
        check_bool("retry", retry)
        check_bool("argsort_quirk", argsort_quirk)
        if method == "topk" and temperature == 0.0:
            method = "greedy"
        # GPT-2's ids are constants: its tokenizer is only built where text is decoded
        end_id, period_id = ((self.tokenizer.end_id, self.tokenizer.period_id)
                             if self._word_model else (EOS_ID, PERIOD_ID))
        options = DecodeOptions(method, max_new_tokens, min_new_tokens, top_k, beam_width,
                                stop_at_period, stop_on_repeat, end_id, period_id,
                                defaults["beam_rule"], argsort_quirk=argsort_quirk)
        check_int("top_k", top_k, 1, self.config.vocab_size)
        check_int("beam_width", beam_width, 1, self.config.vocab_size)
        check_int("max_new_tokens", max_new_tokens, 1, self.config.max_new_tokens)
        features = self._check_features(features)
        ids = self._identities(features, identities)
        tokens = self._decode_batches(features, ids, 0, seed, temperature, alpha, options,
                                      batch_size)
        if retry and options.method == "topk":
            tokens = self._retry_degenerate(features, ids, tokens, seed, temperature,
                                            alpha, options, batch_size)
        return tokens

    @staticmethod
    def _identities(features: np.ndarray, identities: Sequence[int] | None) -> np.ndarray:
        """uint64 (B,) row identities: the given ones, checked, or the feature bytes'."""
        if identities is None:
            return np.array([row_identity(row) for row in features], np.uint64)
        identities = list(identities)
        if len(identities) != len(features):
            raise ValueError(f"identities has {len(identities)} entries for {len(features)} "
                             "rows of features")
        return np.array([check_int("identities[i]", i, 0, 2**64 - 1) for i in identities],
                        np.uint64)

    def _decode_batches(self, features, identities, attempt, seed, temperature, alpha,
                        options, batch_size) -> np.ndarray:
        out = np.empty((len(features), options.max_new_tokens), np.int32)
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            size = bucket_for(len(chunk), batch_size)
            keys = row_keys(seed, pad_rows(identities[start : start + batch_size], size),
                            attempt)
            tokens = self._decode(self.state, jnp.asarray(pad_rows(chunk, size)), keys,
                                  jnp.float32(temperature), jnp.float32(alpha), options=options)
            out[start : start + len(chunk)] = np.asarray(tokens)[: len(chunk)]
        return out

    def _retry_degenerate(self, features, identities, tokens, seed, temperature, alpha,
                          options, batch_size, attempts: int = 5) -> np.ndarray:
        """Resample rows LensToWords would reject (`is_degenerate`), at most `attempts` times."""
        if self._words is None:
            self._words = english_words()
        tokens = tokens.copy()
        for attempt in range(1, attempts + 1):
            bad = [row for row, ids in enumerate(tokens) if is_degenerate(
                self.tokenizer.decode(ids[:1]), self.tokenizer.decode_caption(ids), self._words)]
            if not bad:
                break
            tokens[bad] = self._decode_batches(features[bad], identities[bad], attempt, seed,
                                               temperature, alpha, options, batch_size)
        return tokens

    def encode_padded(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """`encode` in batches padded to bucket sizes (bounded compiles) -> numpy features."""
        check_int("batch_size", batch_size, 1)
        if not len(images):
            return np.zeros((0, *self.feature_shape), np.float32)
        out = []
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start : start + batch_size], np.float32)
            padded = pad_rows(chunk, bucket_for(len(chunk), batch_size))
            out.append(np.asarray(self.encode(padded))[: len(chunk)])
        return np.concatenate(out)

    def caption(
        self,
        images_or_paths: np.ndarray | str | os.PathLike | Sequence[str | os.PathLike],
        method: Method = "topk",
        batch_size: int = 32,
        **options: Any,
    ) -> list[str]:
        """Captions for images (float32 NHWC (B, 224, 224, 3), normalised) or image files
        (one path, or a sequence of them) -> one caption per image.

        `options` are `generate`'s (max_new_tokens, top_k, temperature, beam_width, alpha,
        seed, ...). A file that cannot be read raises `ImageError` naming it. Sampling keys
        derive from each file's bytes (or each image array's), so an image gets the same
        caption alone or in any batch.
        """
        check_int("batch_size", batch_size, 1)
        if isinstance(images_or_paths, np.ndarray | jax.Array):
            images = np.asarray(images_or_paths, np.float32)
            if images.ndim != 4:
                raise ValueError("images must be (B, H, W, 3), got shape "
                                 f"{tuple(images.shape)}; a single image needs x[None]")
            identities = [row_identity(image) for image in images]
        else:
            paths = ([images_or_paths] if isinstance(images_or_paths, str | os.PathLike)
                     else list(images_or_paths))
            size = self.config.image_size
            images = np.zeros((len(paths), size, size, 3), np.float32)
            for row, path in enumerate(paths):
                images[row] = load_image(path, size)
            identities = [file_identity(path) for path in paths]
        if not len(images):
            return []
        features = self.encode_padded(images, batch_size)
        tokens = self.generate(features, method, batch_size=batch_size, identities=identities,
                               **options)
        return [self.tokenizer.decode_caption(row) for row in tokens]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """One image's features: (tokens, feature_dim), or (feature_dim,) for pooled ones."""
        width = self.config.feature_dim
        if self.config.pooled_features:
            return (width,)
        # the ConvNeXt head's pooled grid, or v2's mixed10 (8x8 at 299 px)
        return (self.config.head.pool_size ** 2 if self.config.head else 64, width)

    def _check_features(self, features: np.ndarray | jax.Array) -> np.ndarray:
        """Features as float32 numpy (B, S >= 1, feature_dim), or (B, feature_dim) for a model
        with pooled features, all finite; else ValueError."""
        features = np.asarray(features, np.float32)
        width = self.config.feature_dim
        if self.config.pooled_features:
            if features.ndim != 2 or features.shape[-1] != width:
                raise ValueError(f"features must be (B, {width}) (one pooled vector per "
                                 f"image), got {tuple(features.shape)}")
            _check_finite("features", features)
            return features
        if features.ndim != 3 or features.shape[-1] != width:
            raise ValueError(f"features must be (B, S, {width}), got {tuple(features.shape)}")
        if features.shape[1] == 0:
            raise ValueError("features have zero tokens (shape "
                             f"{tuple(features.shape)}); the encoder gives 64 per image")
        _check_finite("features", features)
        return features

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a checkpoint directory that `load_pretrained` reads back (always float32). A
        model loaded from a LoRA-trained checkpoint is saved merged (its spec kept as
        "lora_merged")."""
        kept = {k: v for k, v in self.metadata.items() if k != "lora"}
        if "lora" in self.metadata:
            kept["lora_merged"] = self.metadata["lora"]
        metadata = {
            **kept,
            "family": self.family.name,
            "config": self.config.to_dict(),
            "tokenizer": self.metadata.get("tokenizer", GPT2_TOKENIZER),
        }
        params = {k: np.asarray(v, np.float32) for k, v in self.params.items()}
        return save_checkpoint(path, params, metadata, overwrite=overwrite)


DEFAULT_MAX_NEW_TOKENS = 50
MIN_IMAGE_SIDE = 32  # ConvNeXt downsamples by 32 before its last stage


def _check_finite(name: str, array: np.ndarray) -> None:
    """ValueError naming the first rows of `array` (B, ...) that hold NaN or infinity."""
    finite = np.isfinite(array).all(axis=tuple(range(1, array.ndim)))
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(f"{name} hold NaN or infinite values (rows {rows[:5].tolist()}"
                         + (" ..." if len(rows) > 5 else "") + ")")


def file_identity(path: str | os.PathLike) -> int:
    """`row_identity` of a file's bytes: its captions' sampling keys derive from it. Only a
    regular file is read (ImageError otherwise, as for decoding)."""
    return row_identity(read_file_bytes(path))


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32",
                    verify: bool = True) -> CaptionModel | Any:
    """Load a lensjax checkpoint directory (from `bridge import` or `CaptionModel.save`):
    a CaptionModel for a captioner family, a `lensjax.clip.ClipModel` for CLIP.

    `dtype` "bfloat16" stores the decoder's weights in bfloat16 for faster decoding (see
    `CaptionModel`); `verify` False skips the per-array checksums (about 0.5 s per GB).
    """
    dtype = resolve_dtype(dtype).name
    params, metadata = load_checkpoint(path, verify=verify)
    cfg = config_from_metadata(metadata)
    if not family_of(cfg).captioner:  # CLIP: a scorer (lensjax.clip)
        from lensjax.clip import ClipModel

        return ClipModel(build_captioner(cfg, params), metadata)
    return CaptionModel.from_params(cfg, params, metadata, dtype=dtype)


def load_captioner(path: str | os.PathLike, *, dtype: str = "float32") -> CaptionModel:
    """`load_pretrained` of a captioner; a CLIP checkpoint is a CheckpointError saying so."""
    model = load_pretrained(path, dtype=dtype)
    if not isinstance(model, CaptionModel):
        raise CheckpointError(f"{path} is a CLIP checkpoint: it scores image-caption pairs "
                              "(python -m lensjax.filter) and cannot caption")
    return model


def build_model(
    perciever_path: str | os.PathLike,
    gpt2_blocks_path: str | os.PathLike,
    cross_attn_path: str | os.PathLike,
    *,
    gpt2: str | os.PathLike,
    encoder: str | os.PathLike | None = None,
    encoder_head: str | os.PathLike | None = None,
    preset: str = "v3b",
) -> CaptionModel:
    """LensToWords' `build_model`, straight from the released files (read without torch).

    `gpt2` is the public HF gpt2 folder or weights file (for wte, wpe, ln_f); `encoder` a timm
    ConvNeXt-Tiny checkpoint and `encoder_head` a head file, both optional.
    """
    from bridge.convert import import_model

    return import_model(
        perceiver=perciever_path,
        gpt2_blocks=gpt2_blocks_path,
        cross_attention=cross_attn_path,
        gpt2=gpt2,
        encoder=encoder,
        encoder_head=encoder_head,
        preset=preset,
    )
