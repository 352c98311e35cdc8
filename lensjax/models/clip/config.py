"""CLIP's configuration: a ViT image tower and a causal text tower, projected into one space.

Presets: `clip-vit-b-32` (OpenAI's ViT-B/32: 224 px, 32 px patches, width 768, 12 layers, 12
heads; text width 512, 12 layers, 8 heads, context 77, vocabulary 49,408; embeddings 512) and
`clip-tiny` (for tests).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lensjax.models.config_fields import JsonConfig


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8


@dataclasses.dataclass(frozen=True)
class CLIPConfig(JsonConfig):
    """Both towers and the shared embedding width. LayerNorm eps 1e-5, QuickGELU, as OpenAI's."""

    family: ClassVar[str] = "clip"

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = 512
    eps: float = 1e-5
    preset: str = "custom"

    def __post_init__(self):
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(f"image size {self.vision.image_size} is not a multiple of the "
                             f"patch size {self.vision.patch_size}")






PRESETS: dict[str, CLIPConfig] = {
    "clip-vit-b-32": CLIPConfig(preset="clip-vit-b-32"),
    "clip-tiny": CLIPConfig(VisionConfig(image_size=64, patch_size=16, width=64, layers=2,
                                         heads=4),
                            TextConfig(width=32, layers=2, heads=4), embed_dim=24,
                            preset="clip-tiny"),
}
