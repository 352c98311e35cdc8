"""lensjax: the LensToWords image captioner in JAX/Flax.

    import lensjax
    model = lensjax.load_pretrained("weights/v3c")   # a lensjax checkpoint directory
    feats = model.encode(images)                     # (B, 224, 224, 3) NHWC -> (B, 64, 768)
    logits = model.logits(feats, input_ids)          # -> (B, T, 50257)

Importing lensjax never imports torch; only `build_model` (which reads .pth files) does.
"""

__version__ = "0.1.0"

from lensjax.api import CaptionModel, build_model, load_pretrained
from lensjax.models.captioner import Captioner, CaptionerConfig, MissingComponentError

__all__ = [
    "CaptionModel",
    "Captioner",
    "CaptionerConfig",
    "MissingComponentError",
    "build_model",
    "load_pretrained",
]
