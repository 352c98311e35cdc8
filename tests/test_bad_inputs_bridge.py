"""Bad input to `python -m bridge` (inspect, import, export), checked against the CLI contract
of `cli_harness`: exit status 2, one `error:` line naming the input, no traceback, nothing
lost, changed or left half-written.

Each case runs in a folder holding fresh copies of the tiny model's released files
(`best_perciever.pth`, `best_gpt2.pth`, `best_cross_attention.pth`, `gpt2/`) and of a lensjax
checkpoint made of them (`ckpt/`); its `setup` damages copies or adds files there.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_harness import Case, assert_refused, case_ids, check_case, in_process_runner, run_cli

from bridge.__main__ import main as bridge_cli
from conftest import import_files
from lensjax.checkpoint import load_checkpoint, save_checkpoint

# An exception raised on a background thread (Orbax's "Event loop is closed") fails the case.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

RELEASED = ("perceiver", "gpt2_blocks", "cross_attention", "gpt2")
IMPORT = ["import", "--perceiver", "{tmp}/best_perciever.pth",
          "--gpt2-blocks", "{tmp}/best_gpt2.pth",
          "--cross-attention", "{tmp}/best_cross_attention.pth", "--preset", "tiny"]


@pytest.fixture(scope="module")
def sources(reference, tmp_path_factory) -> Path:
    """A folder with the tiny released files and `ckpt/`, a lensjax checkpoint of them."""
    folder = tmp_path_factory.mktemp("bridge-inputs")
    files = reference("tiny").files
    for component in RELEASED:
        copy = shutil.copytree if files[component].is_dir() else shutil.copy
        copy(files[component], folder / files[component].name)
    import_files(files, "tiny", encoder=None, encoder_head=None).save(folder / "ckpt")
    return folder


# -- setups


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    return setup


def _safetensors(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def _tensor(**fields: Any) -> dict[str, Any]:
    return {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **fields}}


def _nan_perceiver(tmp: Path) -> None:
    state = torch.load(tmp / "best_perciever.pth", weights_only=True)
    state["latents"][0, 0] = float("nan")
    torch.save(state, tmp / "nan_perciever.pth")


def _edit_metadata(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    """Rewrite ckpt/lensjax.json after `change` (which edits the document in place)."""
    def setup(tmp: Path) -> None:
        meta = tmp / "ckpt" / "lensjax.json"
        document = json.loads(meta.read_text())
        change(document)
        meta.write_text(json.dumps(document))
    return setup


def _largest_data_file(checkpoint: Path) -> Path:
    return max((checkpoint / "params").rglob("d/*"), key=lambda p: p.stat().st_size)


def flip_4kib(checkpoint: Path) -> None:
    """Invert 4 KiB in the middle of the checkpoint's largest data file."""
    path = _largest_data_file(checkpoint)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    path.write_bytes(bytes(data))


def flipped_noise_checkpoint(tmp: Path) -> None:
    """noisy/: ckpt/ with standard-normal weights, which Orbax stores uncompressed (so flipped
    bytes still decode and only a checksum notices them), then 4 KiB of it flipped."""
    params, metadata = load_checkpoint(tmp / "ckpt")
    rng = np.random.default_rng(0)
    noise = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in params.items()}
    save_checkpoint(tmp / "noisy", noise, {"config": metadata["config"]})
    flip_4kib(tmp / "noisy")


def truncate_data(checkpoint: Path) -> None:
    path = _largest_data_file(checkpoint)
    path.write_bytes(path.read_bytes()[:1000])


def _run_folder(tmp: Path) -> None:
    shutil.copytree(tmp / "ckpt", tmp / "run" / "best")


def _file(name: str) -> Callable[[Path], None]:
    return _write(name, b"not a folder\n")


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 64

