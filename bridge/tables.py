"""Declarative mapping tables between PyTorch state-dict keys and lensjax parameter paths.

Each `Table` is one source layout (a released file or a public checkpoint). A `Rule` ties one
torch key template to one or more Flax path templates and a `Transform`; both directions
(import: torch -> Flax, export: Flax -> torch) read the same rules, so they cannot drift.
Templates use named placeholders (`{i}`, `{s}`, `{b}`) that stand for decimal indices.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence

import numpy as np

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """How one torch tensor becomes Flax arrays (and back), and the matching shape rule."""

    name: str
    to_flax: Callable[[np.ndarray], list[np.ndarray]]
    to_torch: Callable[[Sequence[np.ndarray]], np.ndarray]
    torch_shape: Callable[[Sequence[Shape]], Shape]


IDENTITY = Transform("identity", lambda t: [t], lambda xs: xs[0], lambda ss: ss[0])
# nn.Linear stores (out, in); a Flax kernel is (in, out).
LINEAR = Transform(
    "linear", lambda t: [t.T], lambda xs: xs[0].T, lambda ss: tuple(reversed(ss[0]))
)
# Conv weights: torch OIHW <-> Flax HWIO.
CONV = Transform(
    "conv",
    lambda t: [t.transpose(2, 3, 1, 0)],
    lambda xs: xs[0].transpose(3, 2, 0, 1),
    lambda ss: (ss[0][3], ss[0][2], ss[0][0], ss[0][1]),
)
# nn.MultiheadAttention.in_proj_weight stacks q, k, v as rows: (3n, n) <-> three (n, n) kernels.
QKV_WEIGHT = Transform(
    "qkv_weight",
    lambda t: [w.T for w in np.split(t, 3, axis=0)],
    lambda xs: np.concatenate([x.T for x in xs], axis=0),
    lambda ss: (sum(s[1] for s in ss), ss[0][0]),
)
QKV_BIAS = Transform(
    "qkv_bias",
    lambda t: list(np.split(t, 3)),
    lambda xs: np.concatenate(list(xs)),
    lambda ss: (sum(s[0] for s in ss),),
)


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str
    flax: tuple[str, ...]
    transform: Transform = IDENTITY


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(
        re.escape(part) if n % 2 == 0 else f"(?P<{part}>\\d+)" for n, part in enumerate(parts)
    )
    return re.compile(pattern + r"\Z")


@dataclasses.dataclass(frozen=True)
class Table:
    """One source layout.

    name: e.g. "perceiver/notebook"; component: the checkpoint component it fills;
    filename: what `bridge export` writes; aliases: (regex, replacement) pairs that normalise
    alternative key spellings on import; ignore: regexes of keys that carry no weights
    (buffers, classifier heads) and are skipped on import; tied: torch keys written on export
    as copies of another key (GPT-2's lm_head); export_aliases: (regex, replacement) pairs
    applied to keys on export.
    """

    name: str
    component: str
    filename: str
    rules: tuple[Rule, ...]
    aliases: tuple[tuple[str, str], ...] = ()
    ignore: tuple[str, ...] = ()
    tied: tuple[tuple[str, str], ...] = ()
    export_aliases: tuple[tuple[str, str], ...] = ()

    def normalise(self, key: str) -> str:
        for pattern, replacement in self.aliases:
            key = re.sub(pattern, replacement, key)
        return key

    def export_key(self, key: str) -> str:
        for pattern, replacement in self.export_aliases:
            key = re.sub(pattern, replacement, key)
        return key

    def ignored(self, key: str) -> bool:
        return any(re.search(pattern, key) for pattern in self.ignore)

    def match_torch(self, key: str) -> tuple[Rule, dict[str, str]] | None:
        """The rule whose torch template matches `key`, with its placeholder values."""
        for rule in self.rules:
            found = _template_regex(rule.torch).match(key)
            if found:
                return rule, found.groupdict()
        return None

    def match_flax(self, path: str) -> tuple[Rule, dict[str, str]] | None:
        """The rule that has `path` among its Flax templates, with its placeholder values."""
        for rule in self.rules:
            for template in rule.flax:
                found = _template_regex(template).match(path)
                if found:
                    return rule, found.groupdict()
        return None


def _linear(torch_prefix: str, flax_prefix: str) -> tuple[Rule, Rule]:
    return (
        Rule(f"{torch_prefix}.weight", (f"{flax_prefix}.kernel",), LINEAR),
        Rule(f"{torch_prefix}.bias", (f"{flax_prefix}.bias",)),
    )


def _norm(torch_prefix: str, flax_prefix: str) -> tuple[Rule, Rule]:
    return (
        Rule(f"{torch_prefix}.weight", (f"{flax_prefix}.scale",)),
        Rule(f"{torch_prefix}.bias", (f"{flax_prefix}.bias",)),
    )


def _mha(torch_prefix: str, flax_prefix: str) -> tuple[Rule, ...]:
    """nn.MultiheadAttention <-> layers.MultiheadAttention (q, k, v, out)."""
    qkv = tuple(f"{flax_prefix}.{p}" for p in ("q", "k", "v"))
    return (
        Rule(f"{torch_prefix}.in_proj_weight", tuple(f"{p}.kernel" for p in qkv), QKV_WEIGHT),
        Rule(f"{torch_prefix}.in_proj_bias", tuple(f"{p}.bias" for p in qkv), QKV_BIAS),
        *_linear(f"{torch_prefix}.out_proj", f"{flax_prefix}.out"),
    )


def _conv1d(torch_prefix: str, flax_prefix: str) -> tuple[Rule, Rule]:
    """GPT-2's Conv1D already stores (in, out): no transpose."""
    return (
        Rule(f"{torch_prefix}.weight", (f"{flax_prefix}.kernel",)),
        Rule(f"{torch_prefix}.bias", (f"{flax_prefix}.bias",)),
    )


def _gpt2_block_rules(torch_prefix: str) -> tuple[Rule, ...]:
    t, f = torch_prefix, "gpt2.h.{i}"
    return (
        *_norm(f"{t}.ln_1", f"{f}.ln_1"),
        *_conv1d(f"{t}.attn.c_attn", f"{f}.attn.c_attn"),
        *_conv1d(f"{t}.attn.c_proj", f"{f}.attn.c_proj"),
        *_norm(f"{t}.ln_2", f"{f}.ln_2"),
        *_conv1d(f"{t}.mlp.c_fc", f"{f}.mlp.c_fc"),
        *_conv1d(f"{t}.mlp.c_proj", f"{f}.mlp.c_proj"),
    )


# Old transformers versions saved the causal-mask buffers with the blocks.
_GPT2_BUFFERS = (r"attn\.bias\Z", r"attn\.masked_bias\Z")

PERCEIVER_NOTEBOOK = Table(
    "perceiver/notebook",
    "perceiver",
    "best_perciever.pth",
    (
        Rule("latents", ("perceiver.latents",)),
        *_linear("linear", "perceiver.linear"),
        *_mha("cross_attn", "perceiver.cross_attn"),
        *_mha("self_attn.{i}.self_attn", "perceiver.self_attn.{i}.self_attn"),
        *_linear("self_attn.{i}.linear1", "perceiver.self_attn.{i}.linear1"),
        *_linear("self_attn.{i}.linear2", "perceiver.self_attn.{i}.linear2"),
        *_norm("self_attn.{i}.norm1", "perceiver.self_attn.{i}.norm1"),
        *_norm("self_attn.{i}.norm2", "perceiver.self_attn.{i}.norm2"),
    ),
)

PERCEIVER_SRC = Table(
    "perceiver/src",
    "perceiver",
    "best_perciever.pth",
    (
        Rule("latents", ("perceiver.latents",)),
        *_linear("img_proj", "perceiver.img_proj"),
        *_mha("cross_attn", "perceiver.cross_attn"),
        *_norm("norm1", "perceiver.norm1"),
        *_linear("ff.0", "perceiver.ff_in"),
        *_linear("ff.2", "perceiver.ff_out"),
        *_norm("norm2", "perceiver.norm2"),
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
        *_norm("{i}.layernorm", "gpt2.xattn.{i}.layernorm"),
        *_mha("{i}.cross_attn", "gpt2.xattn.{i}.cross_attn"),
    ),
)

XATTN_SRC = Table(
    "cross_attention/src",
    "cross_attention",
    "best_cross_attention.pth",
    (*_mha("attn", "gpt2.xattn.attn"), *_norm("norm", "gpt2.xattn.norm")),
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
        *_norm("transformer.ln_f", "gpt2.ln_f"),
        *_gpt2_block_rules("transformer.h.{i}"),
    ),
    aliases=((r"^(?!transformer\.|lm_head\.)", "transformer."),),
    ignore=(*_GPT2_BUFFERS, r"^lm_head\.weight\Z"),
    tied=(("lm_head.weight", "transformer.wte.weight"),),
)


