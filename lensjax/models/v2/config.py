"""v2's configuration: InceptionV3 (optional) -> mixed10 as (64, 2048) -> `V2Decoder`.

Presets: `v2` (the notebook's final model) and `v2-tiny` (a small decoder over InceptionV3's
2048-wide features, no encoder, for tests).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lensjax.models.inception import IMAGE_SIZE, InceptionConfig
from lensjax.models.lstm import V2DecoderConfig, WordModelConfig


@dataclasses.dataclass(frozen=True)
class V2Config(WordModelConfig):
    """Whole-model configuration. `encoder` None: the model captions features only;
    `max_len`: the longest caption it writes, in words (the notebook's 40)."""

    family: ClassVar[str] = "v2"

    decoder: V2DecoderConfig = V2DecoderConfig()
    encoder: InceptionConfig | None = InceptionConfig()
    image_size: int = IMAGE_SIZE
    max_len: int = 40
    preset: str = "custom"


PRESETS: dict[str, V2Config] = {
    "v2": V2Config(preset="v2"),
    "v2-tiny": V2Config(V2DecoderConfig(vocab_size=40, feature_dim=2048, patches=64, dim=16),
                        encoder=None, max_len=12, preset="v2-tiny"),
}
