"""python -m lensjax.train: the phase chain, resume after kill -9, checkpoints that load and
export, and the refusals (bad phase, missing or mismatched init, occupied --out, NaN loss,
missing features). Phases that read images: test_train_from_pixels.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from lensjax import Captioner, CaptionerConfig, CaptionModel, load_pretrained
from lensjax.phases import PHASES
from lensjax.train import main
from train_runs import args as _args
from train_runs import losses as _losses
from train_runs import run_data

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return run_data(tmp_path_factory.mktemp("train_data"))


def test_phase_table_has_every_phase_of_the_original_and_the_demo():
    assert list(PHASES) == ["2a", "2b", "2c", "2d", "3a", "3a-ext", "3b", "recovery", "3c",
                            "v3a", "v1", "v2", "demo-prepend", "demo-inject", "demo-all"]
    assert PHASES["2a"].learning_rates == {"perceiver": 1e-4}  # the README's value
    assert PHASES["2a"].notebook_learning_rates == {"perceiver": 1e-5}
    assert PHASES["2c"].learning_rates == {"xattn": 1e-4}
    assert PHASES["2d"].init == {"perceiver": "2b", "gpt2": "2b", "xattn": "2c"}
    assert (PHASES["2b"].mode, PHASES["2d"].mode) == ("prepend", "inject")
    assert PHASES["recovery"].batch_size == 64 and PHASES["3b"].epochs == 5
    v3a = PHASES["v3a"]  # the notebook's final run; its code cell's single 1e-5 with --notebook-lr
    assert v3a.learning_rates == {"projection_head": 1e-3, "decoder": 1e-5}
    assert v3a.notebook_learning_rates == {"projection_head": 1e-5, "decoder": 1e-5}
    assert (v3a.preset, v3a.mode, v3a.loss) == ("v3a", None, "seed")
    assert (v3a.batch_size, v3a.epochs, v3a.patience) == (64, 50, 7)
    v1, v2 = PHASES["v1"], PHASES["v2"]  # the notebooks' model.fit settings
    assert (v1.learning_rates, v2.learning_rates) == ({"decoder": 1e-3}, {"decoder": 2e-4})
    assert (v1.batch_size, v1.epochs, v1.patience, v2.patience) == (64, 50, 5, 8)
    assert (v1.plateau.factor, v1.plateau.patience, v1.plateau.reload_best) == (0.9, 2, False)
    assert (v2.plateau.factor, v2.plateau.patience, v2.plateau.reload_best) == (0.5, 4, True)
    assert (v1.clip_norm, v2.clip_norm, v2.loss, v1.split) == (None, 0.5, "weighted-words",
                                                               "sklearn")


def test_help_shows_every_phase_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in PHASES:
        assert f"  {name} " in text
    assert "notebook: perceiver 1e-05" in text and "--notebook-lr" in text


def test_seed_curriculum_at_tiny_size_chains_phases_and_freezes_what_the_phase_says(
        data, tmp_path, reference, imported):
    runs = tmp_path / "runs"
    hf_gpt2 = reference("tiny").files["gpt2"]  # a save_pretrained folder, read by the bridge
    common = ["--runs-dir", str(runs), "--preset", "tiny", "--epochs", "1", "--eval-images", "0",
              "--subset", "12"]

    def phase(name, *extra):
        assert main(_args(data, name, runs / name, *common, *extra)) == 0
        return load_pretrained(runs / name / "best").params

    # 2a and 2c start GPT-2 from the public pretrained one: here an HF folder of random weights.
    p2a = phase("2a", "--init", f"gpt2={hf_gpt2}")
    p2b = phase("2b")
    p2c = phase("2c", "--init", f"gpt2={hf_gpt2},2a={runs / '2a'}")
    p2d = phase("2d")
    pretrained = imported("tiny").params
    for path in ("gpt2.wte.embedding", "gpt2.h.1.mlp.c_fc.kernel", "gpt2.ln_f.scale"):
        np.testing.assert_array_equal(p2a[path], pretrained[path])

    def same(a, b, prefix):
        return all(np.array_equal(a[k], b[k]) for k in a if k.startswith(prefix))

    assert not same(p2a, p2b, "perceiver.") and not same(p2a, p2b, "gpt2.h.")
    # 2c starts its Perceiver from 2a, and trains only the cross-attention.
    assert same(p2c, p2a, "perceiver.") and same(p2c, p2a, "gpt2.h.")
    assert not same(p2c, p2a, "gpt2.xattn.")
    # 2d: Perceiver and GPT-2 from 2b, cross-attention from 2c; then all of them train.
    run = json.loads((runs / "2d" / "run.json").read_text())
    assert run["init"]["perceiver"].endswith("2b/best") and run["init"]["xattn"].endswith(
        "2c/best")
    assert run["settings"]["learning_rates"] == {"perceiver": 1e-5, "gpt2": 1e-5, "lm": 1e-5,
                                                 "xattn": 1e-5}
    assert run["status"] == "done" and not same(p2d, p2c, "gpt2.xattn.")
    assert load_pretrained(runs / "2d" / "best").config.mode == "inject"
    # --resume takes the model from latest/, so it needs no earlier phase's output any more.
    import shutil

    shutil.rmtree(runs / "2c")
    assert main(_args(data, "2d", runs / "2d", *common, "--resume")) == 0
    assert load_pretrained(runs / "2b" / "best").config.mode == "prepend"


def test_lr_overrides_the_notebook_rates_and_max_steps(data, tmp_path):
    out = tmp_path / "run"
    assert main(_args(data, "demo-prepend", out, "--epochs", "2", "--eval-images", "0",
                      "--lr", "gpt2=1e-4,perceiver=0", "--lr", "xattn=2e-4",
                      "--subset", "8", "--max-steps", "7", "--log-every", "1")) == 0
    rates = json.loads((out / "run.json").read_text())["settings"]["learning_rates"]
    assert rates == {"gpt2": 1e-4, "lm": 1e-4, "xattn": 2e-4}
    # 40 pairs make 5 batches per epoch; --max-steps 7 ends the phase inside epoch 2.
    assert max(_losses(out)) == 7
    assert json.loads((out / "latest" / "lensjax.json").read_text())["training"]["step"] == 7
    from lensjax.phases import PHASES as phases
    from lensjax.train import learning_rates
    assert learning_rates(phases["2c"], True, []) == {"xattn": 1e-5}
    assert learning_rates(phases["2c"], False, ["lm=3e-6"]) == {"xattn": 1e-4, "lm": 3e-6}


def test_demo_phase_writes_metrics_plot_eval_and_a_checkpoint_that_exports(data, tmp_path,
                                                                           capsys):
    out = tmp_path / "run"
    assert main(_args(data, "demo-prepend", out, "--epochs", "2", "--log-every", "2",
                      "--eval-images", "4", "--plot", "--eval-method", "greedy")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert {"step", "epoch", "train_loss", "lr", "samples_per_s"} <= set(train[0])
    assert [r["epoch"] for r in records if "val_loss" in r] == [1, 2]
    assert records[-1]["event"] == "eval"
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 4 and 0 <= report["lenstowords_bleu4"] <= 1
    assert "corpus_bleu4" in report and len(report["samples"]) == 4
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "LensToWords BLEU-4" in capsys.readouterr().err
    # best/ is a lensjax checkpoint; without an encoder it exports the decoder files.
    from bridge import export_files

    written = export_files(out / "best", tmp_path / "pytorch")
    assert {"perceiver", "gpt2_blocks", "cross_attention"} <= set(written)


def test_kill_minus_9_then_resume_continues_the_same_loss_curve(data, tmp_path):
    # The tiny preset has dropout, so the resumed run must also restore the RNG.
    args = ["--epochs", "3", "--log-every", "1", "--save-every", "3", "--eval-images", "0",
            "--subset", "16", "--preset", "tiny"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(_args(data, "demo-prepend", whole, *args)) == 0
    expected = _losses(whole)

    command = [sys.executable, "-m", "lensjax.train", *_args(data, "demo-prepend", killed,
                                                             *args)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    latest = killed / "latest" / "lensjax.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        # Kill once a checkpoint exists and training has logged steps beyond it.
        if latest.is_file() and max(_losses(killed), default=0) >= json.loads(
                latest.read_text())["training"]["step"] + 2:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    saved = json.loads(latest.read_text())["training"]["step"]
    assert main(_args(data, "demo-prepend", killed, *args)) == 2  # occupied: needs --resume
    assert main(_args(data, "demo-prepend", killed, *args, "--resume")) == 0
    resumed = _losses(killed)
    after = [s for s in sorted(expected) if s > saved][:5]
    assert len(after) == 5
    np.testing.assert_allclose([resumed[s] for s in after], [expected[s] for s in after],
                               rtol=1e-6)
    assert sorted(resumed) == sorted(expected)  # no step logged twice or lost


def test_refusals_name_the_problem(data, tmp_path, capsys):
    def error(*argv):
        code = main(list(argv))
        return code, capsys.readouterr().err

    code, err = error(*_args(data, "demo-inject", tmp_path / "a", "--runs-dir",
                             str(tmp_path / "none")))
    assert code == 2 and "demo-prepend" in err and "--init demo-prepend=" in err

    other = tmp_path / "src-layout"
    CaptionModel(Captioner(CaptionerConfig.from_preset("tiny-src"), rngs=nnx.Rngs(0)),
                 {}).save(other)
    code, err = error(*_args(data, "demo-inject", tmp_path / "b", "--init",
                             f"demo-prepend={other}", "--preset", "demo"))
    assert code == 2 and "layout 'src'" in err and "do not fit" in err

    code, err = error(*_args(data, "2a", tmp_path / "c", "--preset", "tiny"))
    assert code == 2 and "--init gpt2=PATH" in err

    with pytest.raises(SystemExit):
        main(["--phase", "9z"])
    assert "invalid choice: '9z'" in capsys.readouterr().err

    code, err = error(*_args(data, "demo-prepend", tmp_path / "d", "--lr", "decodr=1"))
    assert code == 2 and "unknown component 'decodr'" in err
    code, err = error(*_args(data, "demo-prepend", tmp_path / "d", "--lr", "decoder=1"))
    assert code == 2 and "this model has no decoder to train" in err  # v3a's, not v3b's


def test_images_without_features_are_skipped_or_refused_with_strict(data, tmp_path, capsys):
    captions = data["captions"].read_text().splitlines()
    extra = tmp_path / "captions.txt"
    extra.write_text("\n".join(captions + [f"missing_{i}.png| 0| a red circle ."
                                           for i in range(3)]) + "\n")
    argv = ["--phase", "demo-prepend", "--data", str(extra), "--features",
            str(data["features"]), "--batch-size", "8", "--max-len", "16", "--quiet",
            "--epochs", "1", "--eval-images", "0", "--subset", "8"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "have no features in the cache and are skipped" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "b"), "--strict"]) == 2
    assert "no features in the cache" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    # Adam moves every weight by about lr per step, so a huge rate overflows within steps.
    code = main(_args(data, "demo-prepend", out, "--lr", "perceiver=1e30,gpt2=1e30",
                      "--save-every", "1", "--epochs", "1", "--eval-images", "0"))
    err = capsys.readouterr().err
    assert code == 3 and ("became nan" in err or "became inf" in err)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["reason"].startswith("the training loss became")
    saved = json.loads((out / "latest" / "lensjax.json").read_text())["training"]["step"]
    assert f"at step {saved + 1}" in err and run["saved_step"] == saved == run["step"]
    params = load_pretrained(out / "latest").params
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())


def test_two_processes_with_distributed_give_the_losses_of_one(data, tmp_path):
    import socket

    args = ["--epochs", "1", "--log-every", "1", "--eval-images", "0", "--subset", "8",
            "--preset", "tiny"]
    assert main(_args(data, "demo-prepend", tmp_path / "one", *args)) == 0
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    out = tmp_path / "two"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lensjax.train", *_args(data, "demo-prepend", out, *args),
         "--distributed", "--coordinator", f"localhost:{port}", "--num-processes", "2",
         "--process-id", str(rank)], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE) for rank in (0, 1)]
    errors = [p.communicate(timeout=300)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    run = json.loads((out / "run.json").read_text())
    assert (run["processes"], run["devices"]) == (2, 2)
    one, two = _losses(tmp_path / "one"), _losses(out)
    assert sorted(one) == sorted(two)
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)],
                               atol=1e-5)
    assert load_pretrained(out / "best").params.keys() == load_pretrained(
        tmp_path / "one" / "best").params.keys()
