"""The LMDB feature cache: reads LensToWords' shards unchanged, writes the same format, resumes,
and names the file and key in every error."""

import json
import os
import zlib

import lmdb
import numpy as np
import pytest

from lensjax.data.cache import (
    METADATA_FILE,
    FeatureCache,
    FeatureCacheError,
    shard_for,
)

SHAPE = (64, 768)


def _features(seed, shape=SHAPE):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float16)


def _write_original_shard(path, items):
    """A shard as LensToWords wrote it: plain lmdb, key utf-8 bytes -> float16 tobytes()."""
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for key, array in items.items():
            txn.put(key.encode(), array.tobytes())
    env.close()


def _original_cache(folder, keys_per_shard, parts=(1, 2, 3)):
    """Shards lmdb-part-{parts} with `keys_per_shard` keys each -> {key: array}."""
    everything = {}
    for part in parts:
        items = {f"{part}{i:04d}.jpg": _features(part * 1000 + i) for i in range(keys_per_shard)}
        _write_original_shard(folder / f"lmdb-part-{part}", items)
        everything.update(items)
    return everything


def _original_get_embedding(shards, key):
    """LensToWords' lookup: every shard in order, one read transaction per shard."""
    envs = [lmdb.open(str(s), readonly=True, lock=False, readahead=False) for s in shards]
    try:
        for env in envs:
            with env.begin() as txn:
                value = txn.get(key.encode())
                if value is not None:
                    return np.frombuffer(value, dtype=np.float16).reshape(64, 768).copy()
    finally:
        for env in envs:
            env.close()
    return None


def _count(shard):
    with FeatureCache(shard) as cache:
        return len(cache)


# --- reading the original's shards -----------------------------------------------------------


def test_original_shards_read_bit_identical(tmp_path):
    written = _original_cache(tmp_path / "flickr", 4)
    with FeatureCache(tmp_path / "flickr") as cache:
        assert len(cache) == 12
        for key, array in written.items():
            assert key in cache and key.encode() in cache
            got = cache[key]
            assert got.dtype == np.float16 and got.shape == SHAPE
            assert np.array_equal(got, array, equal_nan=True)
            assert got.tobytes() == array.tobytes()
        assert "nope.jpg" not in cache


def test_get_batch_keeps_request_order_across_shards(tmp_path):
    written = _original_cache(tmp_path / "flickr", 3)
    keys = ["30001.jpg", "10000.jpg", "20002.jpg", "10000.jpg", "30000.jpg"]
    with FeatureCache(tmp_path / "flickr") as cache:
        batch = cache.get_batch(keys)
        assert batch.shape == (5, *SHAPE) and batch.dtype == np.float16
        assert batch.tobytes() == np.stack([written[k] for k in keys]).tobytes()
        assert cache.get_batch([]).shape == (0, *SHAPE)


def test_shard_list_and_folder_give_the_same_cache(tmp_path):
    written = _original_cache(tmp_path / "flickr", 2)
    shards = [tmp_path / "flickr" / f"lmdb-part-{i}" for i in (1, 2, 3)]
    with FeatureCache(shards) as listed, FeatureCache(str(tmp_path / "flickr")) as folder:
        assert listed.keys() == folder.keys() == list(written)
        assert listed.shards == folder.shards == shards
        assert listed["20001.jpg"].tobytes() == folder["20001.jpg"].tobytes()


def test_one_shard_folder_is_a_cache(tmp_path):
    written = _original_cache(tmp_path / "flickr", 2)
    with FeatureCache(tmp_path / "flickr" / "lmdb-part-2") as cache:
        assert cache.keys() == ["20000.jpg", "20001.jpg"]
        assert cache["20001.jpg"].tobytes() == written["20001.jpg"].tobytes()


def test_shards_in_a_folder_are_sorted_naturally(tmp_path):
    _original_cache(tmp_path / "coco", 1, parts=(10, 2, 1, 11))
    with FeatureCache(tmp_path / "coco") as cache:
        assert [s.name for s in cache.shards] == [f"lmdb-part-{i}" for i in (1, 2, 10, 11)]
        assert cache.keys() == ["10000.jpg", "20000.jpg", "100000.jpg", "110000.jpg"]
        assert cache.shard_of("100000.jpg") == tmp_path / "coco" / "lmdb-part-10"


