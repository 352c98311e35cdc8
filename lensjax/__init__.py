"""lensjax: the LensToWords image captioners in JAX/Flax (families v3b and v3a).

    import lensjax
    model = lensjax.load_pretrained("weights/v3c")   # a lensjax checkpoint, of any family
    feats = model.encode(images)                     # (B, 224, 224, 3) NHWC -> (B, 64, 768)
    logits = model.logits(feats, input_ids)          # -> (B, T, 50257)

Importing lensjax never imports torch; only `build_model` (which reads .pth files) does.
"""

__version__ = "0.1.0"

from lensjax.api import CaptionModel, build_model, load_pretrained
from lensjax.models.encoding import MissingComponentError
from lensjax.models.v3a import V3ACaptioner, V3AConfig
from lensjax.models.v3b.captioner import Captioner, CaptionerConfig

__all__ = [
    "CaptionModel",
    "Captioner",
    "CaptionerConfig",
    "MissingComponentError",
    "V3ACaptioner",
    "V3AConfig",
    "build_model",
    "load_pretrained",
]
