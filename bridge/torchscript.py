"""The tensors of a TorchScript archive (OpenAI's `ViT-B-32.pt`), read without running it.

`torch.jit.load` would compile and run the archive's code; `torch.load(weights_only=True)`
refuses TorchScript archives. So the archive's `data.pkl` is read by a restricted unpickler
that knows exactly what a module tree of tensors needs: the scripted module classes
(`__torch__.*`) become inert attribute holders, `torch._utils._rebuild_tensor_v2` and the
typed storages are rebuilt here from the raw bytes in `data/`, and any other global is
refused. No code from the file is ever executed, and torch is not needed.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
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


class _Unpickler(pickle.Unpickler):
    def __init__(self, handle, archive: zipfile.ZipFile, prefix: str):
        super().__init__(handle)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__"):
            return _Scripted
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
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
        return np.frombuffer(raw, storage_type.dtype, count=numel)


def is_torchscript(path: Path) -> bool:
    """True for a zip archive with TorchScript code in it (`torch.jit.save`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl")
                   for name in archive.namelist())


def read_torchscript(path: Path) -> dict[str, np.ndarray]:
    """{dotted attribute path: array} of every tensor in the archive's module tree."""
    with zipfile.ZipFile(path) as archive:
        data = next(name for name in archive.namelist() if name.endswith("data.pkl"))
        prefix = data[: -len("data.pkl")]
        with archive.open(data) as handle:
            root = _Unpickler(handle, archive, prefix).load()
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
