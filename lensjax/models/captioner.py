"""The assembled LensToWords captioner and its configuration presets.

images (B, 224, 224, 3) -> ConvNeXt stage maps -> MultiScaleHead -> features (B, 64, 768)
features -> Perceiver -> latents (B, 16, 768) -> GPT-2 with cross-attention -> logits.

Top-level components (also the optimizer's labels): `encoder`, `encoder_head`, `perceiver`,
`gpt2` (whose `xattn` children are the injected cross-attention blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from lensjax.models.convnext import ConvNeXt, ConvNeXtConfig, HeadConfig, MultiScaleHead
from lensjax.models.gpt2 import GPT2Config, GPT2Decoder, Mode
from lensjax.models.perceiver import PerceiverConfig


class MissingComponentError(RuntimeError):
    """A component the call needs (e.g. the image encoder) is not in this model."""


@dataclasses.dataclass(frozen=True)
class CaptionerConfig:
    """Whole-model configuration. `encoder`/`head` None means the model has no image encoder
    (it captions pre-computed features only).
    """

    perceiver: PerceiverConfig
    gpt2: GPT2Config
    encoder: ConvNeXtConfig | None = ConvNeXtConfig()
    head: HeadConfig | None = HeadConfig()
    mode: Mode = "inject"
    image_size: int = 224
    preset: str = "custom"

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> CaptionerConfig:
        """Named presets: `v3b` (the released model), `v3b-src` (src/model.py form),
        `tiny`, `tiny-src` (small shapes for tests), `demo` (`make demo`'s model)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @property
    def feature_dim(self) -> int:
        return self.perceiver.in_dim

    @property
    def layout(self) -> str:
        """"notebook" (released files) or "src" (src/model.py form)."""
        return self.perceiver.layout

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionerConfig:
        """Inverse of `to_dict` (lists from JSON become tuples)."""

        def build(kind: type, value: dict[str, Any] | None) -> Any:
            if value is None:
                return None
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})

        return cls(
            perceiver=build(PerceiverConfig, data["perceiver"]),
            gpt2=build(GPT2Config, data["gpt2"]),
            encoder=build(ConvNeXtConfig, data.get("encoder")),
            head=build(HeadConfig, data.get("head")),
            mode=data.get("mode", "inject"),
            image_size=data.get("image_size", 224),
            preset=data.get("preset", "custom"),
        )


def _tiny(layout: str) -> CaptionerConfig:
    encoder = ConvNeXtConfig.tiny()
    head = HeadConfig(in_dims=encoder.out_dims, proj_dim=16)
    gpt2 = GPT2Config.tiny()
    perceiver = PerceiverConfig(
        layout=layout,  # type: ignore[arg-type]
        in_dim=head.out_dim,
        dim=gpt2.n_embd,
        num_latents=8,
        num_heads=4,
        num_layers=2 if layout == "notebook" else 0,
        ff_dim=128 if layout == "notebook" else 4 * gpt2.n_embd,
    )
    if layout == "src":
        gpt2 = dataclasses.replace(gpt2, xattn="shared", embd_pdrop=0.1)
    name = "tiny-src" if layout == "src" else "tiny"
    return CaptionerConfig(perceiver, gpt2, encoder, head, preset=name)


def _demo() -> CaptionerConfig:
    """make demo's model: the tiny shapes without dropout (a few hundred steps on the
    synthetic set are too few for dropout to pay off)."""
    tiny = _tiny("notebook")
    return dataclasses.replace(
        tiny, preset="demo",
        perceiver=dataclasses.replace(tiny.perceiver, dropout=0.0),
        gpt2=dataclasses.replace(tiny.gpt2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))


PRESETS: dict[str, CaptionerConfig] = {
    "v3b": CaptionerConfig(PerceiverConfig.notebook(), GPT2Config.gpt2(), preset="v3b"),
    "v3b-src": CaptionerConfig(PerceiverConfig.src(), GPT2Config.src(), preset="v3b-src"),
    "tiny": _tiny("notebook"),
    "tiny-src": _tiny("src"),
    "demo": _demo(),
}


class Captioner(nnx.Module):
    """The whole model. See the module docstring for shapes."""

    def __init__(self, cfg: CaptionerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = ConvNeXt(cfg.encoder, rngs=rngs) if cfg.encoder else None
        self.encoder_head = MultiScaleHead(cfg.head, rngs=rngs) if cfg.head else None
        self.perceiver = cfg.perceiver.build(rngs=rngs)
        self.gpt2 = GPT2Decoder(cfg.gpt2, rngs=rngs)

    def check_can_encode(self) -> None:
        """Raise MissingComponentError unless this model has an encoder and its head."""
        if self.encoder is None or self.encoder_head is None:
            missing = "image encoder" if self.encoder is None else "encoder head"
            raise MissingComponentError(
                f"this model has no {missing}, so it cannot encode images; import one with "
                "`python -m bridge import ... --encoder CONVNEXT.pth --encoder-head HEAD.pth` "
                "(or caption pre-computed features instead)"
            )

    def encode(self, images: jax.Array) -> jax.Array:
        """Normalised NHWC images (B, H, W, 3) -> features (B, 64, feature_dim)."""
        self.check_can_encode()
        return self.encoder_head(self.encoder(images))

    def resample(self, features: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Features (B, S, feature_dim) -> Perceiver latents (B, num_latents, n_embd)."""
        return self.perceiver(features, rngs=rngs)

    def __call__(
        self, features: jax.Array, input_ids: jax.Array, *, rngs: nnx.Rngs | None = None,
        remat: bool = False,
    ) -> jax.Array:
        """Features (B, S, feature_dim), ids (B, T) -> logits float32 (B, T, vocab).

        Runs in the config's mode (inject or prepend). Passing `rngs` turns dropout on;
        `remat` turns on gradient checkpointing of the GPT-2 blocks.
        """
        latents = self.resample(features, rngs=rngs)
        return self.gpt2(input_ids, latents, mode=self.cfg.mode, rngs=rngs, remat=remat)
