"""Flat parameter dictionaries keyed by stable dotted paths, and building models from them.

Paths are the module attribute paths joined by dots, e.g. `perceiver.cross_attn.q.kernel` or
`gpt2.h.3.mlp.c_fc.kernel`. The bridge tables, checkpoints and optimizer labels all key off them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lensjax.models.families import family_of
from lensjax.models.layers import Linear

ParamDict = dict[str, np.ndarray]


def path_str(path: tuple) -> str:
    return ".".join(str(part) for part in path)


def flat_params(module: nnx.Module) -> dict[str, jax.Array]:
    """All `nnx.Param` leaves of `module` as {dotted path: array}, kernels (in, out) even where
    the module stores them transposed for inference (`lensjax.runtime`)."""
    flat = {path_str(k): v.get_raw_value()
            for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    for path, sub in module.iter_modules():
        if isinstance(sub, Linear) and sub.transposed:
            kernel = path_str((*path, "kernel"))
            flat[kernel] = flat[kernel].T
    return flat


def new_module(cfg: Any, seed: int = 0) -> nnx.Module:
    """A freshly initialised captioner of `cfg`'s family (lensjax.models.families)."""
    return family_of(cfg).module(cfg, rngs=nnx.Rngs(seed))


@functools.lru_cache(maxsize=8)
def _abstract_captioner(cfg: Any) -> tuple[nnx.GraphDef, nnx.State]:
    # Tracing the full model's construction takes seconds (flax's RNG bookkeeping under
    # eval_shape), so it is done once per configuration and process.
    return nnx.split(nnx.eval_shape(lambda: new_module(cfg)))


def abstract_params(cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: ShapeDtypeStruct} of a captioner of `cfg`, computed without allocating
    weights."""
    return flat_params(nnx.merge(*_abstract_captioner(cfg)))


class ParamMismatchError(ValueError):
    """Parameters do not fit the model configuration (missing, unexpected or mis-shaped)."""


def check_params(cfg: Any, params: Mapping[str, np.ndarray]) -> None:
    """Raise one ParamMismatchError listing every missing, unexpected or mis-shaped path."""
    expected = abstract_params(cfg)
    problems = [f"missing: {p} {tuple(expected[p].shape)}" for p in expected if p not in params]
    problems += [f"unexpected: {p}" for p in params if p not in expected]
    problems += [
        f"shape of {p}: expected {tuple(expected[p].shape)}, found {tuple(params[p].shape)}"
        for p in expected
        if p in params and tuple(params[p].shape) != tuple(expected[p].shape)
    ]
    if problems:
        raise ParamMismatchError(
            f"parameters do not fit preset {cfg.preset!r} ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )


def module_from_flat(cfg: Any, params: Mapping[str, jax.Array]) -> nnx.Module:
    """A captioner of `cfg` holding `params` as given: no checks, casts or copies, so it also
    works on traced arrays inside `jax.jit`."""
    graphdef, template = _abstract_captioner(cfg)
    state = nnx.from_flat_state([
        (path, variable.replace(params[path_str(path)]))
        for path, variable in nnx.to_flat_state(template)
    ])
    return nnx.merge(graphdef, state)


def build_captioner(
    cfg: Any, params: Mapping[str, np.ndarray], dtype: jnp.dtype = jnp.float32
) -> nnx.Module:
    """A captioner of `cfg` holding `params` (cast to `dtype`); every path must be present."""
    check_params(cfg, params)
    return module_from_flat(cfg, {p: _on_device(v, dtype) for p, v in params.items()})


def _on_device(value: Any, dtype: jnp.dtype) -> jax.Array:
    """`value` as a device array of `dtype`: host arrays are cast on the host and put (what
    `jnp.asarray` does through a compiled copy, one per shape)."""
    if isinstance(value, jax.Array):
        return value.astype(dtype)
    return jax.device_put(np.asarray(value, dtype))
