"""Feature-cache read speed: LensToWords' lookup vs `FeatureCache.get_batch`, one run.

Builds a cache of `--keys` random float16 (64, 768) features in 6 shards (the original's format,
~98 KB a key) in a temporary folder, draws `--batches` random batches of 32 keys, and reads the
same batches both ways:

- original: LensToWords' `get_embedding` per key (every shard in order, a read transaction per
  shard, until the key is found), the Dataset's `.copy()`, then the collate's stack into a
  (32, 64, 768) float16 batch. The original also converted each sample to float32 on the CPU
  (`.float()`); that is reported separately (`seed_way_float32_samples_per_s`), since lensjax
  hands float16 to the accelerator and converts there.
- lensjax: `FeatureCache.get_batch(keys)`: an index built once at opening, one read transaction
  per shard involved, values copied straight from LMDB's memory map into the batch array.

For scale, `memcpy_ceiling_samples_per_s` is the rate of only copying the same rows into a batch
from a RAM-resident array (one thread): a batch reader cannot do much better than that.

Both read through environments opened the original's way (read-only, no lock, no readahead)
and each is measured after one untimed warm-up pass over the same batches, so the OS page cache
holds the data and neither is disk-bound. The temporary cache is deleted at the end.

    .venv/bin/python experiments/bench/data.py [--keys 30000] [--batches 300] [--dir /tmp]

Prints one human line and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lmdb
import numpy as np

from lensjax.data.cache import FeatureCache

SHAPE = (64, 768)
SHARDS = 6
BATCH = 32
# An LMDB value of 98,304 bytes takes 25 overflow pages of 4 KiB.
BYTES_PER_KEY = 25 * 4096


def build_cache(folder: Path, keys: int, seed: int = 0) -> list[str]:
    """`keys` random features in SHARDS shards at `folder` -> the keys, in write order."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal((256, *SHAPE)).astype(np.float16)
    names = [f"{1000000000 + i}.jpg" for i in range(keys)]
    with FeatureCache.create(folder, shards=SHARDS, shape=SHAPE) as writer:
        for i, name in enumerate(names):
            writer.put(name, pool[(i * 7919) % len(pool)])
            if (i + 1) % 2000 == 0:
                writer.commit()
    return names


def original_get_embedding(envs: Sequence[lmdb.Environment], key: str) -> np.ndarray | None:
    """LensToWords' `get_embedding`, as in its notebooks."""
    key_bytes = key.encode()
    for env in envs:
        with env.begin() as txn:
            value = txn.get(key_bytes)
            if value is not None:
                return np.frombuffer(value, dtype=np.float16).reshape(64, 768)
    return None


def original_batch(envs: Sequence[lmdb.Environment], keys: Sequence[str]) -> np.ndarray:
    """The Dataset's `torch.from_numpy(get_embedding(key).copy())`, then the collate's stack."""
    return np.stack([original_get_embedding(envs, key).copy() for key in keys])


def original_batch_float32(envs: Sequence[lmdb.Environment], keys: Sequence[str]) -> np.ndarray:
    """The same with the original's per-sample `.float()`."""
    return np.stack([original_get_embedding(envs, key).copy().astype(np.float32) for key in keys])


def samples_per_s(read: Callable[[Sequence], np.ndarray], batches: Sequence[Sequence]) -> float:
    """One untimed warm-up pass over `batches`, then one timed pass."""
    for keys in batches:
        read(keys)
    start = time.perf_counter()
    for keys in batches:
        read(keys)
    return sum(len(keys) for keys in batches) / (time.perf_counter() - start)


def memcpy_ceiling(batches: Sequence[Sequence[str]], rows: int = 3072) -> float:
    """Samples/s of only copying each sample's bytes into a batch array, from a RAM-resident
    array larger than the CPU caches: about the most any reader that returns a batch can reach
    on this machine with one thread."""
    source = np.ones((rows, *SHAPE), np.float16)
    out = np.empty((BATCH, *SHAPE), np.float16)
    picks = [[int(key.split(".")[0]) % rows for key in keys] for keys in batches]

    def read(rows_of_batch: Sequence[int]) -> np.ndarray:
        for row, pick in enumerate(rows_of_batch):
            out[row] = source[pick]
        return out

    return samples_per_s(read, picks)


