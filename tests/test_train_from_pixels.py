"""python -m lensjax.train on phases that train the image encoder: they read the image files
(--images), train only the components asked for, resume exactly, and refuse what cannot
work."""

import json

import numpy as np
import pytest
from flax import nnx

from lensjax import Captioner, CaptionerConfig, CaptionModel, load_pretrained
from lensjax.train import main
from train_runs import args as _args
from train_runs import losses as _losses
from train_runs import run_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return run_data(tmp_path_factory.mktemp("pixels_data"))


def _pixel_args(data, phase, out, *extra):
    return ["--phase", phase, "--data", str(data["captions"]), "--images",
            str(data["root"] / "shapes" / "images"), "--out", str(out), "--batch-size", "8",
            "--max-len", "16", "--quiet", "--eval-images", "0", "--image-size", "32", *extra]


def _changed(a: dict, b: dict, prefix: str) -> bool:
    return any(not np.array_equal(a[k], b[k]) for k in a if k.startswith(prefix))


def test_encoder_phase_reads_pixels_and_trains_only_the_components_asked_for(data, tmp_path):
    runs = tmp_path / "runs"
    first, second = runs / "demo-prepend", runs / "demo-inject"
    # From scratch: the encoder and its head train with the decoder, from the image files.
    assert main(_pixel_args(data, "demo-prepend", first, "--init", "encoder=fresh",
                            "--lr", "encoder=1e-3,encoder_head=1e-3", "--max-steps", "3")) == 0
    run = json.loads((first / "run.json").read_text())
    assert run["settings"]["from_pixels"] and run["settings"]["image_size"] == 32
    assert set(run["settings"]["learning_rates"]) == {"encoder", "encoder_head", "perceiver",
                                                      "gpt2", "lm"}
    trained = load_pretrained(first / "best")
    assert trained.config.image_size == 32  # captioning resizes image files to 32 px
    # Then only the head and the cross-attention train: the rest must not move.
    assert main(_pixel_args(data, "demo-inject", second, "--runs-dir", str(runs),
                            "--lr", "encoder_head=1e-3", "--max-steps", "2")) == 0
    before, after = trained.params, load_pretrained(second / "best").params
    assert not _changed(before, after, "encoder.") and _changed(before, after, "encoder_head.")
    assert not _changed(before, after, "perceiver.") and not _changed(before, after, "gpt2.h.")
    assert _changed(before, after, "gpt2.xattn.")
    # The trained encoder exports as the original's two encoder files, which import back.
    from bridge import export_files, import_model

    written = export_files(second / "best", tmp_path / "pytorch")
    back = import_model(encoder=written["encoder"], encoder_head=written["encoder_head"],
                        perceiver=written["perceiver"], gpt2_blocks=written["gpt2_blocks"],
                        cross_attention=written["cross_attention"],
                        gpt2=written["gpt2"].parent, preset="demo")
    for path in ("encoder.stem.0.kernel", "encoder_head.projections.0.kernel"):
        np.testing.assert_array_equal(back.params[path], after[path])


def test_an_encoder_from_a_checkpoint_brings_its_image_size(data, tmp_path):
    # An encoder trained at 48 px (scene pretraining, say) captions at 48 px after a features
    # phase that only borrows it.
    encoder = tmp_path / "encoder"
    cfg = CaptionerConfig.from_preset("demo", image_size=48)
    CaptionModel(Captioner(cfg, rngs=nnx.Rngs(0))).save(encoder)
    out = tmp_path / "run"
    assert main(_args(data, "demo-prepend", out, "--init", f"encoder={encoder}",
                      "--max-steps", "1", "--eval-images", "0")) == 0
    trained = load_pretrained(out / "best")
    assert trained.config.image_size == 48
    np.testing.assert_array_equal(trained.params["encoder.stem.0.kernel"],
                                  load_pretrained(encoder).params["encoder.stem.0.kernel"])


def test_encoder_phase_resumed_gives_the_losses_of_an_uninterrupted_one(data, tmp_path):
    # 5 images' 25 captions make 3 batches an epoch: the stopped run ends with epoch 1 (a
    # phase ended by --max-steps goes on with the next epoch when resumed).
    args = ["--init", "encoder=fresh", "--lr", "encoder=1e-3,encoder_head=1e-3",
            "--log-every", "1", "--subset", "5"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(_pixel_args(data, "demo-prepend", whole, *args, "--max-steps", "6")) == 0
    assert main(_pixel_args(data, "demo-prepend", stopped, *args, "--max-steps", "3")) == 0
    assert main(_pixel_args(data, "demo-prepend", stopped, *args, "--max-steps", "6",
                            "--resume")) == 0
    np.testing.assert_allclose([_losses(stopped)[s] for s in range(1, 7)],
                               [_losses(whole)[s] for s in range(1, 7)], rtol=1e-6)


def test_encoder_phase_refusals(data, tmp_path, capsys):
    code = main(_args(data, "demo-prepend", tmp_path / "a", "--lr", "encoder=1e-3"))
    # Captions given with --data need their image folder named (not the phase's default).
    assert code == 2 and "reads images, not features" in capsys.readouterr().err
    code = main(_pixel_args(data, "demo-prepend", tmp_path / "b", "--lr", "encoder=1e-3"))
    assert code == 2 and "--init encoder=" in capsys.readouterr().err
    code = main(_pixel_args(data, "demo-prepend", tmp_path / "c", "--init", "encoder=fresh",
                            "--images", str(tmp_path / "nowhere")))
    assert code == 2 and "does not exist" in capsys.readouterr().err