CASES = [
    # inspect: malformed .safetensors and files that are not PyTorch files
    Case("safetensors-empty", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "not a safetensors file"], _write("x.safetensors", b"")),
    Case("safetensors-header-list", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "not an object"], _write("x.safetensors", _safetensors([1, 2]))),
    Case("safetensors-header-not-json", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "not JSON"], _write("x.safetensors", _safetensors({})[:8] + b"{]")),
    Case("safetensors-header-too-long", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "header length"],
         _write("x.safetensors", _safetensors({}, length=1 << 40))),
    Case("safetensors-no-data-offsets", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "'w'", "data_offsets"],
         _write("x.safetensors", _safetensors({"w": {"dtype": "F32", "shape": [2]}}))),
    Case("safetensors-shape-vs-bytes", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "'w'", "needs 16 bytes"],
         _write("x.safetensors", _safetensors(_tensor(data_offsets=[0, 12]), b"\0" * 12))),
    Case("safetensors-truncated", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "'w'", "truncated"],
         _write("x.safetensors", _safetensors(_tensor(), b"\0" * 10))),
    Case("safetensors-unknown-dtype", ["inspect", "{tmp}/x.safetensors"], 2,
         ["x.safetensors", "'w'", "unknown dtype"],
         _write("x.safetensors", _safetensors(_tensor(dtype="F128"), b"\0" * 16))),
    Case("pth-text", ["inspect", "{tmp}/notes.pth"], 2,
         ["notes.pth", "not a PyTorch weights file"], _write("notes.pth", b"hello\n")),
    Case("pth-jpeg", ["inspect", "{tmp}/photo.pth"], 2,
         ["photo.pth", "not a PyTorch weights file"], _write("photo.pth", JPEG)),
    Case("pth-empty", ["inspect", "{tmp}/empty.pth"], 2, ["empty.pth", "empty"],
         _write("empty.pth", b"")),
    # import: bad weights, and an --out that would destroy an input or cannot be written
    Case("import-gpt2-malformed-safetensors",
         [*IMPORT, "--gpt2", "{tmp}/hf", "--out", "{tmp}/new"], 2,
         ["hf/model.safetensors", "data_offsets"],
         _write("hf/model.safetensors",
                _safetensors({"wte.weight": {"dtype": "F32", "shape": [2]}}))),
    Case("import-non-finite-weights",
         ["import", "--perceiver", "{tmp}/nan_perciever.pth", *IMPORT[3:], "--gpt2",
          "{tmp}/gpt2", "--out", "{tmp}/new"], 2,
         ["nan_perciever.pth", "'latents' has 1 NaN or infinite"],
         _nan_perceiver),
    Case("import-text-as-pth",
         ["import", "--perceiver", "{tmp}/notes.pth", *IMPORT[3:], "--gpt2", "{tmp}/gpt2",
          "--out", "{tmp}/new"], 2, ["notes.pth", "not a PyTorch weights file"],
         _write("notes.pth", b"hello\n")),
    Case("import-out-is-input-folder",
         [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "{tmp}/gpt2", "--force"], 2,
         ["--out {tmp}/gpt2 is the input {tmp}/gpt2"]),
    Case("import-out-is-input-file",
         [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "{tmp}/best_gpt2.pth", "--force"], 2,
         ["{tmp}/best_gpt2.pth"]),
    Case("import-out-contains-inputs",
         [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "{tmp}", "--force"], 2,
         ["--out {tmp} contains the input"]),
    Case("import-out-inside-input-folder",
         [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "{tmp}/gpt2/lensjax", "--force"], 2,
         ["--out {tmp}/gpt2/lensjax is inside the input {tmp}/gpt2"]),
    Case("import-out-regular-file",
         [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "{tmp}/taken", "--force"], 2,
         ["{tmp}/taken", "is a file"], _file("taken")),
    Case("import-out-under-regular-file",
         [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "{tmp}/taken/ckpt"], 2,
         ["{tmp}/taken", "not a folder"], _file("taken")),
    Case("import-out-not-writable",
         [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "/sys/lensjax-ckpt"], 2,
         ["/sys/lensjax-ckpt", "not writable"]),
    Case("import-out-exists", [*IMPORT, "--gpt2", "{tmp}/gpt2", "--out", "{tmp}/ckpt"], 2,
         ["{tmp}/ckpt", "--force"]),
    # export: an --out that would destroy the checkpoint, and damaged checkpoints
    Case("export-onto-itself", ["export", "{tmp}/ckpt", "--out", "{tmp}/ckpt", "--force"], 2,
         ["--out {tmp}/ckpt is the input {tmp}/ckpt"]),
    Case("export-into-its-run-folder",
         ["export", "{tmp}/run/best", "--out", "{tmp}/run", "--force"], 2,
         ["--out {tmp}/run contains the input {tmp}/run/best"], _run_folder),
    Case("export-inside-the-checkpoint",
         ["export", "{tmp}/ckpt", "--out", "{tmp}/ckpt/exported"], 2,
         ["is inside the input {tmp}/ckpt"]),
    Case("export-out-regular-file",
         ["export", "{tmp}/ckpt", "--out", "{tmp}/taken", "--force"], 2,
         ["{tmp}/taken", "is a file"], _file("taken")),
    Case("export-out-under-regular-file", ["export", "{tmp}/ckpt", "--out", "{tmp}/taken/x"],
         2, ["{tmp}/taken", "not a folder"], _file("taken")),
    Case("export-out-not-writable", ["export", "{tmp}/ckpt", "--out", "/sys/x"], 2,
         ["/sys/x", "not writable"]),
    # Refused naming the array: by its checksum, or by the decompressor where the flipped
    # bytes happen to cover a zstd block header (the file layout varies between saves).
    Case("export-flipped-bytes", ["export", "{tmp}/noisy", "--out", "{tmp}/out"], 2,
         ["{tmp}/noisy/params", "gpt2.wte.embedding"], flipped_noise_checkpoint),
    Case("export-truncated-data", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["cannot read {tmp}/ckpt/params", "damaged"], lambda tmp: truncate_data(tmp / "ckpt")),
    Case("metadata-not-json", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["{tmp}/ckpt/lensjax.json", "not valid JSON"], _write("ckpt/lensjax.json", b"{")),
    Case("metadata-list", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "expected a JSON object, found an array"],
         _write("ckpt/lensjax.json", b'[{"format": "lensjax-checkpoint", "version": 1}]')),
    Case("metadata-no-config", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "no \"config\""], _edit_metadata(lambda doc: doc.pop("config"))),
    Case("metadata-version-string", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "\"version\" must be a positive integer, found '1'"],
         _edit_metadata(lambda doc: doc.update(version="1"))),
    Case("metadata-config-missing-field", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "config.gpt2: missing field(s) n_layer"],
         _edit_metadata(lambda doc: doc["config"]["gpt2"].pop("n_layer"))),
    Case("metadata-config-unknown-field", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "config.perceiver: unknown field(s) depth"],
         _edit_metadata(lambda doc: doc["config"]["perceiver"].update(depth=3))),
    Case("metadata-config-wrong-type", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "config.gpt2.n_embd must be a non-negative integer, found '64'"],
         _edit_metadata(lambda doc: doc["config"]["gpt2"].update(n_embd="64"))),
    Case("metadata-config-not-object", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "config must be an object"],
         _edit_metadata(lambda doc: doc.update(config="v3b"))),
    Case("metadata-components-list", ["export", "{tmp}/ckpt", "--out", "{tmp}/out"], 2,
         ["lensjax.json", "\"components\" must be an object"],
         _edit_metadata(lambda doc: doc.update(components=[]))),
]


