"""Declarative mapping tables between PyTorch state-dict keys and lensjax parameter paths,
one module per family (`v3b`, `v3a`) plus the image side they share (`image`); `core` holds
the machinery. Both directions (import: torch -> Flax, export: Flax -> torch) read the same
rules, so they cannot drift.
"""

from bridge.tables.clip import CLIP_HF, CLIP_OPENAI
from bridge.tables.core import (
    CONV,
    IDENTITY,
    LINEAR,
    QKV_BIAS,
    QKV_WEIGHT,
    Rule,
    Table,
    Transform,
)
from bridge.tables.image import CONVNEXT_TIMM, HEAD_LENSJAX, HEAD_SRC
from bridge.tables.v3a import DECODER_V3A, PROJECTION_HEAD_V3A
from bridge.tables.v3b import (
    GPT2_BLOCKS,
    GPT2_HF,
    PERCEIVER_NOTEBOOK,
    PERCEIVER_SRC,
    XATTN_NOTEBOOK,
    XATTN_SRC,
)

# Candidate tables per component, in preference order.
TABLES: dict[str, tuple[Table, ...]] = {
    "perceiver": (PERCEIVER_NOTEBOOK, PERCEIVER_SRC),
    "gpt2_blocks": (GPT2_BLOCKS,),
    "cross_attention": (XATTN_NOTEBOOK, XATTN_SRC),
    "gpt2": (GPT2_HF,),
    "encoder": (CONVNEXT_TIMM,),
    "encoder_head": (HEAD_LENSJAX, HEAD_SRC),
    "projection_head": (PROJECTION_HEAD_V3A,),
    "decoder": (DECODER_V3A,),
    "clip": (CLIP_OPENAI, CLIP_HF),
}

# What each component is called by its users (file names of the original).
DESCRIPTIONS = {
    "perceiver": "Perceiver (best_perciever.pth)",
    "gpt2_blocks": "GPT-2 blocks (best_gpt2.pth)",
    "cross_attention": "cross-attention blocks (best_cross_attention.pth)",
    "gpt2": "public HF gpt2 checkpoint",
    "encoder": "timm ConvNeXt-Tiny",
    "encoder_head": "encoder head",
    "projection_head": "v3a projection head (best_projection_head.pth)",
    "decoder": "v3a Transformer decoder (best_decoder.pth)",
    "clip": "CLIP model (OpenAI, open_clip or HF CLIPModel)",
}

# The table each component uses when exporting a model of a given layout (v3b) or family.
EXPORT_TABLES: dict[str, dict[str, Table]] = {
    "notebook": {
        "perceiver": PERCEIVER_NOTEBOOK,
        "gpt2_blocks": GPT2_BLOCKS,
        "cross_attention": XATTN_NOTEBOOK,
        "encoder": CONVNEXT_TIMM,
        "encoder_head": HEAD_LENSJAX,
        "gpt2": GPT2_HF,
    },
    "src": {
        "perceiver": PERCEIVER_SRC,
        "gpt2_blocks": GPT2_BLOCKS,
        "cross_attention": XATTN_SRC,
        "encoder": CONVNEXT_TIMM,
        "encoder_head": HEAD_SRC,
        "gpt2": GPT2_HF,
    },
    "clip": {"clip": CLIP_HF},
    "v3a": {
        "projection_head": PROJECTION_HEAD_V3A,
        "decoder": DECODER_V3A,
        "encoder": CONVNEXT_TIMM,
        "encoder_head": HEAD_LENSJAX,
    },
}

__all__ = [
    "CLIP_HF", "CLIP_OPENAI", "CONV", "CONVNEXT_TIMM", "DECODER_V3A", "DESCRIPTIONS",
    "EXPORT_TABLES", "GPT2_BLOCKS", "GPT2_HF", "HEAD_LENSJAX", "HEAD_SRC", "IDENTITY", "LINEAR",
    "PERCEIVER_NOTEBOOK", "PERCEIVER_SRC", "PROJECTION_HEAD_V3A", "QKV_BIAS", "QKV_WEIGHT",
    "Rule", "TABLES", "Table", "Transform", "XATTN_NOTEBOOK", "XATTN_SRC",
]
