"""The public model object: `load_pretrained`, `build_model` and `CaptionModel`.

Hot paths are pure functions jitted over the parameter state (the graph definition is
static), so no Python graph traversal happens per call.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.checkpoint import GPT2_TOKENIZER, load_checkpoint, save_checkpoint
from lensjax.data.images import load_image
from lensjax.data.tokenizer import GPT2Tokenizer
from lensjax.generate import (
    DecodeOptions,
    Method,
    bucket_for,
    decode,
    english_words,
    is_degenerate,
    pad_rows,
)
from lensjax.models.captioner import Captioner, CaptionerConfig
from lensjax.params import build_captioner, flat_params


class CaptionModel:
    """A Captioner plus its metadata (components, provenance), with jitted entry points."""

    def __init__(self, module: Captioner, metadata: Mapping[str, Any] | None = None):
        self.module = module
        self.config: CaptionerConfig = module.cfg
        self.metadata: dict[str, Any] = dict(metadata or {})
        graphdef, self.state = nnx.split(module)

        def encode(state: nnx.State, images: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state).encode(images)

        def logits(state: nnx.State, features: jax.Array, input_ids: jax.Array) -> jax.Array:
            return nnx.merge(graphdef, state)(features, input_ids)

        self._encode = jax.jit(encode)
        self._logits = jax.jit(logits)
        self._decode = jax.jit(functools.partial(decode, graphdef), static_argnames="options")
        self._tokenizer: GPT2Tokenizer | None = None
        self._words: frozenset[str] | None = None

    @classmethod
    def from_params(
        cls, cfg: CaptionerConfig, params: Mapping[str, np.ndarray], metadata: Mapping | None
    ) -> CaptionModel:
        return cls(build_captioner(cfg, params), metadata)

    @property
    def params(self) -> dict[str, jax.Array]:
        """{dotted path: array} of every parameter."""
        return flat_params(self.module)

    def encode(self, images: np.ndarray | jax.Array) -> jax.Array:
        """ImageNet-normalised float32 NHWC images (B, 224, 224, 3) -> features (B, 64, 768)."""
        images = jnp.asarray(images, jnp.float32)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"encode expects NHWC images (B, H, W, 3), got shape {tuple(images.shape)}"
                + (" (NCHW? transpose with x.transpose(0, 2, 3, 1))" if images.ndim == 4
                   and images.shape[1] == 3 else "")
            )
        return self._encode(self.state, images)

    def logits(self, features: np.ndarray | jax.Array, input_ids: np.ndarray | jax.Array
               ) -> jax.Array:
        """Features (B, 64, feature_dim), ids int (B, T) -> float32 logits (B, T, vocab)."""
        features = jnp.asarray(features, jnp.float32)
        input_ids = jnp.asarray(input_ids, jnp.int32)
        self._check_features(features)
        if input_ids.ndim != 2 or input_ids.shape[0] != features.shape[0]:
            raise ValueError(
                f"input_ids must be (B, T) with B = {features.shape[0]}, got "
                f"{tuple(input_ids.shape)}"
            )
        return self._logits(self.state, features, input_ids)

    @property
    def tokenizer(self) -> GPT2Tokenizer:
        """The GPT-2 tokenizer (offline default), created on first use."""
        if self._tokenizer is None:
            self._tokenizer = GPT2Tokenizer()
        return self._tokenizer

    def generate(
        self,
        features: np.ndarray | jax.Array,
        method: Method = "topk",
        max_new_tokens: int = 50,
        min_new_tokens: int = 0,
        top_k: int = 20,
        temperature: float = 0.7,
        beam_width: int = 5,
        alpha: float = 0.7,
        seed: int = 0,
        *,
        stop_at_period: bool = True,
        stop_on_repeat: bool | None = None,
        retry: bool = True,
        batch_size: int = 32,
    ) -> np.ndarray:
        """Caption tokens for features float32 (B, 64, D) -> int32 (B, max_new_tokens).

        Tokens exclude the BOS; each row is EOS (50256) after its end. Methods: "greedy",
        "topk" (LensToWords' default: top_k 20, temperature 0.7, and its retry rule when
        `retry`), "beam" (beam_width 5, alpha 0.7). Sampling keys come from `seed` and each
        row's feature bytes, so a caption does not change with batch size or position.
        Batches of at most `batch_size` are padded to a few fixed sizes, compiled once each.
        """
        options = DecodeOptions(method, max_new_tokens, min_new_tokens, top_k, beam_width,
                                stop_at_period, stop_on_repeat)
        features = np.asarray(features, np.float32)
        self._check_features(features)
        row_ids = np.array([zlib.crc32(row.tobytes()) for row in features], np.uint32)
        tokens = self._decode_batches(features, row_ids, 0, seed, temperature, alpha, options,
                                      batch_size)
        if retry and method == "topk":
            tokens = self._retry_degenerate(features, row_ids, tokens, seed, temperature,
                                            alpha, options, batch_size)
        return tokens

    def _decode_batches(self, features, row_ids, attempt, seed, temperature, alpha, options,
                        batch_size) -> np.ndarray:
        base = jax.random.key(seed)
        out = np.empty((len(features), options.max_new_tokens), np.int32)
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            size = bucket_for(len(chunk), batch_size)
            ids = pad_rows(row_ids[start : start + batch_size], size)
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(base, i), attempt))(
                jnp.asarray(ids))
            tokens = self._decode(self.state, jnp.asarray(pad_rows(chunk, size)), keys,
                                  jnp.float32(temperature), jnp.float32(alpha), options=options)
            out[start : start + len(chunk)] = np.asarray(tokens)[: len(chunk)]
        return out

    def _retry_degenerate(self, features, row_ids, tokens, seed, temperature, alpha, options,
                          batch_size, attempts: int = 5) -> np.ndarray:
        """Resample rows LensToWords would reject (`is_degenerate`), at most `attempts` times."""
        if self._words is None:
            self._words = english_words()
        tokens = tokens.copy()
        for attempt in range(1, attempts + 1):
            bad = [row for row, ids in enumerate(tokens) if is_degenerate(
                self.tokenizer.decode(ids[:1]), self.tokenizer.decode_caption(ids), self._words)]
            if not bad:
                break
            tokens[bad] = self._decode_batches(features[bad], row_ids[bad], attempt, seed,
                                               temperature, alpha, options, batch_size)
        return tokens

    def encode_padded(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """`encode` in batches padded to bucket sizes (bounded compiles) -> numpy features."""
        out = []
        for start in range(0, len(images), batch_size):
            chunk = np.asarray(images[start : start + batch_size], np.float32)
            padded = pad_rows(chunk, bucket_for(len(chunk), batch_size))
            out.append(np.asarray(self.encode(padded))[: len(chunk)])
        return np.concatenate(out)

    def caption(
        self,
        images_or_paths: np.ndarray | Sequence[str | os.PathLike],
        method: Method = "topk",
        batch_size: int = 32,
        **options: Any,
    ) -> list[str]:
        """Captions for images (float32 NHWC (B, 224, 224, 3), normalised) or image files.

        `options` are `generate`'s (max_new_tokens, top_k, temperature, beam_width, alpha,
        seed, ...). A file that cannot be read raises `ImageError` naming it.
        """
        if isinstance(images_or_paths, np.ndarray | jax.Array):
            images = np.asarray(images_or_paths, np.float32)
        else:
            size = self.config.image_size
            images = np.stack([load_image(path, size) for path in images_or_paths])
        features = self.encode_padded(images, batch_size)
        tokens = self.generate(features, method, batch_size=batch_size, **options)
        return [self.tokenizer.decode_caption(row) for row in tokens]

    def _check_features(self, features: np.ndarray | jax.Array) -> None:
        width = self.config.perceiver.in_dim
        if features.ndim != 3 or features.shape[-1] != width:
            raise ValueError(f"features must be (B, S, {width}), got {tuple(features.shape)}")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a checkpoint directory that `load_pretrained` reads back."""
        metadata = {
            **self.metadata,
            "config": self.config.to_dict(),
            "tokenizer": self.metadata.get("tokenizer", GPT2_TOKENIZER),
        }
        params = {k: np.asarray(v) for k, v in self.params.items()}
        return save_checkpoint(path, params, metadata, overwrite=overwrite)


def load_pretrained(path: str | os.PathLike) -> CaptionModel:
    """Load a lensjax checkpoint directory (from `bridge import` or `CaptionModel.save`)."""
    params, metadata = load_checkpoint(path)
    cfg = CaptionerConfig.from_dict(metadata["config"])
    return CaptionModel.from_params(cfg, params, metadata)


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
    """LensToWords' `build_model`, straight from the released files (needs torch).

    `gpt2` is the public HF gpt2 folder or weights file (for wte, wpe, ln_f); `encoder` a timm
    ConvNeXt-Tiny checkpoint and `encoder_head` a head file, both optional.
    """
    from bridge.convert import import_model  # the bridge is the only torch user

    return import_model(
        perceiver=perciever_path,
        gpt2_blocks=gpt2_blocks_path,
        cross_attention=cross_attn_path,
        gpt2=gpt2,
        encoder=encoder,
        encoder_head=encoder_head,
        preset=preset,
    )