@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_bad_input_is_refused_by_name(case, sources, tmp_path, capsys):
    shutil.copytree(sources, tmp_path, dirs_exist_ok=True)
    check_case(in_process_runner(bridge_cli, capsys), case, tmp_path)


def test_damaged_params_give_one_error_line_and_no_exit_noise(sources, tmp_path):
    """Orbax used to print `RuntimeError: Event loop is closed` tracebacks at process exit,
    after the error, when one array of a restore failed while others were being read."""
    shutil.copytree(sources / "ckpt", tmp_path / "ckpt")
    truncate_data(tmp_path / "ckpt")
    result = run_cli("bridge", ["export", tmp_path / "ckpt", "--out", tmp_path / "out"],
                     cwd=tmp_path)
    error = assert_refused(result, 2, f"cannot read {tmp_path}/ckpt/params")
    assert result.stderr.strip().splitlines() == [error], result.stderr[-3000:]


def test_ctrl_c_during_export_exits_130_and_leaves_nothing(sources, tmp_path, capsys,
                                                          monkeypatch):
    import bridge.convert

    calls = []

    def interrupted(*args, **kwargs):  # Ctrl-C arrives while the second file is written
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return writer(*args, **kwargs)

    writer = bridge.convert.write_torch_file
    monkeypatch.setattr(bridge.convert, "write_torch_file", interrupted)
    code = bridge_cli(["export", str(sources / "ckpt"), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(calls) == 2
    assert lines == [f"error: interrupted (Ctrl-C); nothing was written to {tmp_path / 'out'}"]
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling
