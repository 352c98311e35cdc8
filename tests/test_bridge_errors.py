"""Bad input to the bridge: each gets a clear, specific error and nothing half written."""

import os

import pytest
import torch

from bridge.__main__ import main as bridge_cli
from bridge.io import BridgeError
from conftest import import_files
from lensjax import load_pretrained
from lensjax.checkpoint import CheckpointError


def _state(path):
    return torch.load(path, weights_only=True)


def test_file_of_the_wrong_component_is_named(reference):
    files = dict(reference("tiny").files)
    files["perceiver"] = files["gpt2_blocks"]
    with pytest.raises(BridgeError, match=r"given as the Perceiver.*GPT-2 blocks"):
        import_files(files, "tiny")


def test_shape_mismatch_names_key_and_shapes(reference, tmp_path):
    files = dict(reference("tiny").files)
    state = _state(files["perceiver"])
    state["latents"] = torch.randn(32, 64)
    files["perceiver"] = tmp_path / "perceiver_32_latents.pth"
    torch.save(state, files["perceiver"])
    with pytest.raises(BridgeError, match=r"'latents' has shape \(32, 64\), expected \(8, 64\)"):
        import_files(files, "tiny")


def test_missing_and_unexpected_keys_are_all_listed_in_one_error(reference, tmp_path):
    files = dict(reference("tiny").files)
    state = _state(files["cross_attention"])
    del state["0.layernorm.weight"], state["1.cross_attn.out_proj.bias"]
    state["1.cross_attn.extra"] = torch.zeros(3)
    files["cross_attention"] = tmp_path / "damaged_xattn.pth"
    torch.save(state, files["cross_attention"])
    blocks = _state(files["gpt2_blocks"])
    del blocks["1.mlp.c_fc.bias"]
    files["gpt2_blocks"] = tmp_path / "damaged_gpt2.pth"
    torch.save(blocks, files["gpt2_blocks"])
    with pytest.raises(BridgeError) as caught:
        import_files(files, "tiny")
    message = str(caught.value)
    assert "4 problem(s)" in message
    assert "damaged_xattn.pth: missing key '0.layernorm.weight' (expected shape (64,))" in message
    assert "missing key '1.cross_attn.out_proj.bias'" in message
    assert "unexpected key '1.cross_attn.extra' (shape (3,))" in message
    assert "damaged_gpt2.pth: missing key '1.mlp.c_fc.bias' (expected shape (256,))" in message


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_unexecuted(reference, tmp_path):
    marker = tmp_path / "code_ran"
    files = dict(reference("tiny").files)
    files["perceiver"] = tmp_path / "evil.pth"
    torch.save({"latents": _RunsCode(marker)}, files["perceiver"])
    with pytest.raises(BridgeError, match=r"refused to load.*weights_only=True"):
        import_files(files, "tiny")
    assert not marker.exists()


def test_truncated_file_is_reported(reference, tmp_path):
    files = dict(reference("tiny").files)
    data = files["gpt2_blocks"].read_bytes()
    files["gpt2_blocks"] = tmp_path / "truncated.pth"
    files["gpt2_blocks"].write_bytes(data[: len(data) // 2])
    with pytest.raises(BridgeError, match=r"truncated\.pth: not a readable PyTorch weights file"):
        import_files(files, "tiny")


def test_missing_file_is_reported(reference, tmp_path):
    files = dict(reference("tiny").files)
    files["cross_attention"] = tmp_path / "nope.pth"
    with pytest.raises(BridgeError, match=r"nope\.pth: no such file"):
        import_files(files, "tiny")


def test_perceiver_and_cross_attention_of_different_layouts_are_refused(reference):
    files = dict(reference("tiny").files)
    files["cross_attention"] = reference("tiny-src").files["cross_attention"]
    with pytest.raises(BridgeError, match="notebook layout but the cross-attention file is in "
                                          "the src layout"):
        import_files(files, "tiny")


def _import_args(files, out):
    return ["import", "--perceiver", str(files["perceiver"]),
            "--gpt2-blocks", str(files["gpt2_blocks"]),
            "--cross-attention", str(files["cross_attention"]), "--gpt2", str(files["gpt2"]),
            "--preset", "tiny", "--out", str(out)]


def test_existing_out_is_refused_without_force(reference, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert bridge_cli(_import_args(reference("tiny").files, out)) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert bridge_cli([*_import_args(reference("tiny").files, out), "--force"]) == 0
    assert not (out / "keep.txt").exists()
    assert load_pretrained(out).config.preset == "tiny"
    assert bridge_cli(["export", str(out), "--out", str(out)]) == 2


def test_interrupted_checkpoint_write_leaves_nothing_that_loads(reference, tmp_path, monkeypatch):
    model = import_files(reference("tiny").files, "tiny")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("lensjax.checkpoint._write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError):
        load_pretrained(tmp_path / "ckpt")


def test_interrupted_overwrite_keeps_the_old_checkpoint(reference, tmp_path, monkeypatch):
    model = import_files(reference("tiny").files, "tiny")
    model.save(tmp_path / "ckpt")
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lensjax.checkpoint._write_json", disk_full)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "ckpt", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert load_pretrained(tmp_path / "ckpt").config.preset == "tiny"


def test_export_in_the_other_layout_is_refused(reference, tmp_path, capsys):
    import_files(reference("tiny").files, "tiny").save(tmp_path / "ckpt")
    code = bridge_cli(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                       "--layout", "src"])
    assert code == 2
    assert "built in the notebook layout" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_of_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert bridge_cli(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "not a lensjax checkpoint" in capsys.readouterr().err


def test_non_finite_weights_are_refused_naming_file_and_key(reference, tmp_path):
    files = dict(reference("tiny").files)
    state = _state(files["perceiver"])
    state["latents"][0, :3] = float("nan")
    files["perceiver"] = tmp_path / "nan_perciever.pth"
    torch.save(state, files["perceiver"])
    blocks = _state(files["gpt2_blocks"])
    blocks["1.mlp.c_fc.bias"][0] = float("inf")
    files["gpt2_blocks"] = tmp_path / "inf_gpt2.pth"
    torch.save(blocks, files["gpt2_blocks"])
    with pytest.raises(BridgeError) as caught:
        import_files(files, "tiny")
    first, *lines = str(caught.value).splitlines()
    assert first == (f"2 problem(s) in {files['perceiver']}, {files['gpt2_blocks']} "
                     "converting to preset 'tiny':")
    assert lines == [f"  {files['perceiver']}: key 'latents' has 3 NaN or infinite value(s) of 512",
                     f"  {files['gpt2_blocks']}: key '1.mlp.c_fc.bias' has 1 NaN or infinite "
                     "value(s) of 256"]


def test_export_never_replaces_the_checkpoint_it_reads(reference, tmp_path):
    from bridge import export_files

    import_files(reference("tiny").files, "tiny").save(tmp_path / "run" / "best")
    for out in (tmp_path / "run" / "best", tmp_path / "run", tmp_path / "run" / "best" / "x"):
        with pytest.raises(BridgeError, match=r"--out .* the input .*run/best"):
            export_files(tmp_path / "run" / "best", out, force=True)
    assert load_pretrained(tmp_path / "run" / "best").config.preset == "tiny"