def test_key_in_two_shards_resolves_to_the_first_as_the_original_scan(tmp_path):
    _write_original_shard(tmp_path / "c" / "lmdb-part-1", {"a.jpg": _features(1)})
    _write_original_shard(tmp_path / "c" / "lmdb-part-2", {"a.jpg": _features(2),
                                                         "b.jpg": _features(3)})
    shards = [tmp_path / "c" / "lmdb-part-1", tmp_path / "c" / "lmdb-part-2"]
    original = _original_get_embedding(shards, "a.jpg")
    with FeatureCache(tmp_path / "c") as cache:
        assert len(cache) == 2 and cache.keys() == ["a.jpg", "b.jpg"]
        assert cache.shard_of("a.jpg").name == "lmdb-part-1"
        assert cache["a.jpg"].tobytes() == original.tobytes() == _features(1).tobytes()
        assert cache.get_batch(["a.jpg"]).tobytes() == original.tobytes()


def test_shape_argument_overrides_the_default(tmp_path):
    small = {"x.jpg": _features(0, (64, 48))}
    _write_original_shard(tmp_path / "c" / "lmdb-part-1", small)
    with FeatureCache(tmp_path / "c", shape=(64, 48)) as cache:
        assert cache["x.jpg"].tobytes() == small["x.jpg"].tobytes()


def test_two_caches_on_the_same_shards_coexist_and_close_independently(tmp_path):
    written = _original_cache(tmp_path / "flickr", 2)
    train = FeatureCache(tmp_path / "flickr")
    with FeatureCache(tmp_path / "flickr" / "lmdb-part-1") as val:
        assert val["10001.jpg"].tobytes() == train["10001.jpg"].tobytes()
    assert train["10001.jpg"].tobytes() == written["10001.jpg"].tobytes()
    train.close()


# --- writing ----------------------------------------------------------------------------------


def test_own_writes_are_the_original_format(tmp_path):
    dtypes = (np.float64, np.float32, np.float16)
    arrays = {f"{i}.jpg": np.random.default_rng(i).standard_normal(SHAPE).astype(dtypes[i % 3])
              for i in range(20)}
    with FeatureCache.create(tmp_path / "mine", shards=6) as writer:
        for key, array in arrays.items():
            writer.put(key, array)
    names = sorted(p.name for p in (tmp_path / "mine").iterdir())
    assert names == [METADATA_FILE] + [f"lmdb-part-{i}" for i in range(1, 7)]
    assert json.loads((tmp_path / "mine" / METADATA_FILE).read_text()) == {
        "format": "lensjax-feature-cache", "shape": [64, 768], "dtype": "float16", "shards": 6}
    shards = [tmp_path / "mine" / f"lmdb-part-{i}" for i in range(1, 7)]
    for key, array in arrays.items():
        expected = array.astype("<f2").tobytes()
        assert len(expected) == 98_304
        assert _original_get_embedding(shards, key).tobytes() == expected
    with FeatureCache(tmp_path / "mine") as cache:
        assert sorted(cache.keys()) == sorted(arrays) and len(cache) == 20
        assert cache.get_batch(list(arrays)).tobytes() == b"".join(
            a.astype("<f2").tobytes() for a in arrays.values())


def test_shard_assignment_is_a_stable_hash_of_the_key(tmp_path):
    assert shard_for("1000092795.jpg", 6) == zlib.crc32(b"1000092795.jpg") % 6 == 2
    assert shard_for(b"000000000139.jpg", 12) == 11
    with FeatureCache.create(tmp_path / "mine", shards=4, shape=(2, 3)) as writer:
        for i in range(40):
            writer.put(f"{i}.jpg", np.zeros((2, 3)))
    with FeatureCache(tmp_path / "mine") as cache:
        for i in range(40):
            assert cache.shard_of(f"{i}.jpg").name == f"lmdb-part-{shard_for(f'{i}.jpg', 4) + 1}"
        assert all(_count(shard) > 0 for shard in cache.shards)


def test_small_shape_is_recorded_and_read_back(tmp_path):
    with FeatureCache.create(tmp_path / "tiny", shards=2, shape=(64, 48)) as writer:
        writer.put("a.jpg", _features(0, (64, 48)))
    with FeatureCache(tmp_path / "tiny") as cache:
        assert cache.shape == (64, 48)
        assert cache["a.jpg"].tobytes() == _features(0, (64, 48)).tobytes()


def test_resume_keeps_keys_adds_more_and_duplicates_nothing(tmp_path):
    with FeatureCache.create(tmp_path / "mine", shards=3) as writer:
        for i in range(5):
            writer.put(f"{i}.jpg", _features(i))
    with FeatureCache.create(tmp_path / "mine", shards=3) as writer:
        assert all(f"{i}.jpg" in writer for i in range(5)) and "5.jpg" not in writer
        assert len(writer) == 5
        for i in range(3, 8):
            if f"{i}.jpg" not in writer:
                writer.put(f"{i}.jpg", _features(i))
        writer.put("0.jpg", _features(100))  # overwritten where it is
        assert "7.jpg" in writer and len(writer) == 8
    with FeatureCache(tmp_path / "mine") as cache:
        assert sorted(cache.keys()) == [f"{i}.jpg" for i in range(8)]
        assert cache["0.jpg"].tobytes() == _features(100).tobytes()
        assert cache["6.jpg"].tobytes() == _features(6).tobytes()
        assert sum(_count(shard) for shard in cache.shards) == 8


