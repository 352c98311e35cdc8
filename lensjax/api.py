"""The public model object: `load_pretrained`, `build_model` and `CaptionModel`.

Hot paths are pure functions jitted over the parameter state (the graph definition is
static), so no Python graph traversal happens per call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.checkpoint import GPT2_TOKENIZER, load_checkpoint, save_checkpoint
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
        expected = (self.config.perceiver.in_dim,)
        if features.ndim != 3 or features.shape[-1:] != expected:
            raise ValueError(
                f"features must be (B, S, {expected[0]}), got {tuple(features.shape)}"
            )
        if input_ids.ndim != 2 or input_ids.shape[0] != features.shape[0]:
            raise ValueError(
                f"input_ids must be (B, T) with B = {features.shape[0]}, got "
                f"{tuple(input_ids.shape)}"
            )
        return self._logits(self.state, features, input_ids)

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
