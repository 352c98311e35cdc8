"""v3a (ConvNeXt features -> ProjectionHead -> Transformer decoder) against the notebook's own
PyTorch modules, through the bridge both ways, and through the API, caption and train CLIs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bridge import BridgeError, export_files, import_model
from conftest import assert_parity
from lensjax import load_pretrained
from lensjax.models.v3a import V3AConfig
from lensjax.models.v3a.modeling import sinusoidal_table
from torch_reference_v3a import (
    ProjectionHead,
    Transformer,
    positionalencoding,
    reference_v3a,
    write_v3a_files,
)

SIZES = ["v3a-tiny", pytest.param("v3a", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """released(preset) -> (torch head, torch decoder, their files, the imported model)."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            cfg = V3AConfig.from_preset(preset)
            head, decoder = reference_v3a(cfg, seed=len(cache))
            files = write_v3a_files(head, decoder, tmp_path_factory.mktemp(preset))
            cache[preset] = (head, decoder, files,
                             import_model(family="v3a", preset=preset, **files))
        return cache[preset]

    return get


def _inputs(cfg: V3AConfig, length: int = 11, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 64, cfg.feature_dim, generator=generator)
    ids = torch.randint(0, cfg.vocab_size, (2, length), generator=generator)
    ids[:, 0] = 50256
    return features, ids


@pytest.mark.parametrize("preset", SIZES)
def test_logits_match_the_notebooks_modules(preset, released):
    head, decoder, _, model = released(preset)
    features, ids = _inputs(model.config)
    with torch.no_grad():
        expected = decoder(head(features), ids).transpose(1, 2)  # the notebook's (B, V, T)
    actual = model.logits(features.numpy(), ids.numpy())
    assert actual.dtype == np.float32 and actual.shape == (2, 11, model.config.vocab_size)
    assert_parity(actual, expected)


def test_projection_head_matches_the_notebooks(released):
    head, _, _, model = released("v3a-tiny")
    features, _ = _inputs(model.config)
    with torch.no_grad():
        expected = head(features)
    assert_parity(model.module.projection_head(features.numpy()), expected)


def test_a_fresh_positional_table_is_the_notebooks():
    # Equal up to torch's float32 rounding of position x frequency (~1e-4 at position 2000).
    expected = positionalencoding(2000, 512).numpy()
    actual = sinusoidal_table(2000, 512)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=3e-4)
    np.testing.assert_allclose(actual[:64], expected[:64], rtol=0, atol=1e-5)


def test_kv_cached_greedy_equals_full_recompute(released):
    model = released("v3a-tiny")[3]
    features = _inputs(model.config)[0].numpy()
    cached = model.generate(features, "greedy", max_new_tokens=8, stop_at_period=False,
                            stop_on_repeat=False)
    sequence = np.full((2, 1), 50256)
    for _ in range(8):
        logits = np.asarray(model.logits(features, sequence))[:, -1]
        sequence = np.concatenate([sequence, logits.argmax(-1)[:, None]], axis=1)
    # Rows end at EOS (50256) or token 0; after the end the cached output holds EOS.
    for row, expected in zip(cached, sequence[:, 1:], strict=True):
        ends = np.flatnonzero((expected == 50256) | (expected == 0))
        stop = ends[0] if len(ends) else len(expected)
        np.testing.assert_array_equal(row[:stop], expected[:stop])


def test_default_sampler_is_the_originals_top_k_50_at_temperature_1(released):
    model = released("v3a-tiny")[3]
    features = _inputs(model.config)[0].numpy()
    assert model.family.decoding == {"top_k": 50, "temperature": 1.0, "retry": False,
                                     "stop_at_period": True, "stop_on_repeat": None,
                                     "beam_rule": "v3b"}
    np.testing.assert_array_equal(
        model.generate(features, "topk", max_new_tokens=6, seed=3),
        model.generate(features, "topk", max_new_tokens=6, seed=3, top_k=50, temperature=1.0,
                       retry=False))