def test_key_put_twice_keeps_the_last_value_once(tmp_path):
    with FeatureCache.create(tmp_path / "mine", shards=2) as writer:
        writer.put("a.jpg", _features(1))
        writer.commit()
        writer.put("a.jpg", _features(2))
        writer.put("a.jpg", _features(3))
    with FeatureCache(tmp_path / "mine") as cache:
        assert cache.keys() == ["a.jpg"]
        assert cache["a.jpg"].tobytes() == _features(3).tobytes()


def test_resuming_an_original_cache_overwrites_keys_in_their_own_shard(tmp_path):
    _original_cache(tmp_path / "flickr", 2)
    with FeatureCache.create(tmp_path / "flickr", shards=3) as writer:
        assert "20001.jpg" in writer
        writer.put("20001.jpg", _features(7))
    with FeatureCache(tmp_path / "flickr") as cache:
        assert len(cache) == 6 and cache.shard_of("20001.jpg").name == "lmdb-part-2"
        assert cache["20001.jpg"].tobytes() == _features(7).tobytes()


def test_commit_is_durable_and_an_exception_drops_only_uncommitted_puts(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureCache.create(tmp_path / "mine", shards=2) as writer:
            writer.put("kept.jpg", _features(1))
            writer.commit()
            writer.put("lost.jpg", _features(2))
            assert "lost.jpg" in writer
            raise RuntimeError("boom")
    with FeatureCache(tmp_path / "mine") as cache:
        assert cache.keys() == ["kept.jpg"]


def test_cache_is_readable_while_its_writer_is_open_and_shows_only_commits(tmp_path):
    with FeatureCache.create(tmp_path / "mine", shards=2) as writer:
        writer.put("a.jpg", _features(1))
        writer.commit()
        writer.put("b.jpg", _features(2))
        with FeatureCache(tmp_path / "mine") as cache:
            assert cache.keys() == ["a.jpg"]


# --- bad input --------------------------------------------------------------------------------


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such feature cache folder"):
        FeatureCache(tmp_path / "nowhere")


def test_missing_listed_shard_is_named(tmp_path):
    _original_cache(tmp_path / "flickr", 1, parts=(1,))
    with pytest.raises(FileNotFoundError, match=r"lmdb-part-2: no such LMDB shard"):
        FeatureCache([tmp_path / "flickr" / "lmdb-part-1", tmp_path / "flickr" / "lmdb-part-2"])


def test_folder_without_shards_is_refused(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no shards here")
    with pytest.raises(ValueError, match=r"empty holds no LMDB shards"):
        FeatureCache(tmp_path / "empty")


def test_shard_of_random_bytes_is_named(tmp_path):
    _original_cache(tmp_path / "c", 1, parts=(1, 2))
    (tmp_path / "c" / "lmdb-part-2" / "data.mdb").write_bytes(os.urandom(50_000))
    with pytest.raises(FeatureCacheError, match=r"lmdb-part-2: not a readable LMDB shard"):
        FeatureCache(tmp_path / "c")


def test_truncated_shard_is_named(tmp_path):
    _original_cache(tmp_path / "c", 3, parts=(1,))
    data = tmp_path / "c" / "lmdb-part-1" / "data.mdb"
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(FeatureCacheError, match=r"lmdb-part-1: data.mdb is truncated"):
        FeatureCache(tmp_path / "c")


def test_shard_with_damaged_pages_is_named(tmp_path):
    _original_cache(tmp_path / "c", 3, parts=(1,))
    data = tmp_path / "c" / "lmdb-part-1" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[8192:] = np.random.default_rng(0).integers(0, 256, len(raw) - 8192, np.uint8).tobytes()
    data.write_bytes(bytes(raw))
    with pytest.raises(FeatureCacheError, match=r"lmdb-part-1: damaged LMDB shard"):
        FeatureCache(tmp_path / "c")


def test_value_of_wrong_length_names_key_shard_and_sizes(tmp_path):
    _write_original_shard(tmp_path / "c" / "lmdb-part-1", {"ok.jpg": _features(0)})
    _write_original_shard(tmp_path / "c" / "lmdb-part-2", {"short.jpg": _features(1)[:10]})
    with FeatureCache(tmp_path / "c") as cache:
        assert cache["ok.jpg"].shape == SHAPE
        with pytest.raises(FeatureCacheError, match=r"lmdb-part-2: value of key 'short.jpg' has "
                                                    r"15360 bytes, expected 98304"):
            cache.get_batch(["ok.jpg", "short.jpg"])


def test_missing_key_is_named_with_the_cache_size(tmp_path):
    _original_cache(tmp_path / "c", 2)
    with FeatureCache(tmp_path / "c") as cache:
        with pytest.raises(KeyError, match=r"'absent.jpg' is not in the feature cache .*6 keys in "
                                           r"3 shards"):
            cache.get_batch(["10000.jpg", "absent.jpg"])
        with pytest.raises(KeyError, match="absent.jpg"):
            cache.shard_of("absent.jpg")


def test_put_of_wrong_shape_names_key_and_shapes(tmp_path):
    with FeatureCache.create(tmp_path / "mine", shards=2) as writer:
        with pytest.raises(ValueError, match=r"'bad.jpg' have shape \(49, 1024\), expected "
                                             r"\(64, 768\)"):
            writer.put("bad.jpg", np.zeros((49, 1024), np.float32))
        assert "bad.jpg" not in writer


def test_put_of_integers_is_refused(tmp_path):
    with FeatureCache.create(tmp_path / "mine", shards=2) as writer:
        with pytest.raises(ValueError, match=r"'int.jpg' have dtype int64, expected a float"):
            writer.put("int.jpg", np.zeros(SHAPE, np.int64))


def test_resume_with_another_shard_count_is_refused(tmp_path):
    FeatureCache.create(tmp_path / "mine", shards=6).close()
    with pytest.raises(FeatureCacheError, match=r"holds a cache of 6 shards .* cannot resume it "
                                                r"as 3 shards"):
        FeatureCache.create(tmp_path / "mine", shards=3)


def test_resume_with_another_shape_is_refused(tmp_path):
    FeatureCache.create(tmp_path / "mine", shards=2, shape=(64, 48)).close()
    with pytest.raises(FeatureCacheError, match=r"float16 \(64, 48\); cannot resume it as 2 "
                                                r"shards of \(64, 768\)"):
        FeatureCache.create(tmp_path / "mine", shards=2)


def test_create_in_a_folder_holding_something_else_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(FeatureCacheError, match=r"photos exists and is not a feature cache"):
        FeatureCache.create(tmp_path / "photos")
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["a.jpg"]


def test_writing_a_cache_this_process_is_reading_is_refused(tmp_path):
    _original_cache(tmp_path / "flickr", 1)
    with FeatureCache(tmp_path / "flickr"):
        with pytest.raises(FeatureCacheError, match=r"lmdb-part-1 is already open in this "
                                                    r"process by a FeatureCache"):
            FeatureCache.create(tmp_path / "flickr", shards=3)
        assert not (tmp_path / "flickr" / METADATA_FILE).exists()
    FeatureCache.create(tmp_path / "flickr", shards=3).close()
    assert (tmp_path / "flickr" / METADATA_FILE).exists()


def test_cache_missing_a_listed_shard_is_incomplete(tmp_path):
    FeatureCache.create(tmp_path / "mine", shards=3).close()
    for name in ("data.mdb", "lock.mdb"):
        (tmp_path / "mine" / "lmdb-part-3" / name).unlink()
    with pytest.raises(FeatureCacheError, match=r"incomplete cache, lensjax_cache.json lists 3 "
                                                r"shards but 2 were found"):
        FeatureCache(tmp_path / "mine")


def test_closed_cache_refuses_reads(tmp_path):
    _original_cache(tmp_path / "c", 1, parts=(1,))
    cache = FeatureCache(tmp_path / "c")
    cache.close()
    cache.close()
    with pytest.raises(ValueError, match="closed"):
        cache["10000.jpg"]


def test_shards_of_two_caches_read_with_their_described_shape(tmp_path):
    from lensjax.data.cache import SHARD_PREFIX, FeatureCache, FeatureCacheError

    rng = np.random.default_rng(0)
    for name, shape in (("a", (4, 6)), ("b", (4, 6)), ("c", (4, 5))):
        with FeatureCache.create(tmp_path / name, shards=2, shape=shape) as writer:
            writer.put(f"{name}.png", rng.standard_normal(shape))
    shards = [s for name in "ab" for s in sorted((tmp_path / name).glob(SHARD_PREFIX + "*"))]
    cache = FeatureCache(shards)
    assert cache.shape == (4, 6) and {"a.png", "b.png"} <= set(cache.keys())
    mixed = [s for name in "ac" for s in sorted((tmp_path / name).glob(SHARD_PREFIX + "*"))]
    with pytest.raises(FeatureCacheError, match="different shapes"):
        FeatureCache(mixed)
