"""CLIP's parts for the family registry (`lensjax.models.families`): a scorer, not a
captioner, so it has no decoding defaults and no phase trains it."""

from __future__ import annotations

# Every CLIP parameter is one component; no training phase uses it.
LABEL_RULES: tuple[tuple[str, str], ...] = (
    ("clip", r"^(visual|token_embedding|positional_embedding|transformer|ln_final|"
             r"text_projection|logit_scale)(\.|\Z)"),
)
INIT_GROUPS: dict[str, tuple[str, ...]] = {}
DECODING: dict[str, object] = {}