def _convnext_rules() -> tuple[Rule, ...]:
    block = "stages.{s}.blocks.{b}"
    fblock = "encoder.stages.{s}.blocks.{b}"
    return (
        Rule("stem.0.weight", ("encoder.stem.0.kernel",), CONV),
        Rule("stem.0.bias", ("encoder.stem.0.bias",)),
        *_norm("stem.1", "encoder.stem.1"),
        *_norm("stages.{s}.downsample.0", "encoder.stages.{s}.downsample.0"),
        Rule("stages.{s}.downsample.1.weight", ("encoder.stages.{s}.downsample.1.kernel",), CONV),
        Rule("stages.{s}.downsample.1.bias", ("encoder.stages.{s}.downsample.1.bias",)),
        Rule(f"{block}.gamma", (f"{fblock}.gamma",)),
        Rule(f"{block}.conv_dw.weight", (f"{fblock}.conv_dw.kernel",), CONV),
        Rule(f"{block}.conv_dw.bias", (f"{fblock}.conv_dw.bias",)),
        *_norm(f"{block}.norm", f"{fblock}.norm"),
        *_linear(f"{block}.mlp.fc1", f"{fblock}.mlp.fc1"),
        *_linear(f"{block}.mlp.fc2", f"{fblock}.mlp.fc2"),
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
        *_linear("projections.{k}", "encoder_head.projections.{k}"),
        *_norm("norm", "encoder_head.norm"),
    ),
)

