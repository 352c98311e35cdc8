"""v1 and v2 as lensjax families: presets, checkpoints that carry their word vocabulary, and
the public API (logits, generate, caption) in words."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

from lensjax import CaptionModel, load_pretrained
from lensjax.data.images import load_image, resize
from lensjax.data.word_vocab import WordVocabulary
from lensjax.models.families import FAMILIES, config_from_metadata, preset_config
from lensjax.models.inception import InceptionConfig, preprocess
from lensjax.models.lstm import V1DecoderConfig
from lensjax.models.v1.config import V1Config
from lensjax.params import new_module

WORDS = ["", "[UNK]", "<start>", "<end>", "a", "red", "blue", "circle", "square", "on",
         "black", "white", "and", "small", "large", "."]


def _vocabulary(size: int) -> WordVocabulary:
    return WordVocabulary(WORDS + [f"w{i}" for i in range(size - len(WORDS))])


def _model(preset: str, seed: int = 0, **decoder) -> CaptionModel:
    cfg = preset_config(preset)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, **decoder))
    module = new_module(cfg, seed)
    # larger embeddings than Keras' uniform(+-0.05) so that random models vary their words
    rng = np.random.default_rng(seed)
    module.decoder.embedding[...] = rng.normal(0, 1.0, module.decoder.embedding.shape)
    return CaptionModel(module, {"tokenizer": _vocabulary(cfg.vocab_size).to_metadata()})


def _features(model: CaptionModel, rows: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (rows, *model.feature_shape)).astype(
        np.float32)


def test_v1_and_v2_are_families_with_their_presets():
    assert {"v1", "v1-concat", "v1-tiny"} <= set(FAMILIES["v1"].presets)
    assert {"v2", "v2-tiny"} <= set(FAMILIES["v2"].presets)
    assert preset_config("v1").decoder.hidden == 512 and preset_config("v1").image_size == 299
    assert preset_config("v1-concat").decoder.fusion == "concat"
    assert preset_config("v2").decoder.vocab_size == 8000


def test_a_config_with_a_torchvision_inception_round_trips_through_json():
    cfg = V1Config(V1DecoderConfig(vocab_size=50), encoder=InceptionConfig(count_pad=True))
    back = config_from_metadata({"family": "v1", "config": cfg.to_dict()})
    assert back == cfg and back.encoder.count_pad is True
    broken = cfg.to_dict()
    broken["encoder"]["count_pad"] = "yes"
    with pytest.raises(ValueError, match="config.encoder.count_pad must be true or false"):
        config_from_metadata({"family": "v1", "config": broken})


@pytest.mark.parametrize("preset", ["v1-tiny", "v2-tiny"])
def test_a_saved_word_model_loads_with_its_vocabulary_and_equal_logits(preset, tmp_path):
    model = _model(preset)
    features = _features(model, 2)
    ids = np.array([[2, 4, 5, 7, 0, 0], [2, 6, 8, 9, 10, 3]], np.int32)
    model.save(tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.family.name == preset[:2] and loaded.tokenizer == model.tokenizer
    np.testing.assert_array_equal(loaded.logits(features, ids), model.logits(features, ids))


@pytest.mark.parametrize("preset", ["v1-tiny", "v2-tiny"])
def test_generate_ends_rows_at_the_vocabularys_end_and_captions_are_words(preset):
    model = _model(preset)
    features = _features(model, 4)
    end = model.tokenizer.end_id
    with jax.default_matmul_precision("highest"):
        tokens = model.generate(features, "greedy", max_new_tokens=8)
        beams = model.generate(features, "beam", max_new_tokens=8, beam_width=3)
        # the greedy words, read back step by step from the full-prefix logits
        prefix = np.full((4, 1), model.tokenizer.start_id, np.int32)
        for _ in range(8):
            nxt = np.asarray(model.logits(features, prefix))[:, -1].argmax(-1)
            prefix = np.concatenate([prefix, nxt[:, None].astype(np.int32)], axis=1)
    for row, expected in zip(tokens, prefix[:, 1:], strict=True):
        stop = next((i for i, t in enumerate(expected) if t in (end, 0)), 8)
        np.testing.assert_array_equal(row[:stop], expected[:stop])
        assert (row[stop:] == end).all()
    assert beams.shape == (4, 8) and beams.max() < model.config.vocab_size
    words = [model.tokenizer.decode_caption(row) for row in tokens]
    for text in words:
        assert "<start>" not in text and "<end>" not in text
        assert all(word in model.tokenizer.words for word in text.split())


def test_v1_features_are_one_pooled_vector_per_image():
    model = _model("v1-tiny")
    with pytest.raises(ValueError, match=r"features must be \(B, 2048\) \(one pooled vect"):
        model.logits(np.zeros((1, 64, 2048), np.float32), np.array([[2]]))
    with pytest.raises(ValueError, match=r"features must be \(B, S, 2048\)"):
        _model("v2-tiny").generate(np.zeros((1, 2048), np.float32))


def test_a_word_model_without_its_inception_cannot_caption_image_files(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    with pytest.raises(RuntimeError, match="no InceptionV3 encoder.*--inception"):
        _model("v2-tiny").caption([tmp_path / "red.png"])


def test_captioning_an_image_file_runs_inception_on_keras_scaled_pixels(tmp_path):
    decoder = V1DecoderConfig(vocab_size=40, embed_dim=16, hidden=24, image_dim=24,
                              merge_dim=16)
    cfg = dataclasses.replace(preset_config("v1"), decoder=decoder, max_len=6, preset="custom")
    module = new_module(cfg, 0)
    model = CaptionModel(module, {"tokenizer": _vocabulary(40).to_metadata()})
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 60, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    with jax.default_matmul_precision("highest"):
        (caption,) = model.caption([tmp_path / "noise.png"], "greedy")
        features = np.asarray(model.encode(load_image(tmp_path / "noise.png", 299)[None]))
        keras_scaled = module.encoder.pooled(preprocess(resize(Image.open(tmp_path / "noise.png"),
                                                               299)[None]))
    np.testing.assert_allclose(features, keras_scaled, rtol=1e-4, atol=1e-4)
    expected = model.tokenizer.decode_caption(model.generate(features, "greedy")[0])
    assert caption == expected


def _notebook_beam(model: CaptionModel, feature: np.ndarray, width: int, steps: int,
                   alpha: float, quirk: bool) -> list[int]:
    """The v2 notebook's `caption_generator_beam`, transcribed: the whole prefix through the
    model at every step; `quirk` keeps its `np.argsort(p)[-(w+1):]` ascending slip, else the
    intended top-w without [UNK]."""
    start, end, unk = model.tokenizer.start_id, model.tokenizer.end_id, 1
    beams = [([start], 0.0)]
    for _ in range(steps):
        candidates = []
        for seq, score in beams:
            if seq[-1] == end:
                candidates.append((seq, score))
                continue
            logits = np.asarray(model.logits(feature[None], np.array([seq], np.int32)))[0, -1]
            probs = np.exp(logits - logits.max())
            probs = probs / probs.sum()
            if quirk:
                top = [i for i in np.argsort(probs)[-(width + 1):] if i != unk][:width]
            else:
                top = [i for i in np.argsort(probs)[::-1] if i != unk][:width]
            candidates += [(seq + [int(i)], score + np.log(probs[i] + 1e-9)) for i in top]
        beams = sorted(candidates, key=lambda c: c[1] / len(c[0]) ** alpha, reverse=True)[:width]
    best = beams[0][0][1:]
    return best + [end] * (steps - len(best))


@pytest.mark.parametrize("quirk", [False, True], ids=["top-w", "argsort-quirk"])
def test_v2_beam_search_is_the_notebooks_ranked_beam(quirk):
    model = _model("v2-tiny", seed=0, feature_dim=32)
    # varied words, and [UNK] the likeliest first word but not always among the likeliest
    # later, so that both of the quirk's cases occur (the last assertion checks this draw
    # still gives that case; the model's seed was chosen for it)
    rng = np.random.default_rng(7)
    output = model.module.decoder.output
    output.kernel[...] = rng.normal(0, 1.0, output.kernel.shape)
    output.bias[...] = rng.normal(0, 0.5, output.bias.shape)
    output.bias[...] = output.bias[...].at[1].add(3.0)
    model = CaptionModel(model.module, model.metadata)
    features = _features(model, 6, seed=5)
    with jax.default_matmul_precision("highest"):
        ours = model.generate(features, "beam", max_new_tokens=6, beam_width=3, alpha=0.7,
                              argsort_quirk=quirk)
        other = model.generate(features, "beam", max_new_tokens=6, beam_width=3, alpha=0.7,
                               argsort_quirk=not quirk)
        for row, feature in enumerate(features):
            expected = _notebook_beam(model, feature, 3, 6, 0.7, quirk)
            np.testing.assert_array_equal(ours[row], expected)
        first = np.asarray(model.logits(features, np.full((6, 1), 2, np.int32)))[:, 0]
    assert 1 not in ours  # [UNK] is never proposed
    assert (first.argmax(-1) == 1).all() and (ours != other).any(axis=1).sum() >= 2


@pytest.mark.parametrize("preset", ["v1-tiny", "v2-tiny"])
def test_evaluate_captions_a_word_models_feature_cache_and_scores_both_bleus(preset, tmp_path):
    from lensjax.data.cache import FeatureCache
    from lensjax.evaluate import main as evaluate

    model = _model(preset)
    model.save(tmp_path / "ckpt")
    keys = ["a.jpg", "b.jpg", "c.jpg"]
    (tmp_path / "captions.txt").write_text("image_name| comment_number| comment\n" + "".join(
        f"{key}| 0| a red circle on black\n" for key in keys))
    features = _features(model, 3)
    with FeatureCache.create(tmp_path / "features", shards=1,
                             shape=model.feature_shape) as writer:
        for key, row in zip(keys, features, strict=True):
            writer.put(key, row)
    out = tmp_path / "report"
    assert evaluate(["--weights", str(tmp_path / "ckpt"), "--features",
                     str(tmp_path / "features"), "--references", str(tmp_path / "captions.txt"),
                     "--split", "all", "--method", "beam", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["images"] == 3 and 0 <= report["lenstowords_bleu4"] <= 1
    assert 0 <= report["coco"]["BLEU-4"] <= 1
    predictions = model.generate(features.astype(np.float16).astype(np.float32), "beam")
    per_image = (out / "per_image.csv").read_text()
    for row in predictions:
        assert model.tokenizer.decode_caption(row) in per_image
