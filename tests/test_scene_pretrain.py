"""Scene pretraining of the image encoder (`lensjax.scene_pretrain`): the labels it reads off
scenes, what it trains, and its command line."""

import dataclasses
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from lensjax import load_pretrained
from lensjax.data.synthetic import Scene, Shape, generate
from lensjax.models.families import family_of, preset_config
from lensjax.params import flat_params
from lensjax.scene_pretrain import (
    PretrainSettings,
    SceneProbe,
    SceneTargets,
    held_out_accuracy,
    main,
    pretrain,
    scene_targets,
)


def _scene(*shapes: Shape, background: str = "gray") -> Scene:
    return Scene("x.png", background, shapes)


def test_a_small_shape_labels_the_cell_of_its_box_centre_only():
    # 80 px image, 8x8 grid: 10 px cells with centres at 5, 15, ...; the box (22, 31)-(28, 37)
    # covers no cell centre, so only the cell of its centre (row 3, column 2) is labelled.
    targets = scene_targets([_scene(Shape("star", "blue", "small", (22, 31, 28, 37)))], 8, 80)
    kind = targets.kind.reshape(8, 8)
    assert kind[3, 2] == 1 + 3 and (kind > 0).sum() == 1  # star is the 4th kind
    assert targets.colour.reshape(8, 8)[3, 2] == 1 + 2  # blue the 3rd colour
    assert targets.size.reshape(8, 8)[3, 2] == 1  # small
    assert targets.place.reshape(8, 8)[3, 2] == 1 and targets.place.sum() == 1
    assert targets.centre.reshape(8, 8)[3, 2] and targets.centre.sum() == 1
    assert targets.background.tolist() == [1]  # gray
    assert targets.count.tolist() == [1]
    assert targets.slot_kind.tolist() == [[4, 0, 0]] and targets.slot_colour.tolist() == [[3, 0, 0]]


def test_a_large_shape_labels_every_cell_whose_centre_it_covers():
    # box x 10..40, y 0..20 covers centres x 15, 25, 35 and y 5, 15: 2 rows x 3 columns.
    targets = scene_targets([_scene(Shape("circle", "red", "large", (10, 0, 40, 20)),
                                    Shape("square", "green", "small", (60, 60, 70, 70)),
                                    background="black")], 8, 80)
    kind = targets.kind.reshape(8, 8)
    assert (kind[:2, 1:4] == 1).all() and (kind == 1).sum() == 6
    assert kind[6, 6] == 2 and (kind == 2).sum() == 1
    assert (targets.size.reshape(8, 8)[:2, 1:4] == 2).all()
    # each shape weighs one in the loss, however many cells it covers
    weight = targets.weight.reshape(8, 8)
    np.testing.assert_allclose(weight[:2, 1:4], 1 / 6)
    assert weight[6, 6] == 1 and weight.sum() == pytest.approx(2)
    assert targets.centre.sum() == 2 and targets.background.tolist() == [2]
    # places from the left follow the scene's order (left to right)
    place = targets.place.reshape(8, 8)
    assert (place[:2, 1:4] == 1).all() and place[6, 6] == 2 and (place > 0).sum() == 7
    assert targets.count.tolist() == [2]
    # the Perceiver's first latents read the shapes from the left; 0 where there is none
    assert targets.slot_kind.tolist() == [[1, 2, 0]]  # circle, square
    assert targets.slot_colour.tolist() == [[1, 2, 0]]  # red, green
    assert targets.slot_size.tolist() == [[2, 1, 0]]  # large, small
    assert targets.slot_place.tolist() == [[1, 2, 0]]


def test_targets_keep_the_order_and_rows_of_their_scenes():
    scenes = [_scene(Shape("triangle", "yellow", "small", (0, 0, 8, 8)), background="white"),
              _scene()]
    targets = scene_targets(scenes, 4, 16)
    assert targets.kind.shape == (2, 16) and targets.kind[1].sum() == 0
    picked = targets.rows(np.array([1]))
    assert isinstance(picked, SceneTargets) and picked.background.tolist() == [1]
    assert targets.count.tolist() == [1, 0] and picked.count.tolist() == [0]


