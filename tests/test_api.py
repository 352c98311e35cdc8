"""The public Python API: load_pretrained, encode, logits, save, build_model."""

import json
import subprocess
import sys

import numpy as np
import pytest

import lensjax
from conftest import import_files
from lensjax.checkpoint import CheckpointError


def test_importing_lensjax_and_its_commands_loads_neither_torch_nor_the_bridge():
    # The bridge (and with it torch) is the optional layer on top: only converting PyTorch
    # files imports it, lazily.
    code = ("import sys, lensjax, lensjax.api, lensjax.params, lensjax.checkpoint, "
            "lensjax.train, lensjax.train.step, lensjax.caption, lensjax.evaluate, "
            "lensjax.extract; print(sorted({'torch', 'bridge'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_save_then_load_pretrained_gives_identical_outputs(imported, tmp_path):
    model = imported("tiny")
    path = model.save(tmp_path / "v3c")
    loaded = lensjax.load_pretrained(path)
    assert loaded.config == model.config
    features = np.random.default_rng(0).standard_normal((2, 64, 48), dtype=np.float32)
    ids = np.array([[50256, 40, 1101], [50256, 257, 3290]])
    np.testing.assert_array_equal(np.asarray(loaded.logits(features, ids)),
                                  np.asarray(model.logits(features, ids)))
    metadata = json.loads((path / "lensjax.json").read_text())
    assert metadata["format"] == "lensjax-checkpoint"
    assert metadata["tokenizer"]["eos_id"] == 50256
    assert metadata["components"]["perceiver"]["table"] == "perceiver/notebook"
    assert len(metadata["components"]["perceiver"]["sha256"]) == 64
    assert metadata["provenance"]["created_by"] == "bridge import"


def test_without_encoder_encode_raises_clearly_and_logits_still_work(reference):
    files = reference("tiny").files
    model = import_files(files, "tiny", encoder=None, encoder_head=None)
    assert model.metadata["components"]["encoder"] == {"status": "absent"}
    with pytest.raises(lensjax.MissingComponentError, match="no image encoder.*--encoder"):
        model.encode(np.zeros((1, 224, 224, 3), np.float32))
    logits = model.logits(np.zeros((1, 64, 48), np.float32), np.array([[50256]]))
    assert logits.shape == (1, 1, 50257)


def test_encoder_without_head_says_the_head_is_missing(reference):
    model = import_files(reference("tiny").files, "tiny", encoder_head=None)
    with pytest.raises(lensjax.MissingComponentError, match="no encoder head"):
        model.encode(np.zeros((1, 224, 224, 3), np.float32))


def test_random_encoder_head_is_seeded_and_recorded(reference):
    files = reference("tiny").files
    first = import_files(files, "tiny", encoder_head="random", seed=7)
    second = import_files(files, "tiny", encoder_head="random", seed=7)
    other = import_files(files, "tiny", encoder_head="random", seed=8)
    key = "encoder_head.projections.0.kernel"
    np.testing.assert_array_equal(np.asarray(first.params[key]), np.asarray(second.params[key]))
    assert not np.array_equal(np.asarray(first.params[key]), np.asarray(other.params[key]))
    assert first.metadata["components"]["encoder_head"] == {"status": "random", "seed": 7}


def test_encode_rejects_nchw_with_a_hint(imported):
    with pytest.raises(ValueError, match=r"NHWC.*NCHW\?"):
        imported("tiny").encode(np.zeros((1, 3, 224, 224), np.float32))


def test_logits_rejects_features_of_the_wrong_width(imported):
    with pytest.raises(ValueError, match=r"features must be \(B, S, 48\)"):
        imported("tiny").logits(np.zeros((1, 64, 768), np.float32), np.array([[50256]]))


def test_load_pretrained_of_a_non_checkpoint_says_how_to_convert(tmp_path):
    with pytest.raises(CheckpointError, match="python -m bridge import"):
        lensjax.load_pretrained(tmp_path)


def test_build_model_from_the_released_files(reference, imported):
    files = reference("tiny").files
    model = lensjax.build_model(
        perciever_path=files["perceiver"], gpt2_blocks_path=files["gpt2_blocks"],
        cross_attn_path=files["cross_attention"], gpt2=files["gpt2"], encoder=None,
        preset="tiny",
    )
    features = np.ones((1, 64, 48), np.float32)
    ids = np.array([[50256, 11]])
    np.testing.assert_array_equal(np.asarray(model.logits(features, ids)),
                                  np.asarray(imported("tiny").logits(features, ids)))
