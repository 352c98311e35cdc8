"""The image side every ConvNeXt-feature family shares (v3a, v3b): an optional timm
ConvNeXt and its multi-scale head, images (B, H, W, 3) -> features (B, 64, feature_dim)."""

from __future__ import annotations

import jax
from flax import nnx

from lensjax.models.convnext import ConvNeXt, ConvNeXtConfig, HeadConfig, MultiScaleHead

# The image side's optimizer labels and initial-weight group, shared by the families that
# have it (see lensjax.models.families).
IMAGE_LABEL_RULES: tuple[tuple[str, str], ...] = (
    ("encoder_head", r"^encoder_head\."),
    ("encoder", r"^encoder\."),
)
IMAGE_INIT_GROUPS: dict[str, tuple[str, ...]] = {"encoder": ("encoder", "encoder_head")}


class MissingComponentError(RuntimeError):
    """A component the call needs (e.g. the image encoder) is not in this model."""


class ImageEncoding(nnx.Module):
    """Base of a captioner with an optional image encoder: sets `encoder` and `encoder_head`
    (None when the model captions pre-computed features only)."""

    def __init__(self, encoder: ConvNeXtConfig | None, head: HeadConfig | None, *,
                 rngs: nnx.Rngs):
        self.encoder = ConvNeXt(encoder, rngs=rngs) if encoder else None
        self.encoder_head = MultiScaleHead(head, rngs=rngs) if head else None

    def check_can_encode(self) -> None:
        """Raise MissingComponentError unless this model has an encoder and its head."""
        if self.encoder is None or self.encoder_head is None:
            missing = "image encoder" if self.encoder is None else "encoder head"
            raise MissingComponentError(
                f"this model has no {missing}, so it cannot encode images; import one with "
                "`python -m bridge import ... --encoder CONVNEXT.pth --encoder-head HEAD.pth` "
                "(or caption pre-computed features instead)"
            )

    def encode(self, images: jax.Array, *, remat: bool = False) -> jax.Array:
        """Normalised NHWC images (B, H, W, 3) -> features (B, 64, feature_dim). `remat`:
        gradient checkpointing of the encoder stages."""
        self.check_can_encode()
        return self.encoder_head(self.encoder(images, remat=remat))
