"""Training batches: seeded per-epoch order, resumable positions, process slices, prefetch."""

import numpy as np
import pytest

from lensjax.data.batching import CaptionBatches, MixedBatches, available_pairs, mix_counts
from lensjax.data.cache import FeatureCache
from lensjax.data.tokenizer import EOS_ID, GPT2Tokenizer

SHAPE = (64, 8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching") / "cache"
    captions = {f"img{i}.jpg": [f"a photo number {i}", f"picture {i} of a dog"]
                for i in range(20)}
    rng = np.random.default_rng(0)
    with FeatureCache.create(folder, shards=3, shape=SHAPE) as writer:
        for key in list(captions)[:18]:  # two images have no features
            writer.put(key, rng.standard_normal(SHAPE))
    cache = FeatureCache(folder)
    return captions, cache, GPT2Tokenizer()


def _batches(setup, **kwargs):
    captions, cache, tokenizer = setup
    pairs, _ = available_pairs(captions, cache)
    return CaptionBatches(pairs, cache, tokenizer, **{"batch_size": 8, "max_len": 16, **kwargs})


def test_images_without_features_are_counted_and_left_out(setup):
    captions, cache, _ = setup
    pairs, missing = available_pairs(captions, cache)
    assert missing == ["img18.jpg", "img19.jpg"] and len(pairs) == 36
    assert not {key for key, _ in pairs} & set(missing)


def test_an_epoch_visits_each_pair_once_in_a_seeded_order(setup):
    batches = _batches(setup, seed=3)
    assert len(batches) == 36 // 8
    order0 = batches.order(0)
    assert sorted(order0.tolist()) == list(range(36))
    np.testing.assert_array_equal(order0, _batches(setup, seed=3).order(0))
    assert not np.array_equal(order0, batches.order(1))
    assert not np.array_equal(order0, _batches(setup, seed=4).order(0))


def test_batch_contents_match_the_tokenizer_and_cache(setup):
    captions, cache, tokenizer = setup
    batch = _batches(setup).batch(0, 1)
    assert batch.features.shape == (8, *SHAPE) and batch.features.dtype == np.float16
    assert batch.inputs.shape == batch.targets.shape == (8, 15)
    for row, key in enumerate(batch.keys):
        np.testing.assert_array_equal(batch.features[row], cache[key])
        assert batch.inputs[row, 0] == EOS_ID
        caption_ids = batch.targets[row, : batch.lengths[row]].tolist()
        assert tokenizer.decode(caption_ids) in captions[key]
        assert batch.targets[row, batch.lengths[row]] == EOS_ID


def test_resuming_mid_epoch_gives_the_same_batches(setup):
    batches = _batches(setup, seed=1)
    full = list(batches.epoch(2))
    resumed = list(_batches(setup, seed=1).epoch(2, start=2))
    assert [b.keys for b in resumed] == [b.keys for b in full[2:]]
    for a, b in zip(resumed, full[2:], strict=True):
        np.testing.assert_array_equal(a.inputs, b.inputs)


def test_prefetch_and_plain_iteration_agree(setup):
    batches = _batches(setup, seed=2)
    threaded = list(batches.epoch(0, prefetch=2))
    plain = list(batches.epoch(0, prefetch=0))
    assert [b.keys for b in threaded] == [b.keys for b in plain]


def test_processes_split_each_global_batch(setup):
    whole = _batches(setup, seed=5).batch(1, 2)
    halves = [_batches(setup, seed=5, process_index=i, process_count=2).batch(1, 2)
              for i in range(2)]
    assert halves[0].keys + halves[1].keys == whole.keys
    np.testing.assert_array_equal(np.concatenate([h.targets for h in halves]), whole.targets)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        _batches(setup, process_count=3)


def test_a_failing_read_reaches_the_consumer(setup, monkeypatch):
    batches = _batches(setup)

    def broken(keys):
        raise OSError("disk gone")

    monkeypatch.setattr(batches.cache, "get_batch", broken)
    with pytest.raises(OSError, match="disk gone"):
        list(batches.epoch(0))


def test_mix_counts_fill_every_batch_and_track_the_shares():
    counts = mix_counts([0.5, 0.3, 0.2], 32, 200)
    assert counts.shape == (200, 3) and np.all(counts.sum(1) == 32) and np.all(counts >= 0)
    running = np.cumsum(counts, axis=0)
    expected = np.outer(np.arange(1, 201) * 32, [0.5, 0.3, 0.2])
    assert np.abs(running - expected).max() < 1.0
    assert np.all(mix_counts([1.0, 100.0], 8, 50).sum(1) == 8)  # a share under a row


def _mixed(setup, **kwargs):
    captions, cache, tokenizer = setup
    keys = [k for k in captions if k in cache]
    # Two sources over the same images, told apart by their captions' words.
    big = [(k, f"caption {j} of {k}") for k in keys for j in range(3)]
    small = [(k, "social words") for k in keys[:5]]
    args = {"batch_size": 8, "max_len": 16, **kwargs}
    return MixedBatches({"big": big, "small": small}, {"big": 0.75, "small": 0.25}, cache,
                        tokenizer, **args), tokenizer


def test_mixed_batches_follow_the_mix_and_the_target_defines_the_epoch(setup):
    batches, tokenizer = _mixed(setup)
    assert len(batches) == len(batches.examples[0]) // 6  # 6 target rows per batch of 8
    social = tokenizer.encode("social words")[0]
    rows = small = 0
    for epoch in range(200 // len(batches) + 1):
        for b in batches.epoch(epoch):
            rows += len(b.lengths)
            small += int(np.sum(b.inputs[:, 1] == social))
    assert rows >= 200 * 8
    assert abs(small / rows - 0.25) < 0.05
    # Target rows of one epoch: a permutation's prefix, each example at most once.
    seen = [(k, tuple(row)) for b in batches.epoch(0)
            for k, row in zip(b.keys, b.inputs, strict=True) if row[1] != social]
    assert len(seen) == len(batches) * 6 == len(set(seen))


def test_mixed_batches_are_a_function_of_seed_epoch_and_index(setup):
    batches, _ = _mixed(setup, seed=3)
    again, _ = _mixed(setup, seed=3)
    resumed = list(again.epoch(1, start=2))
    for index, b in enumerate(list(batches.epoch(1))[2:]):
        assert b.keys == resumed[index].keys
        np.testing.assert_array_equal(b.inputs, resumed[index].inputs)
    other, _ = _mixed(setup, seed=4)
    assert [b.keys for b in other.epoch(1)] != [b.keys for b in batches.epoch(1)]
    # Two processes take the two halves of each global batch.
    halves = [_mixed(setup, seed=3, process_index=i, process_count=2)[0] for i in (0, 1)]
    whole = batches.batch(1, 0)
    assert halves[0].batch(1, 0).keys + halves[1].batch(1, 0).keys == whole.keys