def test_pretraining_moves_only_the_encoder_head_and_perceiver_and_lowers_the_loss():
    cfg = dataclasses.replace(preset_config("tiny"), image_size=64)
    captioner = family_of(cfg).module(cfg, rngs=nnx.Rngs(0))
    before = {k: np.asarray(v) for k, v in flat_params(captioner).items()}
    rng = np.random.default_rng(0)
    scenes = [_scene(Shape("square", "red", "large", (8, 8, 40, 40)), background="white")] * 8
    pixels = np.full((8, 64, 64, 3), 240, np.uint8)
    pixels[:, 8:40, 8:40] = (215, 40, 40)
    pixels = np.clip(pixels + rng.integers(-5, 5, pixels.shape), 0, 255).astype(np.uint8)
    targets = scene_targets(scenes, 8, 64)
    probe, losses = pretrain(captioner, pixels, targets,
                             PretrainSettings(steps=30, batch_size=4, warmup=5), progress=False)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    after = flat_params(captioner)
    moved = {k for k in before if not np.array_equal(before[k], np.asarray(after[k]))}
    assert moved and all(k.startswith(("encoder.", "encoder_head.", "perceiver.")) for k in moved)
    assert all(any(k.startswith(f"{group}.") for k in moved)
               for group in ("encoder", "encoder_head", "perceiver"))
    accuracy = held_out_accuracy(probe, pixels, targets)
    assert accuracy["background"] == 1.0 and accuracy["count"] == 1.0 and set(accuracy) == {
        "kind", "colour", "size", "place", "background", "count", "empty", "latents"}


def test_cli_writes_a_captioner_checkpoint_at_its_image_size(tmp_path, capsys):
    generate(tmp_path / "set", images=40, seed=0, size=64, progress=False)
    out = tmp_path / "encoder"
    assert main([str(tmp_path / "set"), "--out", str(out), "--preset", "tiny",
                 "--image-size", "64", "--steps", "3", "--batch-size", "4", "--quiet"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    model = load_pretrained(out)
    assert model.config.image_size == 64
    provenance = model.metadata["provenance"]
    assert provenance["steps"] == 3 and set(provenance["held_out_accuracy"]) >= {"kind"}
    assert model.encode(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 64, 48)
    # refuses to overwrite (before training), a preset without an encoder, and names a set
    # without scenes
    assert main([str(tmp_path / "set"), "--out", str(out), "--steps", "1", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([str(tmp_path / "set"), "--out", str(tmp_path / "c"), "--preset", "clip-tiny",
                 "--quiet"]) == 2
    assert "no ConvNeXt encoder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "scenes.jsonl" in capsys.readouterr().err


def test_a_perceiver_with_no_latent_left_for_the_background_is_refused():
    cfg = preset_config("tiny")
    cfg = dataclasses.replace(cfg, perceiver=dataclasses.replace(cfg.perceiver, num_latents=3))
    captioner = family_of(cfg).module(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="more than 3 latents"):
        SceneProbe(captioner, rngs=nnx.Rngs(0))


def test_the_perceiver_learns_at_its_own_rate():
    # --perceiver-lr 0 leaves the Perceiver bit-identical while the encoder trains: the
    # optimizer's partition gives the Perceiver and its read-outs their own rate.
    cfg = dataclasses.replace(preset_config("tiny"), image_size=32)
    captioner = family_of(cfg).module(cfg, rngs=nnx.Rngs(0))
    before = {k: np.asarray(v) for k, v in flat_params(captioner).items()}
    scenes = [_scene(Shape("circle", "blue", "large", (4, 4, 20, 20)))] * 4
    pixels = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    pretrain(captioner, pixels, scene_targets(scenes, 8, 32),
             PretrainSettings(steps=3, batch_size=2, warmup=1, perceiver_learning_rate=0.0),
             progress=False)
    after = flat_params(captioner)
    moved = {k for k in before if not np.array_equal(before[k], np.asarray(after[k]))}
    assert any(k.startswith("encoder.") for k in moved)
    assert not any(k.startswith("perceiver.") for k in moved)


def test_two_devices_split_each_batch_and_give_one_devices_losses():
    script = textwrap.dedent("""
        import os, sys
        if sys.argv[1] == "2":
            os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
        import dataclasses, json, jax, numpy as np
        jax.config.update("jax_default_matmul_precision", "highest")
        from flax import nnx
        from lensjax.data.synthetic import Scene, Shape
        from lensjax.models.families import family_of, preset_config
        from lensjax.scene_pretrain import PretrainSettings, pretrain, scene_targets
        cfg = dataclasses.replace(preset_config("tiny"), image_size=32)
        captioner = family_of(cfg).module(cfg, rngs=nnx.Rngs(0))
        scene = Scene("x.png", "gray", (Shape("circle", "blue", "large", (4, 4, 20, 20)),))
        pixels = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
        probe, losses = pretrain(captioner, pixels, scene_targets([scene] * 6, 8, 32),
                                 PretrainSettings(steps=6, batch_size=4, warmup=1),
                                 progress=False)
        print(json.dumps([len(jax.devices()), losses]))
    """)
    runs = [json.loads(subprocess.run(
        [sys.executable, "-c", script, devices], capture_output=True, text=True, check=True,
        timeout=600).stdout.splitlines()[-1]) for devices in ("1", "2")]
    assert [devices for devices, _ in runs] == [1, 2]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-4)