def test_save_load_records_the_family(released, tmp_path):
    model = released("v3a-tiny")[3]
    path = model.save(tmp_path / "v3a")
    assert json.loads((path / "lensjax.json").read_text())["family"] == "v3a"
    loaded = load_pretrained(path)
    assert loaded.config == model.config and loaded.family.name == "v3a"
    features, ids = _inputs(model.config)
    np.testing.assert_array_equal(np.asarray(loaded.logits(features.numpy(), ids.numpy())),
                                  np.asarray(model.logits(features.numpy(), ids.numpy())))


def test_export_is_bit_identical_and_loads_strictly_into_the_notebooks_modules(released,
                                                                                tmp_path):
    head, decoder, files, model = released("v3a-tiny")
    checkpoint = model.save(tmp_path / "ckpt")
    written = export_files(checkpoint, tmp_path / "out")
    assert sorted(p.name for p in written.values()) == ["best_decoder.pth",
                                                        "best_projection_head.pth"]
    for component, original in files.items():
        before = torch.load(original, weights_only=True)
        after = torch.load(written[component], weights_only=True)
        assert sorted(after) == sorted(before)
        for key, tensor in before.items():
            assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    cfg = model.config
    fresh_head, fresh_decoder = ProjectionHead(cfg.feature_dim, 32), Transformer(cfg)
    fresh_head.load_state_dict(torch.load(written["projection_head"], weights_only=True),
                               strict=True)
    fresh_decoder.load_state_dict(torch.load(written["decoder"], weights_only=True),
                                  strict=True)


def test_bad_files_are_refused_with_every_problem_listed(released, tmp_path):
    head, decoder, files, _ = released("v3a-tiny")
    with pytest.raises(BridgeError, match="keys are those of the v3a projection head"):
        import_model(family="v3a", preset="v3a-tiny", projection_head=files["projection_head"],
                     decoder=files["projection_head"])
    state = decoder.state_dict()
    del state["output_proj.bias"]
    state["decoder.0.extra"] = torch.zeros(3)
    state["embedding.weight"] = torch.zeros(5, 32)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(BridgeError) as error:
        import_model(family="v3a", preset="v3a-tiny", projection_head=files["projection_head"],
                     decoder=broken)
    message = str(error.value)
    assert "missing key 'output_proj.bias'" in message
    assert "unexpected key 'decoder.0.extra'" in message
    assert "'embedding.weight' has shape (5, 32)" in message
    with pytest.raises(BridgeError, match="missing: decoder"):
        import_model(family="v3a", projection_head=files["projection_head"])
    with pytest.raises(BridgeError, match="not v3a files: perceiver"):
        import_model(family="v3a", perceiver=files["decoder"], **files)


# --- v3a through the commands: extract, train, caption, evaluate, export ----------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """40 synthetic images, features from a v3a-tiny encoder, and a short v3a phase on them."""
    from flax import nnx

    from lensjax import CaptionModel, extract
    from lensjax.data.synthetic import generate
    from lensjax.models.v3a import V3ACaptioner
    from lensjax.train import main as train

    root = tmp_path_factory.mktemp("v3a_run")
    captions = generate(root / "shapes", images=40, seed=0, progress=False)
    encoder = CaptionModel(V3ACaptioner(V3AConfig.from_preset("v3a-tiny"), rngs=nnx.Rngs(0)),
                           {}).save(root / "encoder")
    assert extract.main([str(root / "shapes" / "images"), "--weights", str(encoder), "--out",
                         str(root / "features")]) == 0
    run = root / "run"
    code = train(["--phase", "v3a", "--preset", "v3a-tiny", "--data", str(captions),
                  "--features", str(root / "features"), "--init", f"encoder={encoder}",
                  "--out", str(run), "--batch-size", "8", "--max-len", "16", "--epochs", "3",
                  "--lr", "projection_head=3e-3,decoder=3e-3", "--log-every", "1",
                  "--eval-images", "4", "--quiet"])
    assert code == 0
    return {"root": root, "captions": captions, "run": run}


