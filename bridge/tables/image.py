"""The image side the ConvNeXt families share: timm's ConvNeXt and the multi-scale head."""

from __future__ import annotations

from bridge.tables.core import CONV, Rule, Table, linear_rules, norm_rules


def _convnext_rules() -> tuple[Rule, ...]:
    block = "stages.{s}.blocks.{b}"
    fblock = "encoder.stages.{s}.blocks.{b}"
    return (
        Rule("stem.0.weight", ("encoder.stem.0.kernel",), CONV),
        Rule("stem.0.bias", ("encoder.stem.0.bias",)),
        *norm_rules("stem.1", "encoder.stem.1"),
        *norm_rules("stages.{s}.downsample.0", "encoder.stages.{s}.downsample.0"),
        Rule("stages.{s}.downsample.1.weight", ("encoder.stages.{s}.downsample.1.kernel",), CONV),
        Rule("stages.{s}.downsample.1.bias", ("encoder.stages.{s}.downsample.1.bias",)),
        Rule(f"{block}.gamma", (f"{fblock}.gamma",)),
        Rule(f"{block}.conv_dw.weight", (f"{fblock}.conv_dw.kernel",), CONV),
        Rule(f"{block}.conv_dw.bias", (f"{fblock}.conv_dw.bias",)),
        *norm_rules(f"{block}.norm", f"{fblock}.norm"),
        *linear_rules(f"{block}.mlp.fc1", f"{fblock}.mlp.fc1"),
        *linear_rules(f"{block}.mlp.fc2", f"{fblock}.mlp.fc2"),
    )


# timm ConvNeXt. Export writes the `features_only` spelling (`stem_0`, `stages_1`), the one
# `timm.create_model('convnext_tiny', features_only=True, out_indices=(1, 2, 3))` loads, which
# is the backbone LensToWords uses; import also takes the plain model's names.
CONVNEXT_TIMM = Table(
    "encoder/timm",
    "encoder",
    "encoder_convnext_tiny.pth",
    _convnext_rules(),
    aliases=((r"^(stem|stages)_(\d+)\.", r"\1.\2."),),
    ignore=(r"^head\.", r"^norm_pre\."),
    export_aliases=((r"^(stem|stages)\.(\d+)\.", r"\1_\2."),),
)

HEAD_LENSJAX = Table(
    "encoder_head/lensjax",
    "encoder_head",
    "encoder_head.pth",
    (
        *linear_rules("projections.{k}", "encoder_head.projections.{k}"),
        *norm_rules("norm", "encoder_head.norm"),
    ),
)

HEAD_SRC = Table(
    "encoder_head/src",
    "encoder_head",
    "encoder_head.pth",
    (
        *linear_rules("proj1", "encoder_head.projections.0"),
        *linear_rules("proj2", "encoder_head.projections.1"),
        *linear_rules("proj3", "encoder_head.projections.2"),
        *norm_rules("norm", "encoder_head.norm"),
    ),
)
