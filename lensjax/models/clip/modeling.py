"""OpenAI CLIP in Flax NNX: a scorer of image-caption pairs, not a captioner.

image (B, S, S, 3), CLIP-normalised -> 32 px patches (conv1, no bias) -> [class token;
patches] + positional_embedding -> ln_pre -> pre-norm residual blocks (QuickGELU MLP) ->
ln_post of the class token -> @ proj -> (B, embed_dim).
ids (B, 77) -> token_embedding + positional_embedding -> the same blocks, causal -> ln_final
-> the hidden state at each row's end-of-text token (the largest id) -> @ text_projection ->
(B, embed_dim).

Both embeddings are unnormalised, as CLIP's `encode_image` / `encode_text`. Parameter paths
follow the OpenAI / open_clip state dict (`visual.conv1`, `visual.transformer.resblocks.{i}
.attn`, `token_embedding`, `ln_final`, `text_projection`, `logit_scale`, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lensjax.models import init
from lensjax.models.clip.config import CLIPConfig, TextConfig, VisionConfig
from lensjax.models.layers import Linear, MultiheadAttention, layer_norm


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x): OpenAI CLIP's activation."""
    return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.c_fc = Linear(width, 4 * width, rngs=rngs)
        self.c_proj = Linear(4 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ResidualBlock(nnx.Module):
    """x = x + attn(ln_1 x); x = x + mlp(ln_2 x)."""

    def __init__(self, width: int, heads: int, eps: float, *, rngs: nnx.Rngs):
        self.ln_1 = layer_norm(width, eps, rngs=rngs)
        self.attn = MultiheadAttention(width, heads, rngs=rngs)
        self.ln_2 = layer_norm(width, eps, rngs=rngs)
        self.mlp = Mlp(width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(B, T, width) -> (B, T, width); `mask` bool (T, T), True = attend."""
        h = self.ln_1(x)
        x = x + self.attn(h, mask=None if mask is None else mask[None, None])
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    def __init__(self, width: int, layers: int, heads: int, eps: float, *, rngs: nnx.Rngs):
        self.resblocks = nnx.List([ResidualBlock(width, heads, eps, rngs=rngs)
                                   for _ in range(layers)])

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTower(nnx.Module):
    """Params: conv1 (patch, patch, 3, width) HWIO, class_embedding, positional_embedding
    (grid**2 + 1, width), ln_pre, transformer, ln_post, proj (width, embed_dim)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, eps: float, *, rngs: nnx.Rngs):
        self.cfg = cfg
        scale = cfg.width ** -0.5
        normal = init.normal(scale)
        self.conv1 = nnx.Param(init.lecun_normal()(
            rngs.params(), (cfg.patch_size, cfg.patch_size, 3, cfg.width)))
        self.class_embedding = nnx.Param(normal(rngs.params(), (cfg.width,)))
        self.positional_embedding = nnx.Param(normal(rngs.params(), (cfg.grid ** 2 + 1,
                                                                      cfg.width)))
        self.ln_pre = layer_norm(cfg.width, eps, rngs=rngs)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, eps, rngs=rngs)
        self.ln_post = layer_norm(cfg.width, eps, rngs=rngs)
        self.proj = nnx.Param(normal(rngs.params(), (cfg.width, embed_dim)))

    def __call__(self, images: jax.Array) -> jax.Array:
        """(B, S, S, 3) -> (B, embed_dim)."""
        batch, size = images.shape[0], self.cfg.patch_size
        grid = self.cfg.grid
        # Non-overlapping patches as one matmul: (B, grid, size, grid, size, 3) -> rows of
        # (size, size, 3) pixels against the HWIO kernel flattened the same way.
        patches = images.reshape(batch, grid, size, grid, size, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, grid * grid, size * size * 3)
        kernel = self.conv1[...].reshape(size * size * 3, self.cfg.width)
        x = patches @ kernel
        cls = jnp.broadcast_to(self.class_embedding[...], (batch, 1, self.cfg.width))
        x = jnp.concatenate([cls.astype(x.dtype), x], axis=1) + self.positional_embedding[...]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj[...]


class CLIP(nnx.Module):
    """Both towers. Text params at the top level, as in OpenAI's state dict."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        text: TextConfig = cfg.text
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.eps, rngs=rngs)
        self.token_embedding = nnx.Embed(text.vocab_size, text.width,
                                         embedding_init=init.normal(0.02), rngs=rngs)
        self.positional_embedding = nnx.Param(init.normal(0.01)(
            rngs.params(), (text.context_length, text.width)))
        self.transformer = Transformer(text.width, text.layers, text.heads, cfg.eps, rngs=rngs)
        self.ln_final = layer_norm(text.width, cfg.eps, rngs=rngs)
        self.text_projection = nnx.Param(init.normal(text.width ** -0.5)(
            rngs.params(), (text.width, cfg.embed_dim)))
        self.logit_scale = nnx.Param(jnp.asarray(jnp.log(1 / 0.07), jnp.float32))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """CLIP-normalised NHWC images (B, S, S, 3) -> unnormalised embeddings (B, D)."""
        return self.visual(images)

    def encode_text(self, ids: jax.Array) -> jax.Array:
        """Token ids (B, context_length), each row SOT ... EOT then zeros -> (B, D): the
        hidden state at the end-of-text token (the row's largest id)."""
        length = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[...][:length]
        x = self.transformer(x, jnp.tril(jnp.ones((length, length), bool)))
        x = self.ln_final(x)
        end = jnp.argmax(ids, axis=-1)
        return x[jnp.arange(x.shape[0]), end] @ self.text_projection[...]
