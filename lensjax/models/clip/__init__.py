"""CLIP (OpenAI's ViT-B/32 and smaller shapes) in Flax: the image-caption scorer LensToWords'
v3d used to filter Instagram pairs."""

from lensjax.models.clip.config import PRESETS, CLIPConfig, TextConfig, VisionConfig
from lensjax.models.clip.modeling import CLIP

__all__ = ["CLIP", "CLIPConfig", "PRESETS", "TextConfig", "VisionConfig"]
