"""v1's whole model: the optional InceptionV3 encoder and the LSTM decoder."""

from __future__ import annotations

import jax

from lensjax.models.lstm import V1Decoder, WordCaptioner


class V1Captioner(WordCaptioner):
    """Params: `encoder.*` (InceptionV3, when the config has one) and `decoder.*` (the
    notebook's layers by their Keras names). Features (B, 2048)."""

    decoder_class = V1Decoder

    def _features(self, images: jax.Array) -> jax.Array:
        return self.encoder.pooled(images)
