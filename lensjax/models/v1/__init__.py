"""v1: InceptionV3's pooled 2048-d vector -> an LSTM captioner over a word vocabulary (the
notebook `v1_inceptionv3_lstm`)."""

from lensjax.models.v1.config import PRESETS, V1Config
from lensjax.models.v1.modeling import V1Captioner

__all__ = ["PRESETS", "V1Captioner", "V1Config"]
