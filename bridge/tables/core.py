"""The machinery of the mapping tables: transforms, rules, tables, and rule builders for the
PyTorch modules the families share (nn.Linear, LayerNorm, nn.MultiheadAttention, GPT-2's
Conv1D).

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


def linear_rules(torch_prefix: str, flax_prefix: str) -> tuple[Rule, Rule]:
    """nn.Linear <-> layers.Linear (weight transposed)."""
    return (
        Rule(f"{torch_prefix}.weight", (f"{flax_prefix}.kernel",), LINEAR),
        Rule(f"{torch_prefix}.bias", (f"{flax_prefix}.bias",)),
    )


def norm_rules(torch_prefix: str, flax_prefix: str) -> tuple[Rule, Rule]:
    """nn.LayerNorm <-> nnx.LayerNorm (weight is `scale`)."""
    return (
        Rule(f"{torch_prefix}.weight", (f"{flax_prefix}.scale",)),
        Rule(f"{torch_prefix}.bias", (f"{flax_prefix}.bias",)),
    )


def mha_rules(torch_prefix: str, flax_prefix: str) -> tuple[Rule, ...]:
    """nn.MultiheadAttention <-> layers.MultiheadAttention (q, k, v, out)."""
    qkv = tuple(f"{flax_prefix}.{p}" for p in ("q", "k", "v"))
    return (
        Rule(f"{torch_prefix}.in_proj_weight", tuple(f"{p}.kernel" for p in qkv), QKV_WEIGHT),
        Rule(f"{torch_prefix}.in_proj_bias", tuple(f"{p}.bias" for p in qkv), QKV_BIAS),
        *linear_rules(f"{torch_prefix}.out_proj", f"{flax_prefix}.out"),
    )


def conv1d_rules(torch_prefix: str, flax_prefix: str) -> tuple[Rule, Rule]:
    """GPT-2's Conv1D already stores (in, out): no transpose."""
    return (
        Rule(f"{torch_prefix}.weight", (f"{flax_prefix}.kernel",)),
        Rule(f"{torch_prefix}.bias", (f"{flax_prefix}.bias",)),
    )
