"""LensToWords' LMDB feature cache: read as it is, written identically.

The format is the original's own. A cache is a set of LMDB environments ("shards"), each a
folder holding `data.mdb` and `lock.mdb`:

```
NAME/
  lmdb-part-1/ data.mdb lock.mdb     key   = image file name, utf-8 (b"1000092795.jpg")
  ...                                value = raw little-endian float16 bytes of one
  lmdb-part-6/                               (64, 768) array: 98,304 bytes, no header
  lensjax_cache.json                 only in caches lensjax wrote: format, shape, dtype, shards
```

    cache = FeatureCache("features/flickr")        # folder of shards (or one shard folder)
    cache = FeatureCache(["lmdb-part-1", ...])      # or the shards, in lookup order
    x = cache["1000092795.jpg"]                     # float16 (64, 768)
    xs = cache.get_batch(keys)                      # float16 (N, 64, 768)

    with FeatureCache.create("features/mine", shards=6) as writer:   # new, or resumed
        writer.put("1000092795.jpg", features)      # (64, 768), any float dtype
        writer.commit()                             # durable; also done on a clean exit

The original looked each key up by trying every shard in order, one read transaction per
shard per key. Opening a `FeatureCache` instead builds an index key -> shard once (keys only,
one read transaction per shard), so a lookup goes straight to its shard and `get_batch` uses
one read transaction per shard involved. A key stored in two shards resolves to the first
shard in order, as the original's in-order scan did.

Token shape: (64, 768) unless the cache's `lensjax_cache.json` says otherwise (tiny test models
write (64, 48)); an explicit `shape=` overrides both.

Shards are opened read-only without LMDB's reader lock (`lock=False`), as the original opened
them; this also works on read-only media. A cache that another process is still writing can be
read (each read transaction sees the commits made before it began), but LMDB cannot then
protect long-lived readers from page reuse: train from a finished cache. LMDB allows one
environment per shard and process, so all the caches and writers of a process share them
(several `FeatureCache`s on the same shards are fine; writing shards this process is reading
is refused).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb
import numpy as np

from lensjax.files import write_text_atomic

PathLike = str | os.PathLike

FORMAT = "lensjax-feature-cache"
METADATA_FILE = "lensjax_cache.json"
SHARD_PREFIX = "lmdb-part-"
DEFAULT_SHAPE = (64, 768)
DEFAULT_SHARDS = 6
# Per shard. LMDB reserves address space, not disk: on Linux the file grows only as data is
# written. 64 GiB per shard holds ~680k (64, 768) entries.
DEFAULT_MAP_SIZE = 64 << 30
MAX_READERS = 1024
STORED_DTYPE = np.dtype("<f2")


class FeatureCacheError(ValueError):
    """A feature cache is incomplete, damaged, or not in the expected format."""


# --- shared helpers ---------------------------------------------------------------------------


def _natural_key(name: str) -> list[int | str]:
    """Sort key that puts `lmdb-part-2` before `lmdb-part-10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_shard(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def _key_bytes(key: str | bytes) -> bytes:
    if isinstance(key, str):
        return key.encode("utf-8", "surrogateescape")  # round-trips keys() of non-utf-8 keys
    if isinstance(key, bytes):
        return key
    raise TypeError(f"feature cache keys are image file names (str or bytes), got {key!r}")


def _nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * STORED_DTYPE.itemsize


def shard_for(key: str | bytes, shards: int) -> int:
    """Index of the shard a new `key` is written to: crc32(key) mod `shards`.

    Stable across processes, Python versions and resumes (unlike `hash()`), and balanced by
    count in expectation.
    """
    return zlib.crc32(_key_bytes(key)) % shards


def shard_names(shards: int) -> list[str]:
    """The original's shard folder names: lmdb-part-1 .. lmdb-part-N."""
    return [f"{SHARD_PREFIX}{index}" for index in range(1, shards + 1)]


def read_metadata(folder: Path) -> dict[str, Any] | None:
    """`folder/lensjax_cache.json`, validated; None when there is none (an original cache)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FeatureCacheError(f"{path}: not readable as JSON ({error})") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise FeatureCacheError(f"{path}: not a lensjax feature cache description")
    shape, shards = document.get("shape"), document.get("shards")
    if not (isinstance(shape, list) and shape and all(isinstance(n, int) and n > 0
                                                      for n in shape)):
        raise FeatureCacheError(f"{path}: 'shape' must be a list of positive ints, got {shape!r}")
    if document.get("dtype") != "float16":
        raise FeatureCacheError(f"{path}: 'dtype' must be 'float16', got "
                                f"{document.get('dtype')!r}")
    if not (isinstance(shards, int) and shards > 0):
        raise FeatureCacheError(f"{path}: 'shards' must be a positive int, got {shards!r}")
    return document


def _write_metadata(folder: Path, shape: tuple[int, ...], shards: int) -> None:
    """Write `lensjax_cache.json` atomically: a temporary file, fsynced, renamed into place."""
    document = {"format": FORMAT, "shape": list(shape), "dtype": "float16", "shards": shards}
    write_text_atomic(folder / METADATA_FILE, json.dumps(document, indent=2))


def _check_size(env: lmdb.Environment, shard: Path) -> None:
    """Refuse a truncated data.mdb (reading past its end would crash the process)."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    found = (shard / "data.mdb").stat().st_size
    if found < needed:
        raise FeatureCacheError(
            f"{shard}: data.mdb is truncated ({found} bytes, its header needs {needed})"
        )


def _index_shard(env: lmdb.Environment, shard: Path) -> list[bytes]:
    """All keys of one shard, in LMDB's order, read in one transaction (keys only)."""
    try:
        with env.begin() as txn:
            return list(txn.cursor().iternext(keys=True, values=False))
    except lmdb.Error as error:
        raise FeatureCacheError(f"{shard}: damaged LMDB shard ({error})") from error


@dataclasses.dataclass
class _Shared:
    env: lmdb.Environment
    writable: bool
    users: int = 0


# LMDB (and py-lmdb) refuse to open one environment twice in a process, so every FeatureCache
# and writer of a process shares one environment per shard folder, counted by its users.
_OPEN: dict[str, _Shared] = {}
_OPEN_LOCK = threading.RLock()  # re-entrant: a FeatureCache.__del__ may run inside _acquire


def _acquire(shard: Path, *, write: bool = False,
             map_size: int = 0) -> lmdb.Environment:
    """The process's environment for `shard`: opened now, or shared with its other users.

    Readers share any open environment (a writer's too); a writer needs its own.
    """
    key = os.path.realpath(shard)
    with _OPEN_LOCK:
        shared = _OPEN.get(key)
        if shared is None:
            env = _open_writer(shard, map_size) if write else _open_reader(shard)
            shared = _OPEN[key] = _Shared(env, write)
        elif write:
            user = "a writer" if shared.writable else "a FeatureCache"
            raise FeatureCacheError(
                f"{shard} is already open in this process by {user}; close it before writing"
            )
        shared.users += 1
        return shared.env


def _release(shard: Path) -> None:
    key = os.path.realpath(shard)
    with _OPEN_LOCK:
        shared = _OPEN.get(key)
        if shared is None:
            return
        shared.users -= 1
        if shared.users == 0:
            del _OPEN[key]
            shared.env.close()


# --- reading ----------------------------------------------------------------------------------


def _find_shards(path: Path) -> tuple[list[Path], Path]:
    """(shards in lookup order, folder that may hold the metadata) for a folder argument."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such feature cache folder")
    if not path.is_dir():
        raise FeatureCacheError(
            f"{path} is a file; give the folder holding the lmdb-part-* shards, or one shard"
        )
    if _is_shard(path):
        return [path], path.parent
    shards = sorted((p for p in path.iterdir() if p.is_dir() and _is_shard(p)),
                    key=lambda p: _natural_key(p.name))
    if not shards:
        raise FeatureCacheError(
            f"{path} holds no LMDB shards: no data.mdb in it or in any folder inside it"
        )
    return shards, path


def _check_listed_shards(paths: Sequence[PathLike]) -> tuple[list[Path], Path | None]:
    shards = [Path(p) for p in paths]
    if not shards:
        raise FeatureCacheError("no shards given")
    for shard in shards:
        if not shard.exists():
            raise FileNotFoundError(f"{shard}: no such LMDB shard folder")
        if not _is_shard(shard):
            raise FeatureCacheError(f"{shard} is not an LMDB shard (no data.mdb in it)")
    parents = list(dict.fromkeys(shard.absolute().parent for shard in shards))
    if len(parents) == 1:
        return shards, parents[0]
    # Shards of several caches (--features A B): their descriptions must agree on the shape.
    described = [(p, read_metadata(p)) for p in parents]
    described = [(p, m) for p, m in described if m is not None]
    shapes = {tuple(m["shape"]) for _, m in described}
    if len(shapes) > 1:
        raise FeatureCacheError("the caches hold features of different shapes: " + "; ".join(
            f"{p}: {tuple(m['shape'])}" for p, m in described))
    return shards, described[0][0] if described else None


def _open_env(shard: Path, failure: str, **options: Any) -> lmdb.Environment:
    """lmdb.open with `options`, size-checked; FeatureCacheError(`failure`) if it fails."""
    try:
        env = lmdb.open(str(shard), subdir=True, readahead=False, max_readers=MAX_READERS,
                        **options)
    except lmdb.Error as error:
        raise FeatureCacheError(f"{shard}: {failure} ({error})") from error
    try:
        _check_size(env, shard)
    except BaseException:
        env.close()
        raise
    return env


def _open_reader(shard: Path) -> lmdb.Environment:
    return _open_env(shard, "not a readable LMDB shard", readonly=True, lock=False)


class FeatureCache:
    """Read-only view of LensToWords-format feature shards, indexed once at opening.

    `FeatureCache(path)`: `path` is a folder holding shard folders (in natural order:
    lmdb-part-2 before lmdb-part-10), a single shard folder, or a list of shard folders (in the
    given order). `shape` overrides the token shape (default: the cache's `lensjax_cache.json`,
    else (64, 768)).
    """

    def __init__(self, path: PathLike | Sequence[PathLike], *,
                 shape: Sequence[int] | None = None):
        whole_cache = isinstance(path, str | os.PathLike)
        if whole_cache:
            self.root = Path(path)
            self.shards, meta_folder = _find_shards(self.root)
            whole_cache = meta_folder == self.root
        else:
            self.shards, meta_folder = _check_listed_shards(path)
            self.root = meta_folder or self.shards[0]
        metadata = read_metadata(meta_folder) if meta_folder is not None else None
        if whole_cache and metadata is not None and len(self.shards) != metadata["shards"]:
            raise FeatureCacheError(
                f"{self.root}: incomplete cache, {METADATA_FILE} lists {metadata['shards']} "
                f"shards but {len(self.shards)} were found"
            )
        if shape is None:
            shape = metadata["shape"] if metadata is not None else DEFAULT_SHAPE
        self.shape = tuple(int(n) for n in shape)
        self._nbytes = _nbytes(self.shape)
        self._envs: list[lmdb.Environment] = []
        self._index: dict[bytes, int] = {}
        try:
            for shard in self.shards:
                self._envs.append(_acquire(shard))
            self._index = self._build_index()
        except BaseException:
            self.close()
            raise

    def _build_index(self) -> dict[bytes, int]:
        """key -> shard index; a key in several shards keeps the first (the original's scan)."""
        index: dict[bytes, int] = {}
        for number, (env, shard) in enumerate(zip(self._envs, self.shards, strict=True)):
            for key in _index_shard(env, shard):
                index.setdefault(key, number)
        return index

    # -- mapping-like access

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str | bytes) -> bool:
        return _key_bytes(key) in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        """All keys: shards in order, each in LMDB's (byte-sorted) order."""
        return [key.decode("utf-8", "surrogateescape") for key in self._index]

    def shard_of(self, key: str | bytes) -> Path:
        """The shard folder `key` is read from."""
        return self.shards[self._lookup(_key_bytes(key))]

    def __getitem__(self, key: str | bytes) -> np.ndarray:
        """float16 `shape` array (a copy) of `key`."""
        return self.get_batch([key])[0]

    def get_batch(self, keys: Iterable[str | bytes]) -> np.ndarray:
        """float16 (N, *shape) array of `keys`, in their order; one read transaction per shard."""
        wanted = [_key_bytes(key) for key in keys]
        rows_of: dict[int, list[int]] = {}
        for row, key in enumerate(wanted):
            rows_of.setdefault(self._lookup(key), []).append(row)
        out = np.empty((len(wanted), *self.shape), STORED_DTYPE)
        if not wanted:
            return out.astype(np.float16)
        raw = memoryview(out).cast("B")
        for number, rows in rows_of.items():
            self._read_rows(number, [wanted[row] for row in rows], raw, rows)
        return out if out.dtype.isnative else out.astype(np.float16)

    def _lookup(self, key: bytes) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(
                f"{key.decode('utf-8', 'replace')!r} is not in the feature cache at {self.root} "
                f"({len(self._index)} keys in {len(self.shards)} shards)"
            ) from None

    def _read_rows(self, number: int, keys: list[bytes], out: memoryview,
                   rows: list[int]) -> None:
        """Copy the values of `keys` (all in shard `number`) to `rows` of the bytes `out`,
        straight from LMDB's memory map, in one read transaction."""
        shard, size = self.shards[number], self._nbytes
        env = self._env(number)
        try:
            with env.begin(buffers=True) as txn:
                for key, row in zip(keys, rows, strict=True):
                    value = txn.get(key)
                    if value is None:  # the shard changed since the index was built
                        raise FeatureCacheError(f"{shard}: key {key!r} disappeared from the shard")
                    if len(value) != size:
                        raise FeatureCacheError(
                            f"{shard}: value of key {key.decode('utf-8', 'replace')!r} has "
                            f"{len(value)} bytes, expected {size} (float16 {self.shape})"
                        )
                    out[row * size : (row + 1) * size] = value
        except lmdb.Error as error:
            raise FeatureCacheError(f"{shard}: damaged LMDB shard ({error})") from error

    def _env(self, number: int) -> lmdb.Environment:
        if not self._envs:
            raise ValueError(f"the feature cache at {self.root} is closed")
        return self._envs[number]

    # -- lifetime

    def close(self) -> None:
        """Close every shard (once no other cache of this process uses it); idempotent."""
        for shard in self.shards[: len(self._envs)]:
            _release(shard)
        self._envs = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.root)!r}: {len(self._index)} keys, "
                f"{len(self.shards)} shards, float16 {self.shape})")

    @staticmethod
    def create(path: PathLike, shards: int = DEFAULT_SHARDS, *,
               shape: Sequence[int] = DEFAULT_SHAPE,
               map_size: int = DEFAULT_MAP_SIZE) -> FeatureCacheWriter:
        """Open a cache folder for writing: a new one, or an existing one resumed."""
        return FeatureCacheWriter(path, shards, shape=shape, map_size=map_size)


# --- writing ----------------------------------------------------------------------------------


def _check_resumable(folder: Path, shards: int, shape: tuple[int, ...]) -> bool:
    """Whether `folder` holds a cache to resume (True) or is new/empty (False); refuses a
    cache of another shard count or shape, and a folder that holds something else."""
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise FeatureCacheError(f"{folder} is a file, not a feature cache folder")
    metadata = read_metadata(folder)
    found = sorted((p.name for p in folder.iterdir() if p.is_dir() and _is_shard(p)),
                   key=_natural_key)
    if metadata is None and not found:
        if any(folder.iterdir()):
            raise FeatureCacheError(
                f"{folder} exists and is not a feature cache (no {METADATA_FILE}, no "
                "lmdb-part-* shards); choose an empty or new folder"
            )
        return False
    if metadata is not None:
        had_shards, had_shape = metadata["shards"], tuple(metadata["shape"])
    else:  # an original cache: its shards, LensToWords' token shape
        had_shards, had_shape = len(found), DEFAULT_SHAPE
        if found != shard_names(had_shards):
            raise FeatureCacheError(
                f"{folder}: shards {found} are not named {SHARD_PREFIX}1..{had_shards}; "
                "cannot resume writing it"
            )
    if had_shards != shards or had_shape != shape:
        raise FeatureCacheError(
            f"{folder} holds a cache of {had_shards} shards of float16 {had_shape}; cannot "
            f"resume it as {shards} shards of {shape} (pass shards={had_shards}, "
            f"shape={had_shape}, or choose another folder)"
        )
    return True


def _open_writer(shard: Path, map_size: int) -> lmdb.Environment:
    return _open_env(shard, "cannot open the LMDB shard for writing", map_size=map_size,
                     meminit=False)


class FeatureCacheWriter:
    """Writes a cache in the original's format; made by `FeatureCache.create`.

    A new key goes to shard `crc32(key) % shards` (stable across processes and resumes); a key
    already in the cache is overwritten where it is, so a key is never stored twice. `put`
    adds to one pending write transaction per shard, `commit` commits them all (LMDB commits
    are atomic and synced: a killed process loses only what was put since the last commit).
    Leaving the `with` block commits, or aborts if an exception is propagating. Use a writer
    from one thread.
    """

    def __init__(self, path: PathLike, shards: int = DEFAULT_SHARDS, *,
                 shape: Sequence[int] = DEFAULT_SHAPE, map_size: int = DEFAULT_MAP_SIZE):
        if not (isinstance(shards, int) and shards > 0):
            raise ValueError(f"shards must be a positive int, got {shards!r}")
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.shard_count = shards
        self._nbytes = _nbytes(self.shape)
        resuming = _check_resumable(self.path, shards, self.shape)
        self.path.mkdir(parents=True, exist_ok=True)
        if not resuming:  # first, so that readers know how many shards to expect
            _write_metadata(self.path, self.shape, shards)
        self.shards = [self.path / name for name in shard_names(shards)]
        self._envs: list[lmdb.Environment] = []
        self._txns: dict[int, lmdb.Transaction] = {}
        self._pending: dict[bytes, int] = {}
        self._stored: dict[bytes, int] = {}
        try:
            for number, shard in enumerate(self.shards):
                shard.mkdir(exist_ok=True)
                self._envs.append(_acquire(shard, write=True, map_size=map_size))
                if resuming:
                    for key in _index_shard(self._envs[-1], shard):
                        self._stored.setdefault(key, number)
            if not (self.path / METADATA_FILE).exists():  # resuming an original cache
                _write_metadata(self.path, self.shape, shards)
        except BaseException:
            self.close()
            raise

    def __contains__(self, key: str | bytes) -> bool:
        """True for keys already committed and keys put since the last commit."""
        key = _key_bytes(key)
        return key in self._pending or key in self._stored

    def __len__(self) -> int:
        return len(self._stored) + sum(1 for key in self._pending if key not in self._stored)

    def put(self, key: str | bytes, array: Any) -> None:
        """Store `array` (`shape`, any float dtype) as little-endian float16 under `key`."""
        raw = _key_bytes(key)
        array = np.asarray(array)
        if array.shape != self.shape:
            raise ValueError(
                f"features for {raw.decode('utf-8', 'replace')!r} have shape {array.shape}, "
                f"expected {self.shape}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"features for {raw.decode('utf-8', 'replace')!r} have dtype "
                             f"{array.dtype}, expected a float dtype")
        number = self._stored.get(raw, self._pending.get(raw, shard_for(raw, self.shard_count)))
        value = np.ascontiguousarray(array, dtype=STORED_DTYPE).tobytes()
        try:
            self._txn(number).put(raw, value)
        except lmdb.MapFullError as error:
            self.abort()
            raise FeatureCacheError(
                f"{self.shards[number]} is full (map_size too small); the writes since the last "
                "commit were dropped: reopen with a larger map_size and put them again"
            ) from error
        self._pending[raw] = number

    def _txn(self, number: int) -> lmdb.Transaction:
        if not self._envs:
            raise ValueError(f"the feature cache writer for {self.path} is closed")
        if number not in self._txns:
            self._txns[number] = self._envs[number].begin(write=True)
        return self._txns[number]

    def commit(self) -> None:
        """Commit the pending writes of every shard (durable once this returns)."""
        for number in sorted(self._txns):
            try:
                self._txns.pop(number).commit()
            except lmdb.Error as error:
                self.abort()
                raise FeatureCacheError(
                    f"{self.shards[number]}: commit failed ({error}); the writes since the last "
                    "commit to this shard and to the shards after it were dropped"
                ) from error
            done = [key for key, shard in self._pending.items() if shard == number]
            for key in done:
                self._stored[key] = self._pending.pop(key)

    def abort(self) -> None:
        """Drop every write since the last commit."""
        for txn in self._txns.values():
            txn.abort()
        self._txns.clear()
        self._pending.clear()

    def close(self) -> None:
        """Abort what is uncommitted and close the shards; idempotent."""
        self.abort()
        for shard in self.shards[: len(self._envs)]:
            _release(shard)
        self._envs = []

    def __enter__(self) -> FeatureCacheWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.close()

    def __repr__(self) -> str:
        return (f"FeatureCacheWriter({str(self.path)!r}: {len(self)} keys, "
                f"{self.shard_count} shards, float16 {self.shape})")


__all__ = [
    "DEFAULT_SHAPE",
    "FeatureCache",
    "FeatureCacheError",
    "FeatureCacheWriter",
    "read_metadata",
    "shard_for",
    "shard_names",
]