def open_original_envs(folder: Path) -> list[lmdb.Environment]:
    """The shards opened as the original opened them."""
    return [lmdb.open(str(folder / f"lmdb-part-{i}"), readonly=True, lock=False,
                      readahead=False) for i in range(1, SHARDS + 1)]


def run(folder: Path, keys: list[str], n_batches: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    batches = [[keys[i] for i in rng.choice(len(keys), BATCH, replace=False)]
               for _ in range(n_batches)]

    envs = open_original_envs(folder)
    try:
        reference = original_batch(envs, batches[0])
        original_rate = samples_per_s(lambda b: original_batch(envs, b), batches)
        original_f32_rate = samples_per_s(lambda b: original_batch_float32(envs, b), batches)
    finally:
        for env in envs:
            env.close()

    start = time.perf_counter()
    with FeatureCache(folder) as cache:
        open_s = time.perf_counter() - start
        if cache.get_batch(batches[0]).tobytes() != reference.tobytes():
            raise AssertionError("FeatureCache and the original's lookup read different bytes")
        cache_rate = samples_per_s(cache.get_batch, batches)

    return {
        "seed_way_samples_per_s": round(original_rate, 1),
        "feature_cache_samples_per_s": round(cache_rate, 1),
        "ratio": round(cache_rate / original_rate, 2),
        "seed_way_float32_samples_per_s": round(original_f32_rate, 1),
        "ratio_vs_seed_way_float32": round(cache_rate / original_f32_rate, 2),
        "memcpy_ceiling_samples_per_s": round(memcpy_ceiling(batches), 1),
        "feature_cache_open_s": round(open_s, 3),
        "keys": len(keys),
        "shards": SHARDS,
        "batch": BATCH,
        "batches": n_batches,
        "page_cache": "warm: each way timed after one untimed pass over the same batches",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}, lmdb {lmdb.__version__}",
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=30000,
                        help="keys in the temporary cache (default 30000, ~3.1 GB of disk)")
    parser.add_argument("--batches", type=int, default=300,
                        help="random batches of 32 read each way (default 300)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to put the temporary cache (default: the system temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.keys < BATCH:
        print(f"--keys must be at least {BATCH}", file=sys.stderr)
        return 2
    parent = args.dir or Path(tempfile.gettempdir())
    need = args.keys * BYTES_PER_KEY
    free = shutil.disk_usage(parent).free
    if free < need + (1 << 30):
        print(f"{parent} has {free / 1e9:.1f} GB free; {args.keys} keys need "
              f"{need / 1e9:.1f} GB plus 1 GB to spare: pass a smaller --keys "
              f"(at most ~{max(0, free - (1 << 30)) // BYTES_PER_KEY}) or another --dir",
              file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="lensjax-bench-data-", dir=parent))
    try:
        start = time.perf_counter()
        keys = build_cache(folder / "cache", args.keys, args.seed)
        built_s = time.perf_counter() - start
        result = run(folder / "cache", keys, args.batches, args.seed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.keys} keys in {SHARDS} shards (written in {built_s:.0f} s), "
          f"{args.batches} batches of {BATCH}, page cache warm for both: "
          f"original lookup {result['seed_way_samples_per_s']:.0f} samples/s "
          f"({result['seed_way_float32_samples_per_s']:.0f} with its float32 conversion), "
          f"FeatureCache.get_batch {result['feature_cache_samples_per_s']:.0f} samples/s: "
          f"{result['ratio']:.1f}x ({result['ratio_vs_seed_way_float32']:.1f}x with the float32 "
          f"conversion; a bare memcpy of the rows: "
          f"{result['memcpy_ceiling_samples_per_s']:.0f} samples/s)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
