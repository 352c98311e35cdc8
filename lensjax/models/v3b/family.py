"""v3b's parts for the family registry (`lensjax.models.families`)."""

from __future__ import annotations

from lensjax.models.encoding import IMAGE_INIT_GROUPS, IMAGE_LABEL_RULES

# (optimizer label, parameter path pattern); the first match wins.
LABEL_RULES: tuple[tuple[str, str], ...] = (
    *IMAGE_LABEL_RULES,
    ("perceiver", r"^perceiver\."),
    ("xattn", r"^gpt2\.xattn\."),
    ("lm", r"^gpt2\.(wte|wpe|ln_f)\."),
    ("gpt2", r"^gpt2\.h\."),
)
# Initial-weight groups (`--init GROUP=SOURCE`) and the labels each covers.
INIT_GROUPS: dict[str, tuple[str, ...]] = {
    **IMAGE_INIT_GROUPS,
    "perceiver": ("perceiver",),
    "gpt2": ("gpt2", "lm"),
    "xattn": ("xattn",),
}
# LensToWords' v3b sampler: top-k 20 at temperature 0.7, re-sampled while the caption is
# degenerate (its retry rule).
DECODING = {"top_k": 20, "temperature": 0.7, "retry": True, "stop_at_period": True,
            "stop_on_repeat": None, "beam_rule": "v3b"}
# The dense layers `--lora` adapts unless told others (path components, `lensjax.lora`).
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "xattn")
