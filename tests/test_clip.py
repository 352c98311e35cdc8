"""CLIP in Flax against HF transformers' CLIPModel and open_clip (random weights, float32),
through each import path (HF folder, open_clip state dict, OpenAI TorchScript archive), its
tokenizer against open_clip's, and the scorer API."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIP as OpenClip
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from transformers import CLIPConfig as HFConfig
from transformers import CLIPModel

from bridge import BridgeError
from bridge.__main__ import main as bridge_main
from bridge.convert import export_files, import_clip_model
from conftest import assert_parity
from lensjax import load_pretrained
from lensjax.clip import ClipModel
from lensjax.data.clip_tokenizer import ClipTokenizer

TEXTS = ["a photo of a cat", "Loving this sunset 🌅🔥 #blessed #goldenhour @friend "
         "https://t.co/xyz", "Café crème à Paris", "東京タワーの夜景", "",
         "&amp; it&#39;s   GREAT", "👍🏽 thumbs up", "word " * 100]


def _hf_tiny() -> CLIPModel:
    torch.manual_seed(0)
    config = HFConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        vision_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 64, "patch_size": 16,
                       "hidden_act": "quick_gelu"},
        projection_dim=24)
    return CLIPModel(config).eval()


def _open_clip_tiny() -> OpenClip:
    torch.manual_seed(1)
    model = OpenClip(embed_dim=24, quick_gelu=True,
                     vision_cfg=CLIPVisionCfg(layers=2, width=64, patch_size=16, image_size=64,
                                              head_width=16),
                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32,
                                          heads=4, layers=2)).eval()
    with torch.no_grad():  # biases and norms away from their 0 / 1 initialisation
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 64, 64, generator=generator)
    ids = torch.from_numpy(ClipTokenizer().tokenize(TEXTS[:3]).astype(np.int64))
    return images, ids


def _check_towers(model: ClipModel, image_ref, text_ref, images, ids):
    image = model.encode_image(images.permute(0, 2, 3, 1).numpy())
    text = model.encode_text(ids.numpy())
    assert_parity(image, image_ref)
    assert_parity(text, text_ref)
    ref = torch.nn.functional.normalize(image_ref, dim=-1) @ torch.nn.functional.normalize(
        text_ref, dim=-1).T
    ours = np.asarray(image) / np.linalg.norm(image, axis=-1, keepdims=True)
    ours = ours @ (np.asarray(text) / np.linalg.norm(text, axis=-1, keepdims=True)).T
    assert_parity(ours, ref)


def _features(output):
    return getattr(output, "pooler_output", output)  # transformers 5 returns an output object


def test_hf_clipmodel_import_matches_transformers(tmp_path, inputs):
    images, ids = inputs
    hf = _hf_tiny()
    hf.save_pretrained(tmp_path / "hf")
    model = import_clip_model(tmp_path / "hf", preset="clip-tiny")
    with torch.no_grad():
        image_ref = _features(hf.get_image_features(pixel_values=images))
        text_ref = _features(hf.get_text_features(input_ids=ids))
    _check_towers(model, image_ref, text_ref, images, ids)


def test_open_clip_and_openai_torchscript_imports_match_open_clip(tmp_path, inputs):
    images, ids = inputs
    reference = _open_clip_tiny()
    with torch.no_grad():
        image_ref, text_ref = reference.encode_image(images), reference.encode_text(ids)
    torch.save(reference.state_dict(), tmp_path / "open_clip.pth")
    _check_towers(import_clip_model(tmp_path / "open_clip.pth", preset="clip-tiny"),
                  image_ref, text_ref, images, ids)
    # OpenAI ships a TorchScript archive; its tensors are read without running its code.
    scripted = torch.jit.trace_module(reference, {"encode_image": images[:1]},
                                      check_trace=False)
    torch.jit.save(scripted, tmp_path / "ViT-tiny.pt")
    _check_towers(import_clip_model(tmp_path / "ViT-tiny.pt", preset="clip-tiny"),
                  image_ref, text_ref, images, ids)


def test_a_torchscript_archive_with_other_globals_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": Evil()}, protocol=2))
        archive.writestr("evil/code/__torch__/model.py", "")
    with pytest.raises(BridgeError, match="refused .* global __builtin__.print is not allowed"):
        import_clip_model(path, preset="clip-tiny")


def test_tokenizer_ids_equal_open_clips():
    ours = ClipTokenizer().tokenize(TEXTS)
    np.testing.assert_array_equal(ours, open_clip.tokenize(TEXTS).numpy())
    assert ours[-1, -1] == 49407 and ours.shape == (len(TEXTS), 77)  # cut, EOT kept last


def test_cli_import_then_load_pretrained_scores_pairs_and_exports_to_hf(tmp_path, inputs,
                                                                        capsys):
    images, ids = inputs
    hf = _hf_tiny()
    hf.save_pretrained(tmp_path / "hf")
    assert bridge_main(["import", "--family", "clip", "--hf", str(tmp_path / "hf"),
                        "--preset", "clip-tiny", "--out", str(tmp_path / "ckpt")]) == 0
    model = load_pretrained(tmp_path / "ckpt")
    assert isinstance(model, ClipModel)
    pixels = images.permute(0, 2, 3, 1).numpy()
    scores = model.similarity(pixels, TEXTS[:3])
    with torch.no_grad():
        image_ref = _features(hf.get_image_features(pixel_values=images))
        text_ref = _features(hf.get_text_features(input_ids=ids))
    expected = torch.nn.functional.cosine_similarity(image_ref, text_ref)
    assert_parity(scores, expected)
    written = export_files(tmp_path / "ckpt", tmp_path / "exported")
    back = CLIPModel.from_pretrained(written["clip"].parent).eval()
    with torch.no_grad():
        assert_parity(_features(back.get_image_features(pixel_values=images)), image_ref)
    assert bridge_main(["import", "--family", "clip", "--out", str(tmp_path / "x")]) == 2
    assert "reads one of --hf, --openai, --open-clip" in capsys.readouterr().err


def test_preprocess_is_openais_resize_crop_and_normalise():
    from PIL import Image

    from lensjax.clip import preprocess

    _, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (180, 300, 3),
                                                              dtype=np.uint8))
    expected = transform(image).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(preprocess(image), expected, atol=1e-5)


def test_embeddings_of_strings_and_of_their_ids_agree(tmp_path):
    hf = _hf_tiny()
    hf.save_pretrained(tmp_path / "hf")
    model = import_clip_model(tmp_path / "hf", preset="clip-tiny")
    np.testing.assert_array_equal(np.asarray(model.encode_text(TEXTS)),
                                  np.asarray(model.encode_text(ClipTokenizer().tokenize(TEXTS))))
    with pytest.raises(ValueError, match="token ids must be int"):
        model.encode_text(np.zeros((2, 10), np.int64))


@pytest.mark.slow
def test_full_size_vit_b_32_matches_transformers(tmp_path):
    torch.manual_seed(0)
    hf = CLIPModel(HFConfig(
        text_config={"hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407},
        vision_config={"hidden_act": "quick_gelu", "patch_size": 32})).eval()
    hf.save_pretrained(tmp_path / "hf")
    model = import_clip_model(tmp_path / "hf")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    ids = torch.from_numpy(ClipTokenizer().tokenize(TEXTS[:2]).astype(np.int64))
    with torch.no_grad():
        image_ref = _features(hf.get_image_features(pixel_values=images))
        text_ref = _features(hf.get_text_features(input_ids=ids))
    _check_towers(model, image_ref, text_ref, images, ids)
