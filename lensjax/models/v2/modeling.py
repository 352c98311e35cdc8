"""v2's whole model: the optional InceptionV3 encoder and the attention LSTM decoder."""

from __future__ import annotations

import jax
from flax import nnx

from lensjax.models.lstm import V2Decoder, WordCaptioner
from lensjax.models.v2.config import V2Config


class V2Captioner(WordCaptioner):
    """Params: `encoder.*` (InceptionV3, when the config has one) and `decoder.*` (the
    notebook's layers). Features (B, 64, 2048)."""

    def __init__(self, cfg: V2Config, *, rngs: nnx.Rngs):
        super().__init__(cfg.encoder, rngs=rngs)
        self.cfg = cfg
        self.decoder = V2Decoder(cfg.decoder, rngs=rngs)

    def _features(self, images: jax.Array) -> jax.Array:
        return self.encoder.patches(images)
