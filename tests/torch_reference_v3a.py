"""LensToWords' v3a modules in PyTorch, as the notebook `v3a_convnext_transformer` builds them
(ProjectionHead, the sinusoidal table, the 6-layer `Transformer`), at any size, and its two
released files written as the notebook saves them."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from lensjax.models.v3a import V3AConfig


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, dim)
        self.gelu = nn.GELU()
        self.linear2 = nn.Linear(dim, dim)
        self.layernorm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.layernorm(self.linear2(self.gelu(self.linear1(x))))


def positionalencoding(max_len: int, d_model: int) -> torch.Tensor:
    position = torch.arange(max_len).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


class Transformer(nn.Module):
    def __init__(self, cfg: V3AConfig):
        super().__init__()
        d = cfg.decoder
        self.register_buffer("positional_encoding", positionalencoding(d.max_positions,
                                                                         d.d_model))
        self.embedding = nn.Embedding(d.vocab_size, d.d_model)
        self.decoder = nn.ModuleList([
            nn.TransformerDecoderLayer(d_model=d.d_model, nhead=d.n_head,
                                       dim_feedforward=d.ff_dim, dropout=d.dropout,
                                       activation="gelu", batch_first=True)
            for _ in range(d.n_layer)
        ])
        self.output_proj = nn.Linear(d.d_model, d.vocab_size)

    def forward(self, memory, caption_ids):
        length = caption_ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length)
        x = self.embedding(caption_ids) + self.positional_encoding[:length].unsqueeze(0)
        for layer in self.decoder:
            x = layer(x, memory=memory, tgt_mask=mask, tgt_is_causal=True)
        return self.output_proj(x).transpose(1, 2)


def reference_v3a(cfg: V3AConfig, seed: int = 0) -> tuple[ProjectionHead, Transformer]:
    """Random-weight modules (biases and norms perturbed too), in eval mode."""
    torch.manual_seed(seed)
    head = ProjectionHead(cfg.feature_dim, cfg.decoder.d_model)
    decoder = Transformer(cfg)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in (head, decoder):
            for name, parameter in module.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return head.eval(), decoder.eval()


def write_v3a_files(head: ProjectionHead, decoder: Transformer, directory: Path
                    ) -> dict[str, Path]:
    """best_projection_head.pth and best_decoder.pth, saved as the notebook saves them."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"projection_head": directory / "best_projection_head.pth",
             "decoder": directory / "best_decoder.pth"}
    torch.save(head.state_dict(), files["projection_head"])
    torch.save(decoder.state_dict(), files["decoder"])
    return files
