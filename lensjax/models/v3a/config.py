"""v3a's configuration: ConvNeXt features -> ProjectionHead -> a 6-layer Transformer decoder.

Presets: `v3a` (LensToWords' v3a notebook: d_model 512, 8 heads, 6 post-norm layers, FF 2048,
dropout 0.1, 2,000 sinusoidal positions, the GPT-2 vocabulary) and `v3a-tiny` (for tests).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from lensjax.models.config_fields import JsonConfig
from lensjax.models.convnext import ConvNeXtConfig, HeadConfig


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """`nn.TransformerDecoderLayer(d_model, n_head, ff_dim, dropout, activation='gelu',
    batch_first=True)` x n_layer, post-norm, LayerNorm eps 1e-5; `nn.Embedding(vocab_size,
    d_model)`; a sinusoidal table of `max_positions` rows; `output_proj` Linear(d_model,
    vocab_size)."""

    vocab_size: int = 50257
    d_model: int = 512
    n_head: int = 8
    n_layer: int = 6
    ff_dim: int = 2048
    dropout: float = 0.1
    max_positions: int = 2000
    eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class V3AConfig(JsonConfig):
    """Whole-model configuration. `feature_dim`: the image features' width (the
    ProjectionHead's input); `encoder`/`head` None: the model captions features only."""

    family: ClassVar[str] = "v3a"

    decoder: TransformerConfig = TransformerConfig()
    feature_dim: int = 768
    encoder: ConvNeXtConfig | None = ConvNeXtConfig()
    head: HeadConfig | None = HeadConfig()
    image_size: int = 224
    preset: str = "custom"

    def __post_init__(self):
        if self.head is not None and self.head.out_dim != self.feature_dim:
            raise ValueError(f"the encoder head gives {self.head.out_dim}-wide features, the "
                             f"projection head takes {self.feature_dim}")


    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @property
    def decoder_layers(self) -> int:
        return self.decoder.n_layer

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one caption can have after its BOS (the sinusoidal table's rows)."""
        return self.decoder.max_positions - 1





def _tiny() -> V3AConfig:
    encoder = ConvNeXtConfig.tiny()
    head = HeadConfig(in_dims=encoder.out_dims, proj_dim=16)
    decoder = TransformerConfig(d_model=32, n_head=4, n_layer=2, ff_dim=64, max_positions=128)
    return V3AConfig(decoder, head.out_dim, encoder, head, preset="v3a-tiny")


PRESETS: dict[str, V3AConfig] = {
    "v3a": V3AConfig(preset="v3a"),
    "v3a-tiny": _tiny(),
}
