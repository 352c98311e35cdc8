"""The public API checks every argument before any work, and a caption depends on its input
alone: not on the batch it is in, not on uninitialised memory, not on NaN features."""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def model(imported):
    return imported("tiny")


def _features(rows: int, dim: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64, dim)).astype(np.float32)


BAD_GENERATE = [
    ({"batch_size": -1}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": 2.5}, "batch_size"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 50258}, "top_k"),
    ({"top_k": 3.0}, "top_k"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"alpha": float("nan")}, "alpha"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 500}, "max_new_tokens"),  # the tiny GPT-2 has 128 positions
    ({"min_new_tokens": 6, "max_new_tokens": 5}, "min_new_tokens"),
    ({"beam_width": 0, "method": "beam"}, "beam_width"),
    ({"method": "nucleus"}, "method"),
    ({"retry": "yes"}, "retry"),
    ({"identities": [1, 2]}, "identities"),
    ({"identities": [-1, 2, 3]}, "identities"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_GENERATE, ids=[k for _, k in BAD_GENERATE])
def test_generate_refuses_a_bad_argument_by_name(model, kwargs, named):
    with pytest.raises(ValueError, match=named):
        model.generate(_features(3), **kwargs)


def test_generate_refuses_non_finite_features_and_features_without_tokens(model):
    features = _features(3)
    features[1, 5, 7] = np.nan
    with pytest.raises(ValueError, match=r"features hold NaN.*rows \[1\]"):
        model.generate(features)
    features[1, 5, 7] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.generate(features, method="beam")
    with pytest.raises(ValueError, match="zero tokens"):
        model.generate(np.zeros((2, 0, 48), np.float32))
    with pytest.raises(ValueError, match=r"\(B, S, 48\)"):
        model.generate(_features(2, dim=32))


def test_temperature_zero_is_greedy(model):
    features = _features(4, seed=1)
    greedy = model.generate(features, method="greedy", max_new_tokens=6)
    np.testing.assert_array_equal(
        model.generate(features, method="topk", temperature=0.0, max_new_tokens=6), greedy)


def test_no_rows_give_no_captions(model):
    assert model.generate(np.zeros((0, 64, 48), np.float32), max_new_tokens=4).shape == (0, 4)
    assert model.caption([]) == []
    assert model.caption(np.zeros((0, 224, 224, 3), np.float32)) == []


def test_logits_refuse_token_ids_outside_the_vocabulary(model):
    features = _features(1)
    for ids, message in (([[50257]], "0..50256"), ([[-1]], "0..50256"), ([[0.5]], "integers"),
                         (np.zeros((1, 0), int), "T >= 1")):
        with pytest.raises(ValueError, match=message):
            model.logits(features, np.array(ids))


def test_encode_refuses_images_too_small_or_not_finite(model):
    with pytest.raises(ValueError, match="8x8 pixels are too small.*at least 32x32"):
        model.encode(np.zeros((1, 8, 8, 3), np.float32))
    images = np.zeros((2, 64, 64, 3), np.float32)
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"images hold NaN.*rows \[0\]"):
        model.encode(images)


def _image_files(folder, count):
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_caption_accepts_one_path_as_a_str_or_pathlike(model, tmp_path):
    [path] = _image_files(tmp_path, 1)
    options = dict(method="greedy", max_new_tokens=5)
    expected = model.caption([path], **options)
    assert model.caption(str(path), **options) == expected
    assert model.caption(path, **options) == expected


def test_an_image_gets_the_same_sampled_caption_alone_and_in_batches_of_3_and_33(model,
                                                                                    tmp_path):
    paths = _image_files(tmp_path, 33)
    options = dict(method="topk", top_k=50, temperature=1.5, max_new_tokens=10,
                   min_new_tokens=10, retry=False, seed=4)
    alone = model.caption([paths[0]], **options)[0]
    assert model.caption(paths[:3], **options)[0] == alone
    assert model.caption(paths, batch_size=32, **options)[0] == alone
