"""The model families lensjax knows, by name (the captioners v3b, v3a, v2 and v1, and CLIP,
the scorer v3d's filter uses): each family's configuration class (with its presets), module,
optimizer label rules, initial-weight groups and decoding defaults.

A checkpoint records its family in `lensjax.json` (`"family"`); one without it is v3b. To add
a family, add its folder under `lensjax/models/` (config with presets, modules with the decode
hooks of `lensjax.models.decoding`, `family.py`) and one `Family` line below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from lensjax.models.clip import family as clip_family
from lensjax.models.clip.config import PRESETS as CLIP_PRESETS
from lensjax.models.clip.config import CLIPConfig
from lensjax.models.clip.modeling import CLIP
from lensjax.models.v1 import family as lstm_family
from lensjax.models.v1.config import PRESETS as V1_PRESETS
from lensjax.models.v1.config import V1Config
from lensjax.models.v1.modeling import V1Captioner
from lensjax.models.v2.config import PRESETS as V2_PRESETS
from lensjax.models.v2.config import V2Config
from lensjax.models.v2.modeling import V2Captioner
from lensjax.models.v3a import family as v3a_family
from lensjax.models.v3a.config import PRESETS as V3A_PRESETS
from lensjax.models.v3a.config import V3AConfig
from lensjax.models.v3a.modeling import V3ACaptioner
from lensjax.models.v3b import family as v3b_family
from lensjax.models.v3b.captioner import PRESETS as V3B_PRESETS
from lensjax.models.v3b.captioner import Captioner, CaptionerConfig

DEFAULT_FAMILY = "v3b"


@dataclasses.dataclass(frozen=True)
class Family:
    """One generation of LensToWords (or CLIP, the scorer v3d filtered its data with).
    `module(cfg, rngs=...)` builds the model; `decoding` holds a captioner's sampler defaults
    (`top_k`, `temperature`, `retry`: the v3b retry rule, `stop_at_period`, `stop_on_repeat`,
    `beam_rule`: `lensjax.generate.DecodeOptions`);
    `captioner` is False for CLIP;
    `lora_targets` names the dense layers `--lora` adapts by default (`lensjax.lora`)."""

    name: str
    summary: str
    config: type
    module: type
    presets: Mapping[str, Any]
    label_rules: tuple[tuple[str, str], ...]
    init_groups: Mapping[str, tuple[str, ...]]
    decoding: Mapping[str, Any]
    captioner: bool = True
    lora_targets: tuple[str, ...] = ()  # the layers `--lora` adapts unless told others


FAMILIES: Mapping[str, Family] = MappingProxyType({f.name: f for f in (
    Family("v3b", "ConvNeXt features -> Perceiver -> GPT-2 with cross-attention (v3b, v3c)",
           CaptionerConfig, Captioner, V3B_PRESETS, v3b_family.LABEL_RULES,
           v3b_family.INIT_GROUPS, v3b_family.DECODING,
           lora_targets=v3b_family.LORA_TARGETS),
    Family("v3a", "ConvNeXt features -> ProjectionHead -> 6-layer Transformer decoder",
           V3AConfig, V3ACaptioner, V3A_PRESETS, v3a_family.LABEL_RULES,
           v3a_family.INIT_GROUPS, v3a_family.DECODING,
           lora_targets=v3a_family.LORA_TARGETS),
    Family("v2", "InceptionV3 mixed10 -> LSTM with additive attention, word vocabulary",
           V2Config, V2Captioner, V2_PRESETS, lstm_family.LABEL_RULES,
           lstm_family.INIT_GROUPS, lstm_family.DECODING),
    Family("v1", "InceptionV3 pooled vector -> LSTM, word vocabulary",
           V1Config, V1Captioner, V1_PRESETS, lstm_family.LABEL_RULES,
           lstm_family.INIT_GROUPS, lstm_family.DECODING),
    Family("clip", "CLIP ViT image and text towers: the image-caption scorer of v3d's filter",
           CLIPConfig, CLIP, CLIP_PRESETS, clip_family.LABEL_RULES, clip_family.INIT_GROUPS,
           clip_family.DECODING, captioner=False),
)})


def family_named(name: str) -> Family:
    """The family called `name`; ValueError listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(cfg: Any) -> Family:
    """The family of a model configuration."""
    return FAMILIES[type(cfg).family]


def config_from_metadata(metadata: Mapping[str, Any]) -> Any:
    """A checkpoint's model configuration from its `lensjax.json` (`family` absent: v3b);
    ValueError naming what does not fit."""
    family = metadata.get("family", DEFAULT_FAMILY)
    if not isinstance(family, str):
        raise ValueError(f"family must be a string, found {family!r}")
    return family_named(family).config.from_dict(metadata["config"])


def preset_config(name: str) -> Any:
    """The configuration of the preset `name`, whichever family has it."""
    for family in FAMILIES.values():
        if name in family.presets:
            return family.presets[name]
    raise ValueError(f"unknown preset {name!r}; presets: {', '.join(all_presets())}")


def all_presets() -> list[str]:
    """The presets of every captioner family."""
    return [name for family in FAMILIES.values() if family.captioner
            for name in family.presets]
