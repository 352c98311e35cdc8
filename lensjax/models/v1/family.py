"""v1's parts for the family registry (`lensjax.models.families`), shared by v2."""

from __future__ import annotations

from lensjax.models.encoding import IMAGE_INIT_GROUPS
from lensjax.models.v3a.family import INIT_GROUPS as V3A_INIT_GROUPS

# (optimizer label, parameter path pattern); the first match wins. The original never
# trained its InceptionV3.
LABEL_RULES: tuple[tuple[str, str], ...] = (
    ("encoder", r"^encoder\."),
    ("decoder", r"^decoder\."),
)
# Initial-weight groups (`--init GROUP=SOURCE`) and the labels each covers. Group names are
# one table across the families (`lensjax.phases.INIT_GROUPS`), so `encoder` and `decoder`
# cover what they cover for v3b and v3a (labels this model lacks cover nothing here).
INIT_GROUPS: dict[str, tuple[str, ...]] = {"encoder": IMAGE_INIT_GROUPS["encoder"],
                                           "decoder": V3A_INIT_GROUPS["decoder"]}
# The notebooks' decoding: greedy (v1) and v2's beam search (`lensjax.generate.
# ranked_beam_search`) to `<end>`, no stop at a period or a repeated word (`temperature` 0
# makes top-k greedy).
DECODING = {"top_k": 5, "temperature": 0.0, "retry": False, "stop_at_period": False,
            "stop_on_repeat": False, "beam_rule": "v2"}
