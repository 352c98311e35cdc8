"""v3b (and v3c, its COCO fine-tune): ConvNeXt features -> Perceiver resampler -> GPT-2 with
cross-attention injected into every layer (or prepended latents, phases 2a/2b)."""

from lensjax.models.v3b.captioner import PRESETS, Captioner, CaptionerConfig

__all__ = ["PRESETS", "Captioner", "CaptionerConfig"]
