"""Every component of the Flax model against its PyTorch reference, random weights, float32.

The weights travel torch -> released .pth files -> bridge import, so these tests pin the
modules and the bridge's tables together. Criterion: max |flax - torch| <= 1e-4 (1 + max |torch|).
"""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import FULL, TINY, assert_parity
from lensjax.params import build_captioner

PRESETS = [*TINY, *(pytest.param(p, marks=pytest.mark.slow) for p in FULL)]


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    ids = torch.randint(0, 50257, (2, 11), generator=generator)
    ids[:, 0] = 50256
    return images, ids


@pytest.mark.parametrize("preset", PRESETS)
def test_convnext_stage_maps_match_timm(preset, reference, imported, inputs):
    images, _ = inputs
    with torch.no_grad():
        expected = reference(preset).torch_model.encoder(images)
    actual = imported(preset).module.encoder(images.permute(0, 2, 3, 1).numpy())
    assert len(actual) == 3
    for flax_map, torch_map in zip(actual, expected, strict=True):
        assert_parity(flax_map, torch_map.permute(0, 2, 3, 1))


@pytest.mark.parametrize("preset", PRESETS)
def test_encode_matches_convnext_plus_multiscale_head(preset, reference, imported, inputs):
    images, _ = inputs
    with torch.no_grad():
        expected = reference(preset).torch_model.encode(images)
    model = imported(preset)
    actual = model.encode(images.permute(0, 2, 3, 1).numpy())
    assert actual.shape == (2, 64, model.config.feature_dim)
    assert_parity(actual, expected)


@pytest.mark.parametrize("preset", PRESETS)
def test_perceiver_matches_torch(preset, reference, imported):
    ref = reference(preset)
    features = torch.randn(2, 64, ref.cfg.feature_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.torch_model.perceiver(features)
    assert_parity(imported(preset).module.resample(features.numpy()), expected)


@pytest.mark.parametrize("preset", PRESETS)
def test_injected_gpt2_logits_match_torch(preset, reference, imported, inputs):
    _, ids = inputs
    ref = reference(preset)
    features = torch.randn(2, 64, ref.cfg.feature_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.torch_model(features, ids, mode="inject")
    actual = imported(preset).logits(features.numpy(), ids.numpy())
    assert actual.dtype == np.float32 and actual.shape == (2, 11, 50257)
    assert_parity(actual, expected)


@pytest.mark.parametrize("preset", ["tiny", pytest.param("v3b", marks=pytest.mark.slow)])
def test_prepend_mode_logits_match_torch(preset, reference, imported, inputs):
    _, ids = inputs
    ref = reference(preset)
    model = imported(preset)
    prepend = build_captioner(dataclasses.replace(model.config, mode="prepend"), model.params)
    features = torch.randn(2, 64, ref.cfg.feature_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref.torch_model(features, ids, mode="prepend")
    assert_parity(prepend(features.numpy(), ids.numpy()), expected)
