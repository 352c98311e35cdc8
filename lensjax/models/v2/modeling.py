"""v2's whole model: the optional InceptionV3 encoder and the attention LSTM decoder."""

from __future__ import annotations

import jax

from lensjax.models.lstm import V2Decoder, WordCaptioner


class V2Captioner(WordCaptioner):
    """Params: `encoder.*` (InceptionV3, when the config has one) and `decoder.*` (the
    notebook's layers). Features (B, 64, 2048)."""

    decoder_class = V2Decoder

    def _features(self, images: jax.Array) -> jax.Array:
        return self.encoder.patches(images)
