"""Shared fixtures: PyTorch reference models with random weights, saved as the original's
files, and the lensjax models the bridge makes of them (cached per preset and session)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

jax.config.update("jax_default_matmul_precision", "highest")
# The Keras references of v1/v2 (tests/test_inception.py, test_lstm.py) use TensorFlow ops.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


@pytest.fixture(autouse=True, scope="session")
def compilation_cache(tmp_path_factory):
    """The CLIs keep compiled programs in $LENSJAX_CACHE_DIR (default ~/.cache/lensjax/jax):
    during the tests, in a temporary folder. JAX sets its on-disk cache up once per process,
    so one folder serves the whole session (and repeated CLI runs reuse what it holds)."""
    previous = os.environ.get("LENSJAX_CACHE_DIR")
    os.environ["LENSJAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    yield
    if previous is None:
        del os.environ["LENSJAX_CACHE_DIR"]
    else:
        os.environ["LENSJAX_CACHE_DIR"] = previous

from bridge import import_model  # noqa: E402
from lensjax import CaptionerConfig, CaptionModel  # noqa: E402
from torch_reference import Captioner as TorchCaptioner  # noqa: E402
from torch_reference import reference_model, write_released_files  # noqa: E402

FULL = ("v3b", "v3b-src")
TINY = ("tiny", "tiny-src")


@dataclasses.dataclass
class Reference:
    cfg: CaptionerConfig
    torch_model: TorchCaptioner
    files: dict[str, Path]


def import_files(files: dict[str, Path], preset: str, **overrides) -> CaptionModel:
    """The bridge's import of every file written by `write_released_files`."""
    kwargs = {k: files[k] for k in
              ("perceiver", "gpt2_blocks", "cross_attention", "gpt2", "encoder", "encoder_head")}
    kwargs.update(overrides)
    return import_model(preset=preset, **kwargs)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(preset) -> Reference: torch model with random weights + its released files."""
    cache: dict[str, Reference] = {}

    def get(preset: str) -> Reference:
        if preset not in cache:
            cfg = CaptionerConfig.from_preset(preset)
            model = reference_model(cfg, seed=len(cache))
            cache[preset] = Reference(cfg, model, write_released_files(
                model, tmp_path_factory.mktemp(preset)))
        return cache[preset]

    return get


@pytest.fixture(scope="session")
def imported(reference):
    """imported(preset) -> CaptionModel converted by the bridge from reference(preset)."""
    cache: dict[str, CaptionModel] = {}

    def get(preset: str) -> CaptionModel:
        if preset not in cache:
            cache[preset] = import_files(reference(preset).files, preset)
        return cache[preset]

    return get


def assert_parity(flax_out, torch_out) -> None:
    """The parity criterion: max |flax - torch| <= 1e-4 * (1 + max |torch|)."""
    expected = torch_out.detach().numpy() if isinstance(torch_out, torch.Tensor) else torch_out
    actual = np.asarray(flax_out)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error = float(np.abs(actual - expected).max())
    bound = 1e-4 * (1.0 + float(np.abs(expected).max()))
    assert error <= bound, f"max |flax - torch| = {error:.3g} > {bound:.3g}"
