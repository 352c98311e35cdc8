"""Argument checks shared by the public API: each error names the argument and the allowed
range, and is raised before any work starts."""

from __future__ import annotations

import math
import numbers

SEED_MAX = 2**63 - 1


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high] (high None: unbounded); ValueError naming `name`."""
    allowed = f">= {low}" if high is None else f"in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def check_real(name: str, value: object, low: float | None = None) -> float:
    """`value` as a finite float (>= low when given); ValueError naming `name`."""
    allowed = "a finite number" + ("" if low is None else f" >= {low:g}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if not math.isfinite(value) or (low is not None and value < low):
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
