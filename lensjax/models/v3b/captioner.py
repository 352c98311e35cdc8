"""The assembled LensToWords captioner and its configuration presets.

images (B, 224, 224, 3) -> ConvNeXt stage maps -> MultiScaleHead -> features (B, 64, 768)
features -> Perceiver -> latents (B, 16, 768) -> GPT-2 with cross-attention -> logits.

Top-level components (also the optimizer's labels): `encoder`, `encoder_head`, `perceiver`,
`gpt2` (whose `xattn` children are the injected cross-attention blocks).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.data.tokenizer import EOS_ID
from lensjax.models.config_fields import JsonConfig
from lensjax.models.convnext import ConvNeXtConfig, HeadConfig
from lensjax.models.decoding import DecodePrefix, KVCacheDecoding
from lensjax.models.encoding import ImageEncoding
from lensjax.models.kv_cache import KVCache
from lensjax.models.output_loss import LossRows, output_cross_entropy
from lensjax.models.v3b.gpt2 import GPT2Config, GPT2Decoder, Mode
from lensjax.models.v3b.perceiver import PerceiverConfig


@dataclasses.dataclass(frozen=True)
class CaptionerConfig(JsonConfig):
    """Whole-model configuration. `encoder`/`head` None means the model has no image encoder
    (it captions pre-computed features only).
    """

    family: ClassVar[str] = "v3b"

    perceiver: PerceiverConfig
    gpt2: GPT2Config
    encoder: ConvNeXtConfig | None = ConvNeXtConfig()
    head: HeadConfig | None = HeadConfig()
    mode: Mode = "inject"
    image_size: int = 224
    preset: str = "custom"


    @property
    def feature_dim(self) -> int:
        return self.perceiver.in_dim

    @property
    def vocab_size(self) -> int:
        return self.gpt2.vocab_size

    @property
    def decoder_layers(self) -> int:
        return self.gpt2.n_layer

    @property
    def max_new_tokens(self) -> int:
        """The most tokens one caption can have after its BOS (positions left by the BOS
        and, in prepend mode, the latents)."""
        prefix = 1 + (self.perceiver.num_latents if self.mode == "prepend" else 0)
        return self.gpt2.n_positions - prefix

    def describe(self) -> str:
        """e.g. "v3b preset 'tiny', layout 'notebook'", for messages."""
        return f"v3b preset {self.preset!r}, layout {self.layout!r}"

    @property
    def layout(self) -> str:
        """"notebook" (released files) or "src" (src/model.py form)."""
        return self.perceiver.layout




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


# Named presets (`CaptionerConfig.from_preset`): `v3b` (the released model), `v3b-src`
# (src/model.py form), `tiny`, `tiny-src` (small shapes for tests), `demo` (make demo's model).
PRESETS: dict[str, CaptionerConfig] = {
    "v3b": CaptionerConfig(PerceiverConfig.notebook(), GPT2Config.gpt2(), preset="v3b"),
    "v3b-src": CaptionerConfig(PerceiverConfig.src(), GPT2Config.src(), preset="v3b-src"),
    "tiny": _tiny("notebook"),
    "tiny-src": _tiny("src"),
    "demo": _demo(),
}


class Captioner(ImageEncoding, KVCacheDecoding):
    """The whole model. See the module docstring for shapes."""

    def __init__(self, cfg: CaptionerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        super().__init__(cfg.encoder, cfg.head, rngs=rngs)
        self.perceiver = cfg.perceiver.build(rngs=rngs)
        self.gpt2 = GPT2Decoder(cfg.gpt2, rngs=rngs)

    def resample(self, features: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Features (B, S, feature_dim) -> Perceiver latents (B, num_latents, n_embd)."""
        return self.perceiver(features, rngs=rngs)

    def start_decoding(self, features: jax.Array, slots: int, max_new: int) -> DecodePrefix:
        """Decode hook (`lensjax.models.decoding`): the Perceiver, the cross-attention keys
        and values of the latents (once per image, shared by its `slots` rows) and the BOS
        step, in the config's mode."""
        latents = self.resample(features)
        rows = latents.shape[0] * slots
        bos = jnp.full((rows, 1), EOS_ID, jnp.int32)
        gpt2 = self.gpt2
        if self.cfg.mode == "prepend":
            x, cross_kv = gpt2.embed(bos, jnp.repeat(latents, slots, axis=0)), None
        else:
            cross_kv = jax.tree.map(lambda a: jnp.repeat(a, slots, axis=0),
                                    gpt2.cross_kv(latents))
            x = gpt2.embed(bos)
        cache = gpt2.init_cache(latents.shape[0], x.shape[1] + max_new, x.dtype, slots)
        hidden, cache = gpt2.transform(x, cross_kv, position=0, cache=cache)
        return DecodePrefix(cross_kv, cache, gpt2.lm_logits(hidden[:, -1]), x.shape[1])

    def decode_step(self, context, cache: list[KVCache], tokens: jax.Array,
                    position: jax.Array | int, origin: jax.Array | None = None
                    ) -> tuple[jax.Array, list[KVCache]]:
        """Decode hook: one token per row (rows,) at `position` -> (logits (rows, vocab),
        cache); `context` is the prefix's cross-attention keys and values."""
        gpt2 = self.gpt2
        hidden, cache = gpt2.transform(gpt2.embed(tokens[:, None]), context, position=position,
                                       cache=cache, origin=origin)
        return gpt2.lm_logits(hidden[:, 0]), cache

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

    def token_losses(
        self, features: jax.Array, input_ids: jax.Array, targets: jax.Array, *,
        rngs: nnx.Rngs | None = None, remat: bool = False, rows: LossRows | None = None,
    ) -> jax.Array:
        """Features (B, S, feature_dim), ids and targets (B, T) int -> cross-entropy of each
        position float32 (B, T), as from `__call__`'s logits, without forming them
        (`lensjax.models.output_loss`; with `rows`, only the counted positions', 0 elsewhere)."""
        latents = self.resample(features, rngs=rngs)
        hidden = self.gpt2.hidden_states(input_ids, latents, mode=self.cfg.mode, rngs=rngs,
                                         remat=remat)
        return output_cross_entropy(hidden, self.gpt2.wte.embedding[...], None, targets,
                                    rows=rows)
