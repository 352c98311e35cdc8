"""LoRA adapters on a captioner's dense layers, with PEFT's scaling.

A targeted Linear layer with kernel W (in, out) computes `x @ W + scale * (x @ A) @ B + bias`
with A (in, rank), B (rank, out) and `scale = alpha / rank` (PEFT's `LoraConfig` default
scaling). A starts as PEFT initialises `lora_A` (Kaiming-uniform, a = sqrt(5)), B at zero, so
a fresh adapter changes nothing. PEFT stores `lora_A.weight` (rank, in) and `lora_B.weight`
(out, rank), the transposes of A and B; the merged weight is the same `W + scale * A @ B`.

Adapters live in the flat parameter dict under `lora.<layer path>.a` / `.b`, with their own
optimizer label `lora`, so the base weights can stay frozen (no optimizer state). A checkpoint
stores the base weights as usual, the adapters in its `lora/` tree and the spec in
`lensjax.json` ("lora": {"rank", "alpha", "targets"}); reading it for captioning merges them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lensjax.models.encoding import IMAGE_LABEL_RULES

PREFIX = "lora."
TREE = "lora"  # the checkpoint tree that holds the adapters
# Never targeted: the image side (it is not the decoder whose style changes).
_IMAGE_SIDE = tuple(re.compile(pattern) for _, pattern in IMAGE_LABEL_RULES)
DEFAULT_RANK, DEFAULT_ALPHA = 8, 16.0


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """Which dense layers get adapters (`targets`: names of path components, e.g. `c_attn`
    targets `gpt2.h.{i}.attn.c_attn`, `xattn` every layer under `gpt2.xattn`), their rank,
    and alpha (scale = alpha / rank)."""

    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRASpec:
        return cls(int(data["rank"]), float(data["alpha"]), tuple(data["targets"]))


def parse_spec(text: str, default_targets: Sequence[str]) -> LoRASpec:
    """'rank=8,alpha=16,targets=c_attn,c_fc' -> LoRASpec; items after `targets=` without an
    `=` continue the target list. Unset fields take the defaults (rank 8, alpha 16, the
    family's targets). ValueError naming a bad item."""
    fields: dict[str, Any] = {}
    targets: list[str] | None = None
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            if targets is None:
                raise ValueError(f"expected KEY=VALUE (rank, alpha, targets), got {item!r}")
            targets.append(item)
        elif key == "targets":
            targets = [value] if value else []
        elif key in ("rank", "alpha"):
            try:
                fields[key] = int(value) if key == "rank" else float(value)
            except ValueError:
                raise ValueError(f"{key}={value!r} is not a number") from None
        else:
            raise ValueError(f"unknown LoRA setting {key!r}; use rank, alpha, targets")
    if targets is not None and not targets:
        raise ValueError("targets= names no layer")
    return LoRASpec(fields.get("rank", DEFAULT_RANK), fields.get("alpha", DEFAULT_ALPHA),
                    tuple(targets or default_targets))


def _layer(kernel_path: str) -> str:
    return kernel_path[: -len(".kernel")]


def target_layers(paths: Iterable[str], spec: LoRASpec) -> list[str]:
    """The dense layers (paths without `.kernel`) among `paths` that `spec` targets: every
    layer with a 2-D `kernel` whose path has a target as one of its components, outside the
    image encoder. ValueError for a target that matches no layer."""
    kernels = [_layer(p) for p in paths if p.endswith(".kernel") and not p.startswith(PREFIX)
               and not any(side.match(p) for side in _IMAGE_SIDE)]
    chosen, unused = [], set(spec.targets)
    for layer in kernels:
        hits = set(layer.split(".")) & set(spec.targets)
        if hits:
            chosen.append(layer)
            unused -= hits
    if unused:
        raise ValueError(f"LoRA target(s) {', '.join(sorted(unused))} match no dense layer of "
                         "this model")
    return chosen


def adapter_paths(layer: str) -> tuple[str, str]:
    """(A path, B path) of a layer's adapter."""
    return f"{PREFIX}{layer}.a", f"{PREFIX}{layer}.b"


def init_adapters(params: Mapping[str, Any], spec: LoRASpec, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Fresh adapters for every targeted layer of `params`: A (in, rank) Kaiming-uniform with
    a = sqrt(5) as PEFT (bound 1 / sqrt(in)), B (rank, out) zeros; float32."""
    rng = np.random.default_rng([seed, 0x10A])
    adapters: dict[str, np.ndarray] = {}
    for layer in target_layers(params, spec):
        n_in, n_out = params[layer + ".kernel"].shape
        a_path, b_path = adapter_paths(layer)
        bound = 1.0 / math.sqrt(n_in)
        adapters[a_path] = rng.uniform(-bound, bound, (n_in, spec.rank)).astype(np.float32)
        adapters[b_path] = np.zeros((spec.rank, n_out), np.float32)
    return adapters


def split_adapters(params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{path: array} -> (base weights, adapters)."""
    base = {p: v for p, v in params.items() if not p.startswith(PREFIX)}
    return base, {p: v for p, v in params.items() if p.startswith(PREFIX)}


def adapter_layers(adapters: Mapping[str, Any]) -> list[str]:
    """The layer paths `adapters` cover."""
    return sorted({p[len(PREFIX):-2] for p in adapters})


def merge(params: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], spec: LoRASpec
          ) -> dict[str, np.ndarray]:
    """The base weights with each adapter folded in: kernel + scale * A @ B (float32)."""
    merged = dict(params)
    for layer in adapter_layers(adapters):
        a_path, b_path = adapter_paths(layer)
        kernel = np.asarray(params[layer + ".kernel"], np.float32)
        delta = np.asarray(adapters[a_path], np.float32) @ np.asarray(adapters[b_path],
                                                                      np.float32)
        merged[layer + ".kernel"] = kernel + np.float32(spec.scale) * delta
    return merged


def attach(model: Any, adapters: Mapping[str, Any], scale: float) -> None:
    """Give each adapted Linear of `model` (built inside the same trace, e.g. by
    `module_from_flat` in a jitted loss) its (A, B, scale): its output gains
    `scale * (x @ A) @ B`, the unmerged form, whose backward pass never forms a full weight
    gradient."""
    from lensjax.params import path_str

    layers = set(adapter_layers(adapters))
    for path, module in model.iter_modules():
        name = path_str(path)
        if name in layers:
            a_path, b_path = adapter_paths(name)
            module.lora = (adapters[a_path], adapters[b_path], scale)
            layers.discard(name)
    if layers:
        raise ValueError(f"adapters for layers the model lacks: {sorted(layers)[:3]}")
