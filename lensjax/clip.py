"""CLIP as a scorer of image-caption pairs (`lensjax.load_pretrained` of a CLIP checkpoint).

    clip = lensjax.load_pretrained("weights/clip-vit-b-32")
    clip.encode_image(pixels)            # float32 NHWC (B, 224, 224, 3), preprocessed -> (B, 512)
    clip.encode_text(["a dog", ...])     # or int ids (B, 77) -> (B, 512)
    clip.similarity(paths_or_pixels, texts)   # cosine of each (image, text) pair -> (B,)

Embeddings are unnormalised, as CLIP's `encode_image` / `encode_text`. Images are prepared as
OpenAI's CLIP prepares them (`preprocess`): bicubic resize of the short side to 224, centre
crop, CLIP's mean and standard deviation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from lensjax.checkpoint import save_checkpoint
from lensjax.data.images import open_rgb
from lensjax.models.clip import CLIP, CLIPConfig
from lensjax.params import flat_params

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def preprocess(image: Image.Image, size: int = 224) -> np.ndarray:
    """RGB PIL image -> float32 (size, size, 3): torchvision's Resize(size, BICUBIC) of the
    short side, CenterCrop(size), then CLIP's normalisation."""
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    image = image.resize(new, Image.BICUBIC)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255.0
    return (pixels - MEAN) / STD


def load_image(path: str | os.PathLike, size: int = 224) -> np.ndarray:
    """Image file -> `preprocess`ed float32 (size, size, 3); ImageError for unusable files."""
    return preprocess(open_rgb(path), size)


class ClipModel:
    """A CLIP module with jitted image and text encoders."""

    def __init__(self, module: CLIP, metadata: Mapping[str, Any] | None = None):
        self.module = module
        self.config: CLIPConfig = module.cfg
        self.metadata: dict[str, Any] = dict(metadata or {})
        graphdef, self.state = nnx.split(module)
        self._image = jax.jit(lambda state, x: nnx.merge(graphdef, state).encode_image(x))
        self._text = jax.jit(lambda state, ids: nnx.merge(graphdef, state).encode_text(ids))
        self._tokenizer = None

    @property
    def tokenizer(self):
        """CLIP's BPE tokenizer (`lensjax.data.clip_tokenizer`), created on first use."""
        if self._tokenizer is None:
            from lensjax.data.clip_tokenizer import ClipTokenizer

            self._tokenizer = ClipTokenizer()
        return self._tokenizer

    def encode_image(self, pixels: np.ndarray | jax.Array) -> jax.Array:
        """Preprocessed float32 NHWC (B, S, S, 3), S the model's image size -> (B, D)."""
        pixels = np.asarray(pixels, np.float32)
        size = self.config.vision.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (size, size, 3):
            raise ValueError(f"encode_image expects preprocessed NHWC images (B, {size}, "
                             f"{size}, 3), got shape {tuple(pixels.shape)}")
        return self._image(self.state, jnp.asarray(pixels))

    def encode_text(self, texts: str | Sequence[str] | np.ndarray) -> jax.Array:
        """Strings (tokenized, cut to 77 tokens) or int ids (B, context_length) -> (B, D)."""
        if isinstance(texts, str) or (isinstance(texts, Sequence)
                                      and all(isinstance(t, str) for t in texts)):
            ids = self.tokenizer.tokenize(texts, self.config.text.context_length)
        else:
            ids = np.asarray(texts)
            context = self.config.text.context_length
            if ids.ndim != 2 or ids.shape[1] != context or not np.issubdtype(ids.dtype,
                                                                            np.integer):
                raise ValueError(f"token ids must be int (B, {context}), got "
                                 f"{ids.dtype} {tuple(ids.shape)}")
            if ids.size and (ids.min() < 0 or ids.max() >= self.config.text.vocab_size):
                raise ValueError(f"token ids must be in 0..{self.config.text.vocab_size - 1}")
        return self._text(self.state, jnp.asarray(ids, jnp.int32))

    def images(self, images_or_paths: np.ndarray | Sequence[str | os.PathLike]) -> np.ndarray:
        """Preprocessed pixels from an array (returned as is) or image files."""
        if isinstance(images_or_paths, np.ndarray | jax.Array):
            return np.asarray(images_or_paths, np.float32)
        size = self.config.vision.image_size
        return np.stack([load_image(p, size) for p in images_or_paths])

    def similarity(self, images_or_paths: np.ndarray | Sequence[str | os.PathLike],
                   texts: Sequence[str] | np.ndarray) -> np.ndarray:
        """Cosine similarity of each (image, text) pair -> float32 (B,)."""
        image = np.array(self.encode_image(self.images(images_or_paths)))
        text = np.array(self.encode_text(texts))
        if len(image) != len(text):
            raise ValueError(f"{len(image)} images but {len(text)} texts: similarity scores "
                             "pairs")
        image /= np.linalg.norm(image, axis=-1, keepdims=True)
        text /= np.linalg.norm(text, axis=-1, keepdims=True)
        return np.sum(image * text, axis=-1)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """A checkpoint directory `load_pretrained` reads back."""
        metadata = {**self.metadata, "family": "clip", "config": self.config.to_dict()}
        params = {k: np.asarray(v, np.float32) for k, v in flat_params(self.module).items()}
        return save_checkpoint(path, params, metadata, overwrite=overwrite)
