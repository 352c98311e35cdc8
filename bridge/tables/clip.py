"""CLIP ViT-B/32 in its three public spellings: OpenAI's (`ViT-B-32.pt`) and open_clip's state
dicts (the same names), and HF `CLIPModel` (`model.safetensors`; note `pre_layrnorm`)."""

from __future__ import annotations

from bridge.tables.core import CONV, LINEAR, Rule, Table, linear_rules, mha_rules, norm_rules


def _openai_blocks(torch_prefix: str, flax_prefix: str) -> tuple[Rule, ...]:
    t, f = f"{torch_prefix}.resblocks.{{i}}", f"{flax_prefix}.resblocks.{{i}}"
    return (
        *norm_rules(f"{t}.ln_1", f"{f}.ln_1"),
        *mha_rules(f"{t}.attn", f"{f}.attn"),
        *norm_rules(f"{t}.ln_2", f"{f}.ln_2"),
        *linear_rules(f"{t}.mlp.c_fc", f"{f}.mlp.c_fc"),
        *linear_rules(f"{t}.mlp.c_proj", f"{f}.mlp.c_proj"),
    )


# OpenAI's and open_clip's ViT CLIP: `proj` and `text_projection` are already (in, out).
CLIP_OPENAI = Table(
    "clip/openai",
    "clip",
    "open_clip_model.pth",
    (
        Rule("visual.conv1.weight", ("visual.conv1",), CONV),
        Rule("visual.class_embedding", ("visual.class_embedding",)),
        Rule("visual.positional_embedding", ("visual.positional_embedding",)),
        *norm_rules("visual.ln_pre", "visual.ln_pre"),
        *_openai_blocks("visual.transformer", "visual.transformer"),
        *norm_rules("visual.ln_post", "visual.ln_post"),
        Rule("visual.proj", ("visual.proj",)),
        Rule("token_embedding.weight", ("token_embedding.embedding",)),
        Rule("positional_embedding", ("positional_embedding",)),
        *_openai_blocks("transformer", "transformer"),
        *norm_rules("ln_final", "ln_final"),
        Rule("text_projection", ("text_projection",)),
        Rule("logit_scale", ("logit_scale",)),
    ),
    # Integers OpenAI's archive keeps beside the weights, and open_clip's causal-mask buffer.
    ignore=(r"^(input_resolution|context_length|vocab_size)\Z", r"(^|\.)attn_mask\Z"),
)


def _hf_blocks(torch_prefix: str, flax_prefix: str) -> tuple[Rule, ...]:
    t, f = f"{torch_prefix}.encoder.layers.{{i}}", f"{flax_prefix}.resblocks.{{i}}"
    return (
        *norm_rules(f"{t}.layer_norm1", f"{f}.ln_1"),
        *linear_rules(f"{t}.self_attn.q_proj", f"{f}.attn.q"),
        *linear_rules(f"{t}.self_attn.k_proj", f"{f}.attn.k"),
        *linear_rules(f"{t}.self_attn.v_proj", f"{f}.attn.v"),
        *linear_rules(f"{t}.self_attn.out_proj", f"{f}.attn.out"),
        *norm_rules(f"{t}.layer_norm2", f"{f}.ln_2"),
        *linear_rules(f"{t}.mlp.fc1", f"{f}.mlp.c_fc"),
        *linear_rules(f"{t}.mlp.fc2", f"{f}.mlp.c_proj"),
    )


# HF transformers' CLIPModel: projections are nn.Linear (out, in) without bias.
CLIP_HF = Table(
    "clip/hf",
    "clip",
    "model.safetensors",
    (
        Rule("vision_model.embeddings.patch_embedding.weight", ("visual.conv1",), CONV),
        Rule("vision_model.embeddings.class_embedding", ("visual.class_embedding",)),
        Rule("vision_model.embeddings.position_embedding.weight",
             ("visual.positional_embedding",)),
        *norm_rules("vision_model.pre_layrnorm", "visual.ln_pre"),
        *_hf_blocks("vision_model", "visual.transformer"),
        *norm_rules("vision_model.post_layernorm", "visual.ln_post"),
        Rule("visual_projection.weight", ("visual.proj",), LINEAR),
        Rule("text_model.embeddings.token_embedding.weight", ("token_embedding.embedding",)),
        Rule("text_model.embeddings.position_embedding.weight", ("positional_embedding",)),
        *_hf_blocks("text_model", "transformer"),
        *norm_rules("text_model.final_layer_norm", "ln_final"),
        Rule("text_projection.weight", ("text_projection",), LINEAR),
        Rule("logit_scale", ("logit_scale",)),
    ),
    ignore=(r"\.position_ids\Z",),
)
