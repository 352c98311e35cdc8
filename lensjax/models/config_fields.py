"""Model configurations from JSON (a checkpoint's `lensjax.json`), every field checked."""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar


def config_from_fields(kind: type, data: Any, where: str) -> Any:
    """The config dataclass `kind` built from `data`, a mapping of all its fields, each
    checked against its annotation; `where` names `data` in errors."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be an object, found {reprlib.repr(data)}")
    names = [field.name for field in dataclasses.fields(kind)]
    unknown = [name for name in data if name not in names]
    missing = [name for name in names if name not in data]
    problems = []
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(str, unknown))}")
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    hints = typing.get_type_hints(kind)
    return kind(**{name: _field_value(hints[name], data[name], f"{where}.{name}")
                   for name in names})


def _field_value(hint: Any, value: Any, where: str) -> Any:
    """`value` checked against the type `hint` (JSON lists become tuples, ints floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _field_value(inner, value, where)
    if dataclasses.is_dataclass(hint):
        return config_from_fields(hint, value, where)
    if origin is typing.Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, "
                         f"found {reprlib.repr(value)}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list, found {reprlib.repr(value)}")
        return tuple(_field_value(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    expected = {int: "a non-negative integer", float: "a finite number", str: "a string",
                bool: "true or false"}
    raise ValueError(f"{where} must be {expected.get(hint, hint)}, found {reprlib.repr(value)}")


class JsonConfig:
    """Base of the model configs (frozen dataclasses with a `family` and a `preset`): named
    presets (the family's, `lensjax.models.families`), and to and from the JSON of a
    checkpoint's `lensjax.json`. A captioner's features are tokens (B, S, feature_dim) unless
    its config sets `pooled_features` (one vector per image, (B, feature_dim): v1)."""

    pooled_features: ClassVar[bool] = False

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Any:
        """The family's preset `name`, with `overrides` of its fields."""
        from lensjax.models.families import family_named

        presets = family_named(cls.family).presets
        if name not in presets:
            raise ValueError(f"unknown {cls.family} preset {name!r}; choose one of "
                             f"{sorted(presets)}")
        return dataclasses.replace(presets[name], **overrides)

    def describe(self) -> str:
        """e.g. "v3a preset 'v3a'", for messages."""
        return f"{self.family} preset {self.preset!r}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Inverse of `to_dict` (lists from JSON become tuples). Every field of every part
        must be present and of its type; otherwise a ValueError names the field
        (`config.gpt2.n_layer must be ...`)."""
        return config_from_fields(cls, data, "config")
