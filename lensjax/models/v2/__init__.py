"""v2: InceptionV3's mixed10 (64 patches) -> an LSTM with additive attention over a word
vocabulary (the notebook `v2_inceptionv3_attention`)."""

from lensjax.models.v2.config import PRESETS, V2Config
from lensjax.models.v2.modeling import V2Captioner

__all__ = ["PRESETS", "V2Captioner", "V2Config"]
