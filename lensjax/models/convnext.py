"""ConvNeXt backbone with timm's structure and parameter names, and the multi-scale head.

`ConvNeXt` mirrors `timm.create_model('convnext_tiny', features_only=True, out_indices=(1,2,3))`
(NHWC here, NCHW in timm). `MultiScaleHead` turns its stage maps into the (B, 64, 768)
feature tokens that LensToWords feeds to the Perceiver.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.models import init
from lensjax.models.layers import (
    DepthwiseConv2d,
    Linear,
    adaptive_avg_pool2d,
    gelu_exact,
    layer_norm,
)


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """ConvNeXt shape. Presets: `convnext_tiny` (timm's), `tiny` (for fast tests)."""

    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    out_indices: tuple[int, ...] = (1, 2, 3)
    eps: float = 1e-6
    ls_init_value: float = 1e-6

    @classmethod
    def convnext_tiny(cls) -> ConvNeXtConfig:
        return cls()

    @classmethod
    def tiny(cls) -> ConvNeXtConfig:
        return cls(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64))

    @property
    def out_dims(self) -> tuple[int, ...]:
        return tuple(self.dims[i] for i in self.out_indices)


class ConvNeXtBlock(nnx.Module):
    """7x7 depthwise conv, LayerNorm, fc1, exact GELU, fc2, layer scale `gamma`, residual."""

    def __init__(self, dim: int, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
        self.conv_dw = DepthwiseConv2d(dim, 7, rngs=rngs)
        self.norm = layer_norm(dim, cfg.eps, rngs=rngs)
        self.mlp = ConvNeXtMlp(dim, 4 * dim, rngs=rngs)
        self.gamma = nnx.Param(jax.device_put(np.full((dim,), cfg.ls_init_value, np.float32)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        y = self.mlp(self.norm(self.conv_dw(x)))
        return x + y * self.gamma[...]


class ConvNeXtMlp(nnx.Module):
    """timm `Mlp`: fc1, exact GELU, fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden, rngs=rngs)
        self.fc2 = Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu_exact(self.fc1(x)))


class ConvNeXtStage(nnx.Module):
    """Optional downsample (LayerNorm2d + 2x2/2 conv), then `depth` blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        cfg: ConvNeXtConfig,
        *,
        downsample: bool,
        rngs: nnx.Rngs,
    ):
        self.downsample = (
            nnx.List(
                [
                    layer_norm(in_dim, cfg.eps, rngs=rngs),
                    nnx.Conv(in_dim, dim, (2, 2), strides=(2, 2), padding="VALID",
                             kernel_init=init.lecun_normal(), bias_init=init.zeros, rngs=rngs),
                ]
            )
            if downsample
            else None
        )
        self.blocks = nnx.List([ConvNeXtBlock(dim, cfg, rngs=rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample[1](self.downsample[0](x))
        for block in self.blocks:
            x = block(x)
        return x


class ConvNeXt(nnx.Module):
    """ConvNeXt feature extractor: (B, H, W, 3) -> list of NHWC maps at `cfg.out_indices`.

    For convnext_tiny at 224x224: (B, 28, 28, 192), (B, 14, 14, 384), (B, 7, 7, 768).
    """

    def __init__(self, cfg: ConvNeXtConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.stem = nnx.List(
            [
                nnx.Conv(3, cfg.dims[0], (4, 4), strides=(4, 4), padding="VALID",
                         kernel_init=init.lecun_normal(), bias_init=init.zeros, rngs=rngs),
                layer_norm(cfg.dims[0], cfg.eps, rngs=rngs),
            ]
        )
        in_dims = (cfg.dims[0],) + cfg.dims[:-1]
        self.stages = nnx.List(
            [
                ConvNeXtStage(i, d, n, cfg, downsample=index > 0, rngs=rngs)
                for index, (i, d, n) in enumerate(zip(in_dims, cfg.dims, cfg.depths, strict=True))
            ]
        )

    def __call__(self, images: jax.Array, *, remat: bool = False) -> list[jax.Array]:
        """Images (B, H, W, 3) -> the maps of `out_indices`. `remat` recomputes each stage in
        the backward pass instead of storing its activations (gradient checkpointing)."""
        x = self.stem[1](self.stem[0](images))
        maps = []
        for index, stage in enumerate(self.stages):
            x = _checkpointed(stage, x) if remat else stage(x)
            if index in self.cfg.out_indices:
                maps.append(x)
            if index >= max(self.cfg.out_indices):
                break
        return maps


def _checkpointed(stage: ConvNeXtStage, x: jax.Array) -> jax.Array:
    """`stage(x)` under `jax.checkpoint`: only its input is kept for the backward pass."""
    graphdef, state = nnx.split(stage)

    @jax.checkpoint
    def run(state: nnx.State, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(x)

    return run(state, x)


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """Multi-scale head: pool each map to `pool_size`^2 tokens, project each to `proj_dim`."""

    in_dims: tuple[int, ...] = (192, 384, 768)
    proj_dim: int = 256
    pool_size: int = 8
    eps: float = 1e-5

    @property
    def out_dim(self) -> int:
        return self.proj_dim * len(self.in_dims)


class MultiScaleHead(nnx.Module):
    """Adaptive-average-pool each stage map, flatten row-major, project, concat, LayerNorm.

    maps [(B, H_i, W_i, C_i)] -> (B, pool_size**2, proj_dim * len(maps)), e.g. (B, 64, 768).
    Params: `projections.{0,1,2}` (Linear C_i -> proj_dim), `norm` (LayerNorm, eps 1e-5).
    """

    def __init__(self, cfg: HeadConfig, *, rngs: nnx.Rngs):
        self.pool_size = cfg.pool_size
        self.projections = nnx.List([Linear(c, cfg.proj_dim, rngs=rngs) for c in cfg.in_dims])
        self.norm = layer_norm(cfg.out_dim, cfg.eps, rngs=rngs)

    def __call__(self, maps: Sequence[jax.Array]) -> jax.Array:
        tokens = []
        for feature_map, projection in zip(maps, self.projections, strict=True):
            pooled = adaptive_avg_pool2d(feature_map, (self.pool_size, self.pool_size))
            batch, height, width, channels = pooled.shape
            tokens.append(projection(pooled.reshape(batch, height * width, channels)))
        return self.norm(jnp.concatenate(tokens, axis=-1))
