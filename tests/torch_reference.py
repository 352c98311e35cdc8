"""PyTorch reference models that parity is measured against, built as SEED.md describes.

The encoder is timm's own ConvNeXt, GPT-2 is transformers' own `GPT2LMHeadModel` (its blocks
reused one by one), attention is `nn.MultiheadAttention` and the Perceiver's layers are
`nn.TransformerEncoderLayer`: nothing here re-implements what those libraries provide.
`write_released_files` saves the components exactly as LensToWords did.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2LMHeadModel

from lensjax.models.v3b.captioner import CaptionerConfig


class Head(nn.Module):
    """The multi-scale head: pool 8x8, flatten row-major, Linear(C, 256) each, concat, LN."""

    def __init__(self, cfg: CaptionerConfig, src_names: bool = False):
        super().__init__()
        head = cfg.head
        self.src_names = src_names
        self.pool = nn.AdaptiveAvgPool2d((head.pool_size, head.pool_size))
        linears = [nn.Linear(c, head.proj_dim) for c in head.in_dims]
        if src_names:
            self.proj1, self.proj2, self.proj3 = linears
        else:
            self.projections = nn.ModuleList(linears)
        self.norm = nn.LayerNorm(head.out_dim)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        linears = [self.proj1, self.proj2, self.proj3] if self.src_names else self.projections
        tokens = []
        for feature_map, linear in zip(maps, linears, strict=True):
            pooled = self.pool(feature_map)
            batch, channels, height, width = pooled.shape
            tokens.append(linear(pooled.permute(0, 2, 3, 1).reshape(batch, height * width, -1)))
        return self.norm(torch.cat(tokens, dim=2))


class NotebookPerceiver(nn.Module):
    """The trained Perceiver (keys of best_perciever.pth)."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        p = cfg.perceiver
        self.linear = nn.Linear(p.in_dim, p.dim)
        self.latents = nn.Parameter(torch.randn(p.num_latents, p.dim))
        self.cross_attn = nn.MultiheadAttention(p.dim, p.num_heads, batch_first=True)
        self.self_attn = nn.ModuleList(
            nn.TransformerEncoderLayer(
                p.dim, p.num_heads, p.ff_dim, dropout=p.dropout, activation="gelu",
                batch_first=True,
            )
            for _ in range(p.num_layers)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(features)
        queries = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        x, _ = self.cross_attn(queries, tokens, tokens)
        for layer in self.self_attn:
            x = layer(x)
        return x


class SrcPerceiver(nn.Module):
    """The Perceiver of LensToWords' src/model.py."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        p = cfg.perceiver
        self.latents = nn.Parameter(torch.randn(p.num_latents, p.dim))
        self.img_proj = nn.Linear(p.in_dim, p.dim)
        self.cross_attn = nn.MultiheadAttention(p.dim, p.num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(p.dim)
        self.ff = nn.Sequential(nn.Linear(p.dim, p.ff_dim), nn.GELU(), nn.Linear(p.ff_dim, p.dim))
        self.norm2 = nn.LayerNorm(p.dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        kv = self.img_proj(features)
        q = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        x = self.norm1(q + self.cross_attn(q, kv, kv)[0])
        return self.norm2(x + self.ff(x))


class CrossAttentionBlock(nn.Module):
    """Per-layer injected cross-attention (keys of best_cross_attention.pth)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return x + self.cross_attn(self.layernorm(x), latents, latents)[0]


class SharedCrossAttention(nn.Module):
    """src/model.py's CrossAttention: norm(x + attn(x, ctx, ctx))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x, latents, latents)[0])


def hf_gpt2(cfg: CaptionerConfig) -> GPT2LMHeadModel:
    g = cfg.gpt2
    config = HFGPT2Config(
        vocab_size=g.vocab_size, n_positions=g.n_positions, n_embd=g.n_embd, n_layer=g.n_layer,
        n_head=g.n_head, layer_norm_epsilon=g.eps, attn_implementation="eager",
    )
    return GPT2LMHeadModel(config)


class Captioner(nn.Module):
    """Encoder + head + Perceiver + GPT-2 with cross-attention, as LensToWords runs them."""

    def __init__(self, cfg: CaptionerConfig):
        super().__init__()
        self.cfg = cfg
        src = cfg.layout == "src"
        if cfg.encoder is not None:
            self.encoder = timm.create_model(
                "convnext_tiny", pretrained=False, features_only=True,
                out_indices=cfg.encoder.out_indices, depths=cfg.encoder.depths,
                dims=cfg.encoder.dims,
            )
            self.head = Head(cfg, src_names=src)
        self.perceiver = (SrcPerceiver if src else NotebookPerceiver)(cfg)
        self.gpt2 = hf_gpt2(cfg)
        g = cfg.gpt2
        self.cross = (
            SharedCrossAttention(g.n_embd, g.xattn_heads)
            if src
            else nn.ModuleList(CrossAttentionBlock(g.n_embd, g.xattn_heads)
                               for _ in range(g.n_layer))
        )

    def encode(self, images_nchw: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images_nchw))

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mode: str = "inject"):
        latents = self.perceiver(features)
        transformer = self.gpt2.transformer
        x = transformer.wte(ids)
        if mode == "prepend":
            x = torch.cat([latents, x], dim=1)
        length = x.shape[1]
        x = transformer.drop(x + transformer.wpe(torch.arange(length, device=x.device)))
        causal = torch.full((length, length), torch.finfo(x.dtype).min,
                            device=x.device).triu(1)[None, None]
        shared = isinstance(self.cross, SharedCrossAttention)
        for layer, block in enumerate(transformer.h):
            x = x + block.attn(block.ln_1(x), attention_mask=causal)[0]
            if mode == "inject" and not shared:
                x = self.cross[layer](x, latents)
            x = x + block.mlp(block.ln_2(x))
            if mode == "inject" and shared:
                x = self.cross(x, latents)
        if mode == "prepend":
            x = x[:, latents.shape[1]:]
        return self.gpt2.lm_head(transformer.ln_f(x))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> None:
    """Give every parameter non-trivial random values (norm scales near 1, layer scales O(1))."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("gamma"):
            param.copy_(0.5 * noise)
        elif param.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif param.ndim == 1:
            param.copy_(0.05 * noise)
        elif name.endswith("latents"):
            param.copy_(noise)
        else:
            fan_in = param.shape[1] if param.ndim == 2 else param[0].numel()
            if "c_attn" in name or "c_fc" in name or "c_proj" in name:  # Conv1D: (in, out)
                fan_in = param.shape[0]
            if name.endswith(("wte.weight", "wpe.weight")):
                fan_in = 1 / 0.02**2
            param.copy_(noise / fan_in**0.5)


def reference_model(cfg: CaptionerConfig, seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    model = Captioner(cfg).eval()
    randomize_(model, seed)
    return model


def write_released_files(model: Captioner, directory: Path) -> dict[str, Path]:
    """Save the components as LensToWords did (state_dict per component, no prefix)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "perceiver": directory / "best_perciever.pth",
        "gpt2_blocks": directory / "best_gpt2.pth",
        "cross_attention": directory / "best_cross_attention.pth",
        "encoder": directory / "convnext_tiny.pth",
        "encoder_head": directory / "encoder_head.pth",
        "gpt2": directory / "gpt2",
    }
    torch.save(model.perceiver.state_dict(), files["perceiver"])
    torch.save(model.gpt2.transformer.h.state_dict(), files["gpt2_blocks"])
    torch.save(model.cross.state_dict(), files["cross_attention"])
    torch.save(model.encoder.state_dict(), files["encoder"])
    torch.save(model.head.state_dict(), files["encoder_head"])
    model.gpt2.save_pretrained(files["gpt2"])
    return files