def test_a_v3a_phase_trains_only_its_components_and_lowers_the_loss(trained):
    run = trained["run"]
    document = json.loads((run / "run.json").read_text())
    assert document["status"] == "done"
    assert document["settings"]["learning_rates"] == {"projection_head": 3e-3, "decoder": 3e-3}
    assert document["settings"]["loss"] == "seed"  # the notebook's loss ignores every 50256
    losses = [r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                                .splitlines()) if "train_loss" in r]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    model = load_pretrained(run / "best")
    encoder = load_pretrained(trained["root"] / "encoder")
    assert model.family.name == "v3a"
    for path, value in model.params.items():
        if path.startswith("encoder") or path == "decoder.positional_encoding":
            np.testing.assert_array_equal(value, encoder.params[path], err_msg=path)
    changed = [p for p, v in model.params.items() if p.startswith(("projection_head", "decoder"))
               and not np.array_equal(v, encoder.params[p])]
    assert "decoder.positional_encoding" not in changed and len(changed) > 10


def test_a_v3a_checkpoint_captions_evaluates_and_exports(trained, tmp_path):
    from lensjax import caption, evaluate

    best, images = trained["run"] / "best", trained["root"] / "shapes" / "images"
    out = tmp_path / "captions.jsonl"
    assert caption.main([str(images), "--weights", str(best), "--out", str(out), "--beam",
                         "--max-new-tokens", "12"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 40 and all(isinstance(r["caption"], str) for r in rows)
    report = tmp_path / "eval"
    assert evaluate.main(["--weights", str(best), "--features",
                          str(trained["root"] / "features"), "--references",
                          str(trained["captions"]), "--format", "flickr", "--split", "all",
                          "--no-coco", "--out", str(report)]) == 0
    assert 0.0 <= json.loads((report / "metrics.json").read_text())["lenstowords_bleu4"] <= 1.0
    written = export_files(best, tmp_path / "exported")
    assert {"projection_head", "decoder", "encoder", "encoder_head"} <= set(written)
    cfg = V3AConfig.from_preset("v3a-tiny")
    Transformer(cfg).load_state_dict(torch.load(written["decoder"], weights_only=True),
                                     strict=True)


def test_v3b_components_are_refused_for_a_v3a_run(trained, tmp_path, capsys):
    from lensjax.train import main as train

    code = train(["--phase", "v3a", "--preset", "v3a-tiny", "--data", str(trained["captions"]),
                  "--features", str(trained["root"] / "features"), "--out", str(tmp_path / "r"),
                  "--lr", "perceiver=1e-4", "--quiet"])
    assert code == 2 and "this model has no perceiver to train" in capsys.readouterr().err


def test_a_phase_refuses_a_model_of_another_family(trained, tmp_path, capsys):
    from lensjax.train import main as train

    code = train(["--phase", "v3a", "--preset", "tiny", "--data", str(trained["captions"]),
                  "--features", str(trained["root"] / "features"), "--out", str(tmp_path / "r"),
                  "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "phase v3a trains the decoder, projection_head of a v3a model" in err
    code = train(["--phase", "demo-all", "--init", f"demo-inject={trained['run'] / 'best'}",
                  "--data", str(trained["captions"]), "--features",
                  str(trained["root"] / "features"), "--out", str(tmp_path / "s"), "--quiet"])
    assert code == 2 and "v3a preset 'v3a-tiny'" in capsys.readouterr().err


def test_a_checkpoint_without_a_family_is_v3b(tmp_path):
    from flax import nnx

    from lensjax import Captioner, CaptionerConfig, CaptionModel

    path = CaptionModel(Captioner(CaptionerConfig.from_preset("tiny"), rngs=nnx.Rngs(0)),
                        {}).save(tmp_path / "old")
    meta = json.loads((path / "lensjax.json").read_text())
    assert meta.pop("family") == "v3b"
    (path / "lensjax.json").write_text(json.dumps(meta))  # as every checkpoint before families
    model = load_pretrained(path)
    assert model.family.name == "v3b" and model.config == CaptionerConfig.from_preset("tiny")
