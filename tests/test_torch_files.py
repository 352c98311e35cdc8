"""PyTorch's weight files read and written without torch (`bridge.torch_files`), checked
against torch itself: what lensjax writes, torch loads; what torch saves, lensjax reads."""

import collections
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import torch

from bridge.io import BridgeError, read_state_dict, write_torch_file

ARRAYS = {
    "float32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "bfloat16": np.array([[1.5, -2.25], [3e38, -0.0]], ml_dtypes.bfloat16),
    "float16": np.linspace(-1, 1, 5, dtype=np.float16),
    "float64": np.array([np.pi]),
    "int64 scalar": np.array(7, np.int64),
    "int32": np.arange(-3, 3, dtype=np.int32),
    "int8": np.array([-128, 127], np.int8),
    "uint8": np.array([0, 255], np.uint8),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 4), np.float32),
    "transposed view": np.arange(6, dtype=np.float32).reshape(2, 3).T,
    "big-endian": np.arange(4, dtype=">f4"),
}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


@pytest.mark.parametrize("mmap", [False, True])
def test_written_files_load_in_torch_with_every_dtype(tmp_path, mmap):
    path = tmp_path / "state.pth"
    write_torch_file(path, ARRAYS)
    loaded = torch.load(path, weights_only=True, mmap=mmap)
    assert list(loaded) == list(ARRAYS)
    for key, array in ARRAYS.items():
        back = _numpy(loaded[key])
        assert back.dtype == array.dtype.newbyteorder("="), key
        assert back.shape == array.shape, key
        np.testing.assert_array_equal(back, array, err_msg=key)


def test_written_file_loads_strictly_into_a_module(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4),
                                 torch.nn.BatchNorm1d(4))
    state = {key: _numpy(value).copy() for key, value in module.state_dict().items()}
    write_torch_file(tmp_path / "module.pth", state)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4),
                                torch.nn.BatchNorm1d(4))
    other.load_state_dict(torch.load(tmp_path / "module.pth", weights_only=True), strict=True)
    for key, value in module.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_torch_saved_files_read_as_torch_loads_them(tmp_path):
    parameter = torch.nn.Parameter(torch.randn(10))
    shared = torch.randn(4, 6)
    state = collections.OrderedDict(
        weight=parameter, view=parameter.data[3:7], transposed=shared.t(), row=shared[2],
        half=torch.randn(3, dtype=torch.float16), brain=torch.randn(2, 2).bfloat16(),
        count=torch.tensor(5), flags=torch.tensor([True, False]))
    path = tmp_path / "saved.pth"
    torch.save(state, path)
    ours = read_state_dict(path)
    assert list(ours) == list(state)
    for key, tensor in torch.load(path, weights_only=True).items():
        assert ours[key].dtype == _numpy(tensor).dtype, key
        np.testing.assert_array_equal(ours[key], _numpy(tensor.contiguous()), err_msg=key)


def test_a_checkpoint_dict_with_a_state_dict_inside_is_unwrapped(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "wrapped.pth")
    np.testing.assert_array_equal(read_state_dict(tmp_path / "wrapped.pth")["w"], np.ones(2))
    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(BridgeError, match="entries that are not tensors: epoch"):
        read_state_dict(tmp_path / "mixed.pth")


def test_legacy_format_is_read_with_torch(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(3.0), "b": torch.ones(2).bfloat16()}, path,
               _use_new_zipfile_serialization=False)
    state = read_state_dict(path)
    np.testing.assert_array_equal(state["w"], np.arange(3.0, dtype=np.float32))
    assert state["b"].dtype == ml_dtypes.bfloat16


def test_a_pickled_global_other_than_tensors_is_refused_and_named(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"w": torch.ones(2), "step": np.int64(3)}, path)
    with pytest.raises(BridgeError, match=r"refused to load this file: global numpy\..* is not "
                                          r"allowed .*never runs code"):
        read_state_dict(path)


def test_reading_and_writing_need_no_torch(tmp_path):
    """With torch unimportable, a state dict written and read back is unchanged."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        import numpy as np
        from bridge.io import read_state_dict, write_torch_file
        arrays = {{"a": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(4)}}
        write_torch_file({str(tmp_path / "no_torch.pth")!r}, arrays)
        back = read_state_dict({str(tmp_path / "no_torch.pth")!r})
        assert all(np.array_equal(back[k], v) and back[k].dtype == v.dtype
                   for k, v in arrays.items()), back
        assert "torch" not in {{m.split(".")[0] for m, v in sys.modules.items() if v}}
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    np.testing.assert_array_equal(
        torch.load(tmp_path / "no_torch.pth", weights_only=True)["a"].numpy(),
        np.arange(6, dtype=np.float32).reshape(2, 3))
