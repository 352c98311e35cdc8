"""Checkpoint directories: checksums catch damaged arrays, `lensjax.json` is validated field
by field, and `CaptionerConfig.from_dict` names the field that is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import lensjax
from lensjax.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_extra,
    read_metadata,
    save_checkpoint,
)
from lensjax.models.v3b.captioner import PRESETS, CaptionerConfig

CONFIG = CaptionerConfig.from_preset("tiny").to_dict()


def _save(path: Path, **kwargs) -> dict[str, np.ndarray]:
    """A small checkpoint of standard-normal arrays (stored uncompressed by Orbax, so flipped
    bytes still decode) with a training-state tree; returns its params."""
    rng = np.random.default_rng(0)
    params = {"gpt2.wte.embedding": rng.standard_normal((512, 256), dtype=np.float32),
              "perceiver.latents": rng.standard_normal((8, 64), dtype=np.float32)}
    extra = {"train_state": {"opt_0": rng.standard_normal((512, 256), dtype=np.float32),
                             "key": np.arange(2, dtype=np.uint32)}}
    save_checkpoint(path, params, {"config": CONFIG}, extra=extra, **kwargs)
    return params


def _flip_4kib(tree_dir: Path) -> None:
    path = max(tree_dir.rglob("d/*"), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    path.write_bytes(bytes(data))


def _edit_metadata(path: Path, change) -> None:
    meta = path / "lensjax.json"
    document = json.loads(meta.read_text())
    change(document)
    meta.write_text(json.dumps(document))


def test_flipped_bytes_are_caught_and_named(tmp_path):
    params = _save(tmp_path / "ckpt")
    _flip_4kib(tmp_path / "ckpt" / "params")
    with pytest.raises(CheckpointError, match=r"params is damaged.*'gpt2\.wte\.embedding' does "
                                              r"not match its checksum"):
        load_checkpoint(tmp_path / "ckpt")
    damaged, _ = load_checkpoint(tmp_path / "ckpt", verify=False)
    assert not np.array_equal(damaged["gpt2.wte.embedding"], params["gpt2.wte.embedding"])
    _flip_4kib(tmp_path / "ckpt" / "train_state")
    with pytest.raises(CheckpointError, match=r"train_state is damaged.*'opt_0' does not match"):
        load_extra(tmp_path / "ckpt", "train_state")


def test_checkpoints_without_checksums_still_load(tmp_path):
    params = _save(tmp_path / "ckpt")
    _edit_metadata(tmp_path / "ckpt", lambda document: document.pop("checksums"))
    loaded, metadata = load_checkpoint(tmp_path / "ckpt")
    assert "checksums" not in metadata
    np.testing.assert_array_equal(loaded["perceiver.latents"], params["perceiver.latents"])
    assert set(load_extra(tmp_path / "ckpt", "train_state")) == {"opt_0", "key"}


def test_a_resave_records_the_new_arrays_checksums(tmp_path):
    _save(tmp_path / "ckpt")
    params, metadata = load_checkpoint(tmp_path / "ckpt")
    params["perceiver.latents"] = params["perceiver.latents"] + 1
    save_checkpoint(tmp_path / "ckpt", params, metadata, overwrite=True)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    np.testing.assert_array_equal(loaded["perceiver.latents"], params["perceiver.latents"])


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("config"), r"no \"config\""),
    (lambda d: d.update(version="1"), r"\"version\" must be a positive integer, found '1'"),
    (lambda d: d.update(version=7), r"newer lensjax \(format version 7"),
    (lambda d: d["config"].pop("gpt2"), r"config: missing field\(s\) gpt2"),
    (lambda d: d["config"]["gpt2"].update(n_head=4.0), r"config\.gpt2\.n_head must be a non-ne"),
    (lambda d: d["config"]["perceiver"].update(layout="paper"), r"layout must be one of"),
    (lambda d: d["config"].update(encoder={"dims": [1]}), r"config\.encoder: missing field"),
    (lambda d: d["checksums"].update(algorithm="md5"), r"unknown checksum algorithm 'md5'"),
])
def test_damaged_metadata_is_a_checkpoint_error_naming_the_field(tmp_path, change, message):
    _save(tmp_path / "ckpt")
    _edit_metadata(tmp_path / "ckpt", change)
    with pytest.raises(CheckpointError, match=message):
        read_metadata(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=message):
        lensjax.load_pretrained(tmp_path / "ckpt")


def test_metadata_that_is_not_an_object(tmp_path):
    _save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "lensjax.json").write_text('["lensjax-checkpoint"]')
    with pytest.raises(CheckpointError, match=r"lensjax\.json: expected a JSON object, found an "
                                              r"array"):
        load_checkpoint(tmp_path / "ckpt")


def test_config_round_trips_through_json_for_every_preset():
    for name in PRESETS:
        config = CaptionerConfig.from_preset(name)
        assert CaptionerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("data, message", [
    ([], r"config must be an object, found \[\]"),
    ({**CONFIG, "layers": 3}, r"config: unknown field\(s\) layers"),
    ({**CONFIG, "image_size": True}, r"config\.image_size must be a non-negative integer"),
    ({**CONFIG, "encoder": {**CONFIG["encoder"], "dims": [96, "x"]}},
     r"config\.encoder\.dims\[1\] must be a non-negative integer, found 'x'"),
    ({**CONFIG, "mode": "append"}, r"config\.mode must be one of 'inject', 'prepend'"),
])
def test_from_dict_names_the_wrong_field(data, message):
    with pytest.raises(ValueError, match=message):
        CaptionerConfig.from_dict(data)
