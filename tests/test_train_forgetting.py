"""python -m lensjax.train's remedies for forgetting (--lora, --mix, --ewc) as a user runs
them: what run.json and the checkpoints hold, per-source validation, resume, the merged
export, and the refusals."""

import json
import os

import numpy as np
import pytest

from lensjax import lora
from lensjax.checkpoint import load_checkpoint, load_extra
from lensjax.data.cache import FeatureCache
from lensjax.data.synthetic import generate
from lensjax.models.families import config_from_metadata
from lensjax.params import flat_params, new_module
from lensjax.train import main

FEATURE_DIM = 48  # the tiny preset's


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """40 synthetic images with random features; domain A = their templated captions, domain
    B = one short caption per image in other words."""
    root = tmp_path_factory.mktemp("domains")
    a = generate(root / "shapes", images=40, seed=0, progress=False)
    names = sorted(os.listdir(root / "shapes" / "images"))
    b = root / "social.txt"
    b.write_text("image_name| comment_number| comment\n" + "".join(
        f"{name}| 0| loving these shapes today number {i % 7} !\n"
        for i, name in enumerate(names)))
    rng = np.random.default_rng(0)
    with FeatureCache.create(root / "features", 2, shape=(64, FEATURE_DIM)) as writer:
        for name in names:
            writer.put(name, rng.standard_normal((64, FEATURE_DIM)).astype(np.float16))
    return {"a": a, "b": b, "features": root / "features"}


def _args(domains, out, *extra):
    return ["--phase", "demo-all", "--init", "perceiver=fresh,gpt2=fresh,xattn=fresh",
            "--preset", "tiny", "--features", str(domains["features"]), "--out", str(out),
            "--batch-size", "8", "--max-len", "16", "--quiet", "--eval-images", "0",
            "--log-every", "1", *extra]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_with_mixed_batches_trains_adapters_only_and_exports_merged(domains, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    assert main(_args(domains, out, "--data", f"b={domains['b']}", f"a={domains['a']}",
                      "--mix", "b=1,a=1", "--lora", "rank=2,alpha=4", "--epochs", "1")) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["lora"] == {"rank": 2, "alpha": 4.0,
                                "targets": ["c_attn", "c_proj", "c_fc", "xattn"]}
    assert settings["learning_rates"] == {"lora": pytest.approx(10 * 3e-3)}
    assert settings["mix"] == {"b": 0.5, "a": 0.5}
    # The epoch is the target's: 36 training captions of B at 4 rows per batch of 8.
    assert max(r["step"] for r in _records(out) if "train_loss" in r) == 9
    by_source = [r["val_loss_by_source"] for r in _records(out) if "val_loss_by_source" in r]
    assert len(by_source) == 1 and set(by_source[0]) == {"a", "b"}
    # Base weights as initialised (fresh, seed 0); adapters apart in lora/.
    saved, metadata = load_checkpoint(out / "best", merge_lora=False)
    cfg = config_from_metadata(metadata)
    fresh = {k: np.asarray(v) for k, v in flat_params(new_module(cfg, 0)).items()}
    base, adapters = lora.split_adapters(saved)
    assert set(base) == set(fresh)
    assert all(base[p].tobytes() == fresh[p].tobytes() for p in fresh)
    assert adapters and (out / "best" / lora.TREE).is_dir()
    assert metadata["lora"] == settings["lora"]

    from bridge import export_files, import_model
    from bridge.io import BridgeError
    from lensjax import load_pretrained

    with pytest.raises(BridgeError, match="--merge-lora"):
        export_files(out / "best", tmp_path / "pytorch")
    written = export_files(out / "best", tmp_path / "pytorch", merge_lora=True)
    back = import_model(perceiver=written["perceiver"], gpt2_blocks=written["gpt2_blocks"],
                        cross_attention=written["cross_attention"],
                        gpt2=written["gpt2"].parent, preset="tiny")
    model = load_pretrained(out / "best")
    features = np.random.default_rng(1).standard_normal((2, 64, FEATURE_DIM), np.float32)
    ids = np.array([[50256, 64, 2266], [50256, 11, 5]])
    np.testing.assert_allclose(np.asarray(back.logits(features, ids)),
                               np.asarray(model.logits(features, ids)), rtol=1e-5, atol=1e-5)


def test_ewc_with_mixed_batches_resumes_to_the_uninterrupted_losses(domains, tmp_path,
                                                                   monkeypatch):
    common = ["--data", f"b={domains['b']}", f"a={domains['a']}", "--mix", "b=0.75,a=0.25",
              "--ewc", "50", "--ewc-data", str(domains["a"]), "--ewc-batches", "2",
              "--epochs", "2", "--save-every", "3"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(_args(domains, whole, *common)) == 0
    anchor, _ = load_checkpoint(whole / "ewc")
    fisher = load_extra(whole / "ewc", "fisher")
    assert set(anchor) == set(fisher) and all(np.all(f >= 0) for f in fisher.values())
    from lensjax.train.step import Trainer

    step, calls = Trainer.step, []

    def interrupted_at_5(self, state, batch):  # Ctrl-C arriving during step 5
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(self, state, batch)

    monkeypatch.setattr(Trainer, "step", interrupted_at_5)
    assert main(_args(domains, split, *common)) == 130
    monkeypatch.setattr(Trainer, "step", step)
    assert json.loads((split / "latest" / "lensjax.json").read_text())["training"]["step"] == 3
    assert main(_args(domains, split, *common, "--resume")) == 0
    losses = {r["step"]: r["train_loss"] for r in _records(whole) if "train_loss" in r}
    resumed = {r["step"]: r["train_loss"] for r in _records(split) if "train_loss" in r}
    assert sorted(resumed) == sorted(losses) and len(losses) > 6
    np.testing.assert_allclose([resumed[s] for s in sorted(losses)],
                               [losses[s] for s in sorted(losses)], rtol=1e-6)


@pytest.mark.parametrize(("extra", "names"), [
    (["--mix", "a=1,b=1"], "no --data source is named a"),
    (["--ewc", "10"], "--ewc needs --ewc-data"),
    (["--lr", "lora=1e-3"], "without --lora"),
    (["--lora", "targets=c_atn"], "c_atn"),
    (["--lora", "rank=0"], "rank"),
    (["--mix", "a=-1"], "--mix"),
    (["--val-data", "a={a}"], "needs --mix"),
    (["--ewc-data", "{a}"], "without --ewc"),
])
def test_refusals_name_the_problem(domains, tmp_path, capsys, extra, names):
    extra = [e.format(a=domains["a"]) for e in extra]
    assert main(_args(domains, tmp_path / "run", "--data", str(domains["a"]), *extra)) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
