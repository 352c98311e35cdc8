"""Reading and writing PyTorch state dicts as {key: numpy array}, dtype preserved.

`.pth`/`.bin` files are read only with `torch.load(weights_only=True)`: a pickle that would run
code is refused, never executed. `.safetensors` files are parsed directly, without torch.
bfloat16 tensors become `ml_dtypes.bfloat16` numpy arrays (numpy has no bfloat16 of its own).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

StateDict = dict[str, np.ndarray]


class BridgeError(Exception):
    """A weight file cannot be converted; the message says which file, key and why."""


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}

# Files looked for, in order, when a directory is given for a weights file.
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")


def resolve_weights_file(path: str | os.PathLike) -> Path:
    """A weights file, or the first of WEIGHT_FILE_NAMES inside a directory."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise BridgeError(f"{path}: no {' or '.join(WEIGHT_FILE_NAMES)} in this directory")
    if not path.exists():
        raise BridgeError(f"{path}: no such file")
    return path


def _safetensors_tensor(
    path: Path, key: str, info: Any, data: np.ndarray, base: int
) -> np.ndarray:
    """One header entry of a .safetensors file -> its array, every field checked."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(info, dict):
        raise BridgeError(f"{where}: its header entry is not an object")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in _SAFETENSORS_DTYPES:
        raise BridgeError(f"{where} has an unknown dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_size(n) for n in shape):
        raise BridgeError(f"{where}: \"shape\" must be a list of sizes, found {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets))
            and offsets[0] <= offsets[1]):
        raise BridgeError(f"{where}: \"data_offsets\" must be [start, end], found {offsets!r}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    start, end = base + offsets[0], base + offsets[1]
    if end > data.size:
        raise BridgeError(f"{where} ends at byte {end} but the file has {data.size} bytes "
                          "(truncated?)")
    if end - start != math.prod(shape) * dtype.itemsize:
        raise BridgeError(f"{where}: shape {tuple(shape)} of {info['dtype']} needs "
                          f"{math.prod(shape) * dtype.itemsize} bytes, its data_offsets span "
                          f"{end - start}")
    return np.asarray(data[start:end]).view(dtype).reshape(shape).copy()


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors(path: Path) -> StateDict:
    """Parse a .safetensors file (8-byte header length, JSON header, raw little-endian data).
    Anything malformed is a BridgeError naming the file and, where there is one, the tensor."""
    size = path.stat().st_size
    if size < 8:
        raise BridgeError(f"{path}: not a safetensors file ({size} bytes, shorter than its "
                          "8-byte header length)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > size - 8:
        raise BridgeError(f"{path}: not a safetensors file (header length {header_len} is "
                          f"more than the file's {size} bytes)")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (ValueError, RecursionError) as error:
        raise BridgeError(f"{path}: not a safetensors file (its header is not JSON: "
                          f"{error})") from error
    if not isinstance(header, dict):
        raise BridgeError(f"{path}: not a safetensors file (its header is a JSON "
                          f"{type(header).__name__}, not an object)")
    return {key: _safetensors_tensor(path, key, info, data, 8 + header_len)
            for key, info in header.items() if key != "__metadata__"}


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write a .safetensors file that transformers reads (`format: pt` metadata)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    arrays = {k: np.asarray(v, order="C") for k, v in tensors.items()}  # 0-d stays 0-d
    for key, array in arrays.items():
        header[key] = {
            "dtype": _SAFETENSORS_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for array in arrays.values():
            handle.write(array.tobytes())


def _torch():
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the install
        raise BridgeError(
            "reading or writing .pth files needs PyTorch: pip install 'lensjax[bridge]'"
        ) from error
    return torch


def tensor_to_numpy(tensor) -> np.ndarray:
    """A torch tensor -> numpy array of the same dtype (bfloat16 via ml_dtypes)."""
    torch = _torch()
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return tensor.numpy().copy()


def numpy_to_tensor(array: np.ndarray):
    """Inverse of `tensor_to_numpy`."""
    torch = _torch()
    array = np.asarray(array, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


# torch.save writes a zip archive; before PyTorch 1.6 it wrote a pickle stream (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_STARTS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def _check_torch_format(path: Path) -> None:
    """Refuse a file that is neither of torch.save's formats, before torch reads it."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start:
        raise BridgeError(f"{path}: the file is empty, not a PyTorch weights file")
    if not start.startswith((_ZIP_MAGIC, *_PICKLE_STARTS)):
        raise BridgeError(
            f"{path}: not a PyTorch weights file (neither a zip-format nor a legacy torch.save "
            f"file; it starts with {start!r})"
        )


def read_torch_file(path: Path) -> StateDict:
    """`torch.load(path, weights_only=True)` -> {key: numpy array}, with clear errors. A
    TorchScript archive (OpenAI's CLIP `.pt`) is read by `bridge.torchscript` instead, which
    never runs its code."""
    _check_torch_format(path)
    from bridge.torchscript import is_torchscript, read_torchscript

    if is_torchscript(path):
        try:
            return read_torchscript(path)
        except pickle.UnpicklingError as error:
            raise BridgeError(f"{path}: refused to load this TorchScript archive: {error} "
                              "(only module trees of tensors are read, never code)") from error
        except (KeyError, ValueError, StopIteration, zipfile.BadZipFile, EOFError) as error:
            raise BridgeError(f"{path}: not a readable TorchScript archive (truncated or "
                              f"corrupt?): {error!r}") from error
    torch = _torch()
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise BridgeError(
            f"{path}: refused to load: the file holds Python objects other than tensors, and "
            "lensjax loads .pth files only with torch.load(weights_only=True), never running "
            f"code from a pickle ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise BridgeError(
            f"{path}: not a readable PyTorch weights file (truncated or corrupt?): "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error
    if isinstance(loaded, Mapping) and len(loaded) == 1:
        (only,) = loaded.values()
        if isinstance(only, Mapping) and next(iter(loaded)) in ("state_dict", "model"):
            loaded = only
    if not isinstance(loaded, Mapping):
        raise BridgeError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise BridgeError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:10])}")
    return {key: tensor_to_numpy(value) for key, value in loaded.items()}


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Any supported weights file (or HF folder) -> {key: numpy array}, `module.` stripped."""
    path = resolve_weights_file(path)
    tensors = read_safetensors(path) if path.suffix == ".safetensors" else read_torch_file(path)
    if not tensors:
        raise BridgeError(f"{path}: the file holds no tensors")
    if all(key.startswith("module.") for key in tensors):
        tensors = {key.removeprefix("module."): value for key, value in tensors.items()}
    return tensors


def count_non_finite(array: np.ndarray) -> int:
    """How many NaN or infinite values a floating-point array holds (0 for other dtypes)."""
    if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def write_torch_file(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """`torch.save` of {key: tensor}, loadable with `load_state_dict(strict=True)`."""
    torch = _torch()
    torch.save({key: numpy_to_tensor(value) for key, value in tensors.items()}, path)