HEAD_SRC = Table(
    "encoder_head/src",
    "encoder_head",
    "encoder_head.pth",
    (
        *_linear("proj1", "encoder_head.projections.0"),
        *_linear("proj2", "encoder_head.projections.1"),
        *_linear("proj3", "encoder_head.projections.2"),
        *_norm("norm", "encoder_head.norm"),
    ),
)

# Candidate tables per component, in preference order.
TABLES: dict[str, tuple[Table, ...]] = {
    "perceiver": (PERCEIVER_NOTEBOOK, PERCEIVER_SRC),
    "gpt2_blocks": (GPT2_BLOCKS,),
    "cross_attention": (XATTN_NOTEBOOK, XATTN_SRC),
    "gpt2": (GPT2_HF,),
    "encoder": (CONVNEXT_TIMM,),
    "encoder_head": (HEAD_LENSJAX, HEAD_SRC),
}

# What each component is called by its users (file names of the original).
DESCRIPTIONS = {
    "perceiver": "Perceiver (best_perciever.pth)",
    "gpt2_blocks": "GPT-2 blocks (best_gpt2.pth)",
    "cross_attention": "cross-attention blocks (best_cross_attention.pth)",
    "gpt2": "public HF gpt2 checkpoint",
    "encoder": "timm ConvNeXt-Tiny",
    "encoder_head": "encoder head",
}

# The table each component uses when exporting a model of a given layout.
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
}
