"""v3b's files: the Perceiver, the fine-tuned GPT-2 blocks, the cross-attention blocks (notebook and
src layouts) and the public HF gpt2 checkpoint."""

from __future__ import annotations

from bridge.tables.core import Rule, Table, conv1d_rules, linear_rules, mha_rules, norm_rules


def _gpt2_block_rules(torch_prefix: str) -> tuple[Rule, ...]:
    t, f = torch_prefix, "gpt2.h.{i}"
    return (
        *norm_rules(f"{t}.ln_1", f"{f}.ln_1"),
        *conv1d_rules(f"{t}.attn.c_attn", f"{f}.attn.c_attn"),
        *conv1d_rules(f"{t}.attn.c_proj", f"{f}.attn.c_proj"),
        *norm_rules(f"{t}.ln_2", f"{f}.ln_2"),
        *conv1d_rules(f"{t}.mlp.c_fc", f"{f}.mlp.c_fc"),
        *conv1d_rules(f"{t}.mlp.c_proj", f"{f}.mlp.c_proj"),
    )


# Old transformers versions saved the causal-mask buffers with the blocks.
_GPT2_BUFFERS = (r"attn\.bias\Z", r"attn\.masked_bias\Z")

PERCEIVER_NOTEBOOK = Table(
    "perceiver/notebook",
    "perceiver",
    "best_perciever.pth",
    (
        Rule("latents", ("perceiver.latents",)),
        *linear_rules("linear", "perceiver.linear"),
        *mha_rules("cross_attn", "perceiver.cross_attn"),
        *mha_rules("self_attn.{i}.self_attn", "perceiver.self_attn.{i}.self_attn"),
        *linear_rules("self_attn.{i}.linear1", "perceiver.self_attn.{i}.linear1"),
        *linear_rules("self_attn.{i}.linear2", "perceiver.self_attn.{i}.linear2"),
        *norm_rules("self_attn.{i}.norm1", "perceiver.self_attn.{i}.norm1"),
        *norm_rules("self_attn.{i}.norm2", "perceiver.self_attn.{i}.norm2"),
    ),
)

PERCEIVER_SRC = Table(
    "perceiver/src",
    "perceiver",
    "best_perciever.pth",
    (
        Rule("latents", ("perceiver.latents",)),
        *linear_rules("img_proj", "perceiver.img_proj"),
        *mha_rules("cross_attn", "perceiver.cross_attn"),
        *norm_rules("norm1", "perceiver.norm1"),
        *linear_rules("ff.0", "perceiver.ff_in"),
        *linear_rules("ff.2", "perceiver.ff_out"),
        *norm_rules("norm2", "perceiver.norm2"),
    ),
)

GPT2_BLOCKS = Table(
    "gpt2_blocks/hf",
    "gpt2_blocks",
    "best_gpt2.pth",
    _gpt2_block_rules("{i}"),
    ignore=_GPT2_BUFFERS,
)

XATTN_NOTEBOOK = Table(
    "cross_attention/notebook",
    "cross_attention",
    "best_cross_attention.pth",
    (
        *norm_rules("{i}.layernorm", "gpt2.xattn.{i}.layernorm"),
        *mha_rules("{i}.cross_attn", "gpt2.xattn.{i}.cross_attn"),
    ),
)

XATTN_SRC = Table(
    "cross_attention/src",
    "cross_attention",
    "best_cross_attention.pth",
    (*mha_rules("attn", "gpt2.xattn.attn"), *norm_rules("norm", "gpt2.xattn.norm")),
)

# The public HF `gpt2` checkpoint, as GPT2LMHeadModel's state dict. Older files spell the
# keys without the `transformer.` prefix; the LM head is tied to wte.
GPT2_HF = Table(
    "gpt2/hf",
    "gpt2",
    "gpt2/model.safetensors",
    (
        Rule("transformer.wte.weight", ("gpt2.wte.embedding",)),
        Rule("transformer.wpe.weight", ("gpt2.wpe.embedding",)),
        *norm_rules("transformer.ln_f", "gpt2.ln_f"),
        *_gpt2_block_rules("transformer.h.{i}"),
    ),
    aliases=((r"^(?!transformer\.|lm_head\.)", "transformer."),),
    ignore=(*_GPT2_BUFFERS, r"^lm_head\.weight\Z"),
    tied=(("lm_head.weight", "transformer.wte.weight"),),
)
