"""v3a's parts for the family registry (`lensjax.models.families`)."""

from __future__ import annotations

from lensjax.models.encoding import IMAGE_INIT_GROUPS, IMAGE_LABEL_RULES

# (optimizer label, parameter path pattern); the first match wins. The sinusoidal table is
# the notebook's buffer: labelled `fixed`, it never trains.
LABEL_RULES: tuple[tuple[str, str], ...] = (
    *IMAGE_LABEL_RULES,
    ("projection_head", r"^projection_head\."),
    ("fixed", r"^decoder\.positional_encoding\Z"),
    ("decoder", r"^decoder\."),
)
# Initial-weight groups (`--init GROUP=SOURCE`) and the labels each covers.
INIT_GROUPS: dict[str, tuple[str, ...]] = {
    **IMAGE_INIT_GROUPS,
    "projection_head": ("projection_head",),
    "decoder": ("decoder", "fixed"),
}
# The original's v3a sampler: top-k 50 at temperature 1, its stop rules (EOS or 0, '.', three
# equal tokens).
DECODING = {"top_k": 50, "temperature": 1.0, "retry": False, "stop_at_period": True,
            "stop_on_repeat": None, "beam_rule": "v3b"}
# The dense layers `--lora` adapts unless told others (path components, `lensjax.lora`).
LORA_TARGETS = ("self_attn", "multihead_attn")
