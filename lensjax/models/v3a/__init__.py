"""v3a: ConvNeXt features -> ProjectionHead -> a 6-layer Transformer decoder (the notebook
`v3a_convnext_transformer`)."""

from lensjax.models.v3a.config import PRESETS, TransformerConfig, V3AConfig
from lensjax.models.v3a.modeling import V3ACaptioner

__all__ = ["PRESETS", "TransformerConfig", "V3AConfig", "V3ACaptioner"]
