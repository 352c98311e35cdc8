"""Import then export gives back the released files bit for bit, and every exported file
loads into its PyTorch module with strict=True. Also the accepted variants of the inputs."""

import ml_dtypes
import numpy as np
import pytest
import timm
import torch
from transformers import GPT2LMHeadModel

from bridge.__main__ import main as bridge_cli
from bridge.io import read_state_dict
from conftest import FULL, TINY, import_files
from torch_reference import Captioner as TorchCaptioner

ROUND_TRIP = ("perceiver", "gpt2_blocks", "cross_attention", "encoder_head")


def _torch_state(path):
    return torch.load(path, weights_only=True)


def _assert_same_tensors(original: dict, exported: dict) -> None:
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype, key
        assert torch.equal(exported[key], tensor), key


@pytest.mark.parametrize(
    "preset", [*TINY, *(pytest.param(p, marks=pytest.mark.slow) for p in FULL)]
)
def test_cli_import_then_export_is_bit_identical(preset, reference, tmp_path):
    files = reference(preset).files
    assert bridge_cli([
        "import", "--perceiver", str(files["perceiver"]),
        "--gpt2-blocks", str(files["gpt2_blocks"]),
        "--cross-attention", str(files["cross_attention"]), "--gpt2", str(files["gpt2"]),
        "--encoder", str(files["encoder"]), "--encoder-head", str(files["encoder_head"]),
        "--preset", preset, "--out", str(tmp_path / "ckpt"),
    ]) == 0
    assert bridge_cli(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    for component in ROUND_TRIP:
        _assert_same_tensors(_torch_state(files[component]),
                             _torch_state(out / files[component].name))
    # timm's weights come back in the features_only spelling, tensor for tensor.
    original = _torch_state(files["encoder"])
    exported = _torch_state(out / "encoder_convnext_tiny.pth")
    _assert_same_tensors(original, exported)


@pytest.mark.parametrize("preset", ["tiny", "tiny-src"])
def test_exported_files_load_strictly_into_the_torch_modules(preset, reference, tmp_path):
    from bridge import export_files

    ref = reference(preset)
    model = import_files(ref.files, preset)
    model.save(tmp_path / "ckpt")
    export_files(tmp_path / "ckpt", tmp_path / "out")
    fresh = TorchCaptioner(ref.cfg).eval()
    out = tmp_path / "out"
    fresh.perceiver.load_state_dict(_torch_state(out / "best_perciever.pth"), strict=True)
    fresh.gpt2.transformer.h.load_state_dict(_torch_state(out / "best_gpt2.pth"), strict=True)
    fresh.cross.load_state_dict(_torch_state(out / "best_cross_attention.pth"), strict=True)
    fresh.head.load_state_dict(_torch_state(out / "encoder_head.pth"), strict=True)
    encoder = timm.create_model("convnext_tiny", pretrained=False, features_only=True,
                                out_indices=(1, 2, 3), depths=ref.cfg.encoder.depths,
                                dims=ref.cfg.encoder.dims)
    encoder.load_state_dict(_torch_state(out / "encoder_convnext_tiny.pth"), strict=True)
    fresh.encoder = encoder
    gpt2_state = {k: torch.from_numpy(v) for k, v in
                  read_state_dict(out / "gpt2" / "model.safetensors").items()}
    fresh.gpt2.load_state_dict(gpt2_state, strict=True)
    assert isinstance(GPT2LMHeadModel.from_pretrained(out / "gpt2"), GPT2LMHeadModel)
    # The reassembled torch model computes what the original did.
    images = torch.randn(1, 3, 224, 224)
    ids = torch.tensor([[50256, 64, 3290, 318]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(fresh.encode(images), ids),
                                   ref.torch_model(ref.torch_model.encode(images), ids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_round_trip_in_their_dtype(dtype, reference, tmp_path):
    from bridge import export_files

    files = dict(reference("tiny").files)
    for component in ROUND_TRIP:
        state = {k: v.to(dtype) for k, v in _torch_state(files[component]).items()}
        files[component] = tmp_path / files[component].name
        torch.save(state, files[component])
    model = import_files(files, "tiny")
    latents = np.asarray(model.params["perceiver.latents"])
    assert latents.dtype == np.float32
    expected_latents = _torch_state(files["perceiver"])["latents"].float().numpy()
    np.testing.assert_array_equal(latents, expected_latents)
    model.save(tmp_path / "ckpt")
    export_files(tmp_path / "ckpt", tmp_path / "out")
    for component in ROUND_TRIP:
        _assert_same_tensors(_torch_state(files[component]),
                             _torch_state(tmp_path / "out" / files[component].name))
    as_numpy = read_state_dict(tmp_path / "out" / "best_perciever.pth")
    expected = ml_dtypes.bfloat16 if dtype == torch.bfloat16 else np.float16
    assert as_numpy["latents"].dtype == expected


def test_module_prefix_and_old_gpt2_buffers_are_accepted(reference, imported, tmp_path):
    files = dict(reference("tiny").files)
    perceiver = {f"module.{k}": v for k, v in _torch_state(files["perceiver"]).items()}
    files["perceiver"] = tmp_path / "dataparallel_perciever.pth"
    torch.save(perceiver, files["perceiver"])
    blocks = _torch_state(files["gpt2_blocks"])
    for layer in range(2):
        blocks[f"{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        blocks[f"{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    files["gpt2_blocks"] = tmp_path / "old_transformers_gpt2.pth"
    torch.save(blocks, files["gpt2_blocks"])
    model = import_files(files, "tiny")
    for path, value in imported("tiny").params.items():
        np.testing.assert_array_equal(np.asarray(model.params[path]), np.asarray(value))


def test_gpt2_checkpoint_variants_are_accepted(reference, imported, tmp_path):
    """pytorch_model.bin with bare keys (as the original gpt2 upload) and with lm_head."""
    files = dict(reference("tiny").files)
    hf = read_state_dict(files["gpt2"])
    bare = {k.removeprefix("transformer."): torch.from_numpy(v) for k, v in hf.items()}
    bare["lm_head.weight"] = bare["wte.weight"].clone()
    (tmp_path / "gpt2").mkdir()
    torch.save(bare, tmp_path / "gpt2" / "pytorch_model.bin")
    files["gpt2"] = tmp_path / "gpt2"
    model = import_files(files, "tiny")
    np.testing.assert_array_equal(np.asarray(model.params["gpt2.wte.embedding"]),
                                  np.asarray(imported("tiny").params["gpt2.wte.embedding"]))


def test_timm_full_model_names_are_accepted(reference, imported, tmp_path):
    """The plain timm spelling (stem.0, stages.1, classifier head) imports like features_only."""
    files = dict(reference("tiny").files)
    plain = {k.replace("stem_", "stem.").replace("stages_", "stages."): v
             for k, v in _torch_state(files["encoder"]).items()}
    plain["head.fc.weight"] = torch.zeros(1000, 64)
    plain["head.fc.bias"] = torch.zeros(1000)
    files["encoder"] = tmp_path / "convnext_tiny_plain.pth"
    torch.save(plain, files["encoder"])
    model = import_files(files, "tiny")
    key = "encoder.stages.1.downsample.1.kernel"
    np.testing.assert_array_equal(np.asarray(model.params[key]),
                                  np.asarray(imported("tiny").params[key]))
