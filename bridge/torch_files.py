"""PyTorch's weight files read and written without torch, and without running their code.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle whose tensors are calls to
`torch._utils._rebuild_tensor_v2` on storages named by persistent ids, and each storage's raw
bytes in `<name>/data/<key>`. `torch.jit.save` (OpenAI's CLIP `ViT-B-32.pt`) writes the same
layout plus the module's code. Both are read here by a restricted unpickler that knows exactly
what a tree of tensors needs: `_rebuild_tensor_v2` and `_rebuild_parameter`, the typed
storages, `collections.OrderedDict`, and (in TorchScript archives only) the scripted module
classes `__torch__.*` as inert attribute holders. Any other global is refused, so no code
from a file is ever executed, as with `torch.load(weights_only=True)`.

`write_torch_zip` writes what `torch.save(state_dict)` writes: the same records, each
storage's bytes aligned to 64 as torch aligns them, so `torch.load(weights_only=True)` (and
`mmap=True`) and the original's `load_state_dict(strict=True)` read it. Only the legacy
pre-1.6 format (a bare pickle stream) still needs torch to read.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "DoubleStorage": np.float64,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_STORAGE_NAMES = {np.dtype(dtype): name for name, dtype in _STORAGES.items()}
_ALIGNMENT = 64  # torch.save aligns each storage's bytes in the archive (for mmap)
_PADDING_ID = 0x4246  # the zip extra-field id torch uses for that padding ("FB")


class _Scripted:
    """A scripted module or object: only its attributes are kept."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


class _StorageType:
    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *_):
    """`torch._utils._rebuild_tensor_v2` on a flat numpy storage."""
    if not size:
        return np.array(storage[offset])  # a 0-d array
    item = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)).copy()


def _rebuild_parameter(data: np.ndarray, *_):
    """`torch._utils._rebuild_parameter`: an `nn.Parameter` is its data."""
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str, scripted: bool):
        super().__init__(handle)
        self.archive, self.prefix, self.scripted = archive, prefix, scripted
        self.byteorder = ">" if _read_record(archive, prefix, "byteorder") == b"big" else "<"

    def find_class(self, module: str, name: str):
        if self.scripted and module.startswith("__torch__"):
            return _Scripted
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        raw = self.archive.read(f"{self.prefix}data/{key}")
        stored = storage_type.dtype.newbyteorder(self.byteorder)
        return np.frombuffer(raw, stored, count=numel).astype(storage_type.dtype, copy=False)


def _read_record(archive: zipfile.ZipFile, prefix: str, name: str) -> bytes | None:
    try:
        return archive.read(prefix + name)
    except KeyError:
        return None


def _load_archive(path: Path, scripted: bool) -> Any:
    with zipfile.ZipFile(path) as archive:
        data = next(name for name in archive.namelist() if name.endswith("data.pkl"))
        prefix = data[: -len("data.pkl")]
        with archive.open(data) as handle:
            return _Unpickler(handle, archive, prefix, scripted).load()


def is_torchscript(path: Path) -> bool:
    """True for a zip archive with TorchScript code in it (`torch.jit.save`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl")
                   for name in archive.namelist())


def read_torch_zip(path: Path) -> Any:
    """What `torch.load(path, weights_only=True)` returns for a zip-format `torch.save` file,
    tensors as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`). Raises
    `pickle.UnpicklingError` for any global but the tensor machinery."""
    return _load_archive(path, scripted=False)


def read_torchscript(path: Path) -> dict[str, np.ndarray]:
    """{dotted attribute path: array} of every tensor in the archive's module tree."""
    root = _load_archive(path, scripted=True)
    tensors: dict[str, np.ndarray] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, _Scripted):
            node = node.__dict__.get("_state", {})
        if isinstance(node, np.ndarray):
            tensors[path] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))

    walk(root, "")
    return tensors


class _Global:
    """A torch global named in a pickle (written as GLOBAL, never imported)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's REDUCE wants a callable; this one is never called
        raise TypeError(f"{self.module}.{self.name} is only named in a pickle")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {dtype: _Global("torch", name) for dtype, name in _STORAGE_NAMES.items()}


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Tensor:
    """A C-contiguous array pickled as torch pickles a tensor on its own storage."""

    def __init__(self, key: str, array: np.ndarray):
        self.storage = _Storage(key, array)

    def __reduce__(self):
        shape = self.storage.array.shape
        strides = tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))
        return (_REBUILD_TENSOR, (self.storage, 0, shape, strides, False,
                                  collections.OrderedDict()))


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    dispatch = pickle._Pickler.dispatch.copy()

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            array = obj.array
            return ("storage", _STORAGE_GLOBALS[array.dtype], obj.key, "cpu", array.size)
        return None

    def _save_global(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global


def _padded(info: zipfile.ZipInfo, offset: int) -> zipfile.ZipInfo:
    """`info` with an extra field that puts its data at a multiple of `_ALIGNMENT` when its
    local header starts at `offset` (30 bytes + name + extra come before the data)."""
    start = offset + 30 + len(info.filename.encode()) + 4
    info.extra = struct.pack("<HH", _PADDING_ID, -start % _ALIGNMENT) + b"Z" * (-start % _ALIGNMENT)
    return info


def write_torch_zip(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write {key: array} as `torch.save` writes a state dict (zip format, little-endian).

    Arrays of float16/32/64, bfloat16 (`ml_dtypes`), int8/16/32/64, uint8 and bool; each
    becomes a tensor on a storage of its own."""
    arrays = {}
    for key, value in tensors.items():
        array = np.asarray(value, order="C")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if array.dtype not in _STORAGE_GLOBALS:
            raise ValueError(f"{key!r}: torch has no storage for dtype {array.dtype}")
        arrays[key] = array
    state = collections.OrderedDict(
        (key, _Tensor(str(index), array)) for index, (key, array) in enumerate(arrays.items()))
    pickled = io.BytesIO()
    _Pickler(pickled, protocol=2).dump(state)
    name = "archive"
    with open(path, "wb") as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
        def record(suffix: str, data: bytes) -> None:
            info = zipfile.ZipInfo(f"{name}/{suffix}", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(_padded(info, handle.tell()), data)

        record("data.pkl", pickled.getvalue())
        record(".format_version", b"1")
        record(".storage_alignment", str(_ALIGNMENT).encode())
        record("byteorder", b"little")
        for index, array in enumerate(arrays.values()):
            record(f"data/{index}", array.tobytes())
        record("version", b"3\n")
