"""v1's configuration: InceptionV3 (optional) -> pooled 2048-d features -> `V1Decoder`.

Presets: `v1` (the notebook's `model`, Add fusion), `v1-concat` (its `model1`: Concatenate,
L2 1e-4 on the LSTM kernels) and `v1-tiny` (a small decoder over InceptionV3's 2048-wide
features, no encoder, for tests).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lensjax.models.inception import IMAGE_SIZE, InceptionConfig
from lensjax.models.lstm import V1DecoderConfig, WordModelConfig, v1_decoder


@dataclasses.dataclass(frozen=True)
class V1Config(WordModelConfig):
    """Whole-model configuration. `encoder` None: the model captions features only;
    `max_len`: the longest caption it writes, in words (the notebook's `max_len`)."""

    family: ClassVar[str] = "v1"
    pooled_features: ClassVar[bool] = True

    decoder: V1DecoderConfig = V1DecoderConfig()
    encoder: InceptionConfig | None = InceptionConfig()
    image_size: int = IMAGE_SIZE
    max_len: int = 40
    preset: str = "custom"


def _tiny() -> V1Config:
    decoder = V1DecoderConfig(vocab_size=40, feature_dim=2048, embed_dim=16, hidden=24,
                              image_dim=24, merge_dim=16)
    return V1Config(decoder, encoder=None, max_len=12, preset="v1-tiny")


PRESETS: dict[str, V1Config] = {
    "v1": V1Config(v1_decoder("add"), preset="v1"),
    "v1-concat": V1Config(v1_decoder("concat"), preset="v1-concat"),
    "v1-tiny": _tiny(),
}
