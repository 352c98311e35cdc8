"""v1's whole model: the optional InceptionV3 encoder and the LSTM decoder."""

from __future__ import annotations

import jax
from flax import nnx

from lensjax.models.lstm import V1Decoder, WordCaptioner
from lensjax.models.v1.config import V1Config


class V1Captioner(WordCaptioner):
    """Params: `encoder.*` (InceptionV3, when the config has one) and `decoder.*` (the
    notebook's layers by their Keras names). Features (B, 2048)."""

    def __init__(self, cfg: V1Config, *, rngs: nnx.Rngs):
        super().__init__(cfg.encoder, rngs=rngs)
        self.cfg = cfg
        self.decoder = V1Decoder(cfg.decoder, rngs=rngs)

    def _features(self, images: jax.Array) -> jax.Array:
        return self.encoder.pooled(images)
