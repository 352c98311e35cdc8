"""v3a's files: best_projection_head.pth and best_decoder.pth."""

from __future__ import annotations

from bridge.tables.core import Rule, Table, linear_rules, mha_rules, norm_rules

# v3a (the notebook `v3a_convnext_transformer`): ProjectionHead and the Transformer decoder,
# whose sinusoidal `positional_encoding` buffer is in its state dict (strict loading needs it).
PROJECTION_HEAD_V3A = Table(
    "projection_head/v3a",
    "projection_head",
    "best_projection_head.pth",
    (
        *linear_rules("linear1", "projection_head.linear1"),
        *linear_rules("linear2", "projection_head.linear2"),
        *norm_rules("layernorm", "projection_head.layernorm"),
    ),
)

DECODER_V3A = Table(
    "decoder/v3a",
    "decoder",
    "best_decoder.pth",
    (
        Rule("positional_encoding", ("decoder.positional_encoding",)),
        Rule("embedding.weight", ("decoder.embedding.embedding",)),
        *mha_rules("decoder.{i}.self_attn", "decoder.layers.{i}.self_attn"),
        *mha_rules("decoder.{i}.multihead_attn", "decoder.layers.{i}.multihead_attn"),
        *linear_rules("decoder.{i}.linear1", "decoder.layers.{i}.linear1"),
        *linear_rules("decoder.{i}.linear2", "decoder.layers.{i}.linear2"),
        *norm_rules("decoder.{i}.norm1", "decoder.layers.{i}.norm1"),
        *norm_rules("decoder.{i}.norm2", "decoder.layers.{i}.norm2"),
        *norm_rules("decoder.{i}.norm3", "decoder.layers.{i}.norm3"),
        *linear_rules("output_proj", "decoder.output_proj"),
    ),
)
