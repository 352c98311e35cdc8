"""The assembled LensToWords captioner and its configuration presets.

images (B, 224, 224, 3) -> ConvNeXt stage maps -> MultiScaleHead -> features (B, 64, 768)
features -> Perceiver -> latents (B, 16, 768) -> GPT-2 with cross-attention -> logits.

Top-level components (also the optimizer's labels): `encoder`, `encoder_head`, `perceiver`,
`gpt2` (whose `xattn` children are the injected cross-attention blocks).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Mapping
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
    def from_dict(cls, data: Mapping[str, Any]) -> CaptionerConfig:
        """Inverse of `to_dict` (lists from JSON become tuples).

        Every field of every part must be present and of its type; otherwise a ValueError
        names the field (`config.gpt2.n_layer must be ...`).
        """
        return _from_fields(cls, data, "config")


def _from_fields(kind: type, data: Any, where: str) -> Any:
    """The config dataclass `kind` built from `data`, a mapping of all its fields, each
    checked against its annotation; `where` names `data` in errors."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object, found {reprlib.repr(data)}")
    names = [field.name for field in dataclasses.fields(kind)]
    unknown = [name for name in data if name not in names]
    missing = [name for name in names if name not in data]
    problems = []
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(str, unknown))}")
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    hints = typing.get_type_hints(kind)
    return kind(**{name: _field_value(hints[name], data[name], f"{where}.{name}")
                   for name in names})


def _field_value(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against the type `hint` (JSON lists become tuples, ints floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _field_value(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return _from_fields(hint, value, where)
    if origin is typing.Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, "
                         f"found {reprlib.repr(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, found {reprlib.repr(value)}")
        return tuple(_field_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if hint is int and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    expected = {int: "a non-negative integer", float: "a finite number", str: "a string"}
    raise ValueError(f"{where} must be {expected.get(hint, hint)}, found {reprlib.repr(value)}")


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

    def encode(self, images: jax.Array, *, remat: bool = False) -> jax.Array:
        """Normalised NHWC images (B, H, W, 3) -> features (B, 64, feature_dim). `remat`:
        gradient checkpointing of the encoder stages."""
        self.check_can_encode()
        return self.encoder_head(self.encoder(images, remat=remat))

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
