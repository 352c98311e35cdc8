"""Reading and writing PyTorch state dicts as {key: numpy array}, dtype preserved.

`.pth`/`.bin` files are read and written without torch (`bridge.torch_files`): only tensors
are read, as `torch.load(weights_only=True)` reads them, and a pickle that would run code is
refused, never executed. `.safetensors` files are parsed directly. bfloat16 tensors become
`ml_dtypes.bfloat16` numpy arrays (numpy has no bfloat16 of its own).
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


def _legacy_torch_file(path: Path) -> Any:
    """`torch.load(weights_only=True)` of a pre-1.6 `torch.save` file (a bare pickle stream),
    the one format read with torch; tensors become numpy arrays."""
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the install
        raise BridgeError(f"{path}: a legacy (pre-PyTorch 1.6) torch.save file; reading it needs "
                          "PyTorch (pip install torch), or re-save it with a newer torch"
                          ) from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(str(error).splitlines()[0]) from error

    def to_numpy(value):
        if isinstance(value, Mapping):
            return {key: to_numpy(item) for key, item in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        value = value.detach().contiguous()
        if value.dtype == torch.bfloat16:
            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return value.numpy().copy()

    return to_numpy(loaded)


# torch.save writes a zip archive; before PyTorch 1.6 it wrote a pickle stream (protocol 2+).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_STARTS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def _check_torch_format(path: Path) -> bytes:
    """Refuse a file that is neither of torch.save's formats; its first bytes."""
    with open(path, "rb") as handle:
        start = handle.read(4)
    if not start:
        raise BridgeError(f"{path}: the file is empty, not a PyTorch weights file")
    if not start.startswith((_ZIP_MAGIC, *_PICKLE_STARTS)):
        raise BridgeError(
            f"{path}: not a PyTorch weights file (neither a zip-format nor a legacy torch.save "
            f"file; it starts with {start!r})"
        )
    return start


def read_torch_file(path: Path) -> StateDict:
    """A `torch.save` state dict (or a TorchScript archive's tensors, OpenAI's CLIP `.pt`) ->
    {key: numpy array}, dtype preserved, with clear errors. Read without torch and without
    running code from the file (`bridge.torch_files`); only the legacy pre-1.6 format needs
    torch, and is read with `torch.load(weights_only=True)`."""
    start = _check_torch_format(path)
    from bridge.torch_files import is_torchscript, read_torch_zip, read_torchscript

    scripted = start.startswith(_ZIP_MAGIC) and is_torchscript(path)
    try:
        if scripted:
            return read_torchscript(path)
        loaded = read_torch_zip(path) if start.startswith(_ZIP_MAGIC) else _legacy_torch_file(path)
    except pickle.UnpicklingError as error:
        what = "TorchScript archive" if scripted else "file"
        raise BridgeError(
            f"{path}: refused to load this {what}: {error} (lensjax reads only tensors from "
            "PyTorch files, as torch.load(weights_only=True) does, and never runs code from "
            "a pickle)"
        ) from error
    except (KeyError, ValueError, TypeError, StopIteration, zipfile.BadZipFile, EOFError,
            OSError, RuntimeError) as error:
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
    not_tensors = [str(k) for k, v in loaded.items() if not isinstance(v, np.ndarray)]
    if not_tensors:
        raise BridgeError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:10])}")
    return dict(loaded)


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
    """{key: array} as `torch.save` writes a state dict (without torch), loadable with
    `torch.load(weights_only=True)` and `load_state_dict(strict=True)`."""
    from bridge.torch_files import write_torch_zip

    write_torch_zip(path, tensors)
