"""The built-in synthetic set: deterministic per seed, Flickr30k's format, captions that say
what is drawn."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lensjax.data.captions import load_flickr30k
from lensjax.data.synthetic import (
    COLOURS,
    SHAPES,
    describe,
    generate,
    make_scene,
    read_scenes,
)

N = 20


def _digest(out_dir) -> str:
    h = hashlib.sha256()
    for path in sorted((out_dir / "images").iterdir()):
        h.update(path.name.encode())
        h.update(np.asarray(Image.open(path)).tobytes())
    h.update((out_dir / "captions.txt").read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "seed0"
    generate(out, images=N, seed=0, size=96, progress=False)
    return out


def test_same_seed_gives_identical_files_and_another_seed_differs(small_set, tmp_path):
    again = generate(tmp_path / "again", images=N, seed=0, size=96, workers=2, progress=False)
    assert again.read_bytes() == (small_set / "captions.txt").read_bytes()
    assert _digest(tmp_path / "again") == _digest(small_set)
    generate(tmp_path / "other", images=N, seed=1, size=96, progress=False)
    assert _digest(tmp_path / "other") != _digest(small_set)


def test_load_flickr30k_reads_five_captions_per_image(small_set):
    caps = load_flickr30k(small_set / "captions.txt")
    assert list(caps) == [f"{i:06d}.png" for i in range(N)]
    assert all(len(c) == 5 for c in caps.values())
    assert all(c.endswith(" .") for cs in caps.values() for c in cs)
    lines = (small_set / "captions.txt").read_text().splitlines()
    assert lines[0] == "image_name| comment_number| comment"
    assert lines[1].startswith("000000.png| 0| ")


def test_images_decode_at_the_requested_size(small_set):
    for path in sorted((small_set / "images").iterdir()):
        with Image.open(path) as image:
            assert (image.size, image.mode) == ((96, 96), "RGB")


def test_captions_name_the_colours_and_shapes_drawn(small_set):
    caps = load_flickr30k(small_set / "captions.txt")
    for scene in read_scenes(small_set):
        pixels = np.asarray(Image.open(small_set / "images" / scene.name), np.int32)
        first = caps[scene.name][0]
        assert caps[scene.name] == describe(scene)
        assert first.startswith(scene.shapes[0].phrase)  # described left to right
        for shape in scene.shapes:
            assert f"{shape.size} {shape.colour} {shape.kind}" in first
            x0, y0, x1, y1 = shape.box
            centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - np.array(COLOURS[shape.colour])).max() <= 15
            assert shape.kind in SHAPES
        lefts = [s.box[0] for s in scene.shapes]
        assert lefts == sorted(lefts)
        if scene.background == "white":
            assert pixels[0, 0].min() > 200  # a corner is background: no shape touches it


def test_every_shape_and_colour_occurs_in_a_larger_set():
    scenes = [make_scene(0, i, f"{i}.png") for i in range(300)]
    kinds = {s.kind for scene in scenes for s in scene.shapes}
    colours = {s.colour for scene in scenes for s in scene.shapes}
    counts = {len(scene.shapes) for scene in scenes}
    assert kinds == set(SHAPES) and colours == set(COLOURS) and counts == {1, 2, 3}


def test_regenerating_fewer_images_removes_the_stale_ones(tmp_path):
    generate(tmp_path, images=6, seed=0, size=64, progress=False)
    generate(tmp_path, images=3, seed=0, size=64, progress=False)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "000000.png", "000001.png", "000002.png"]
    assert len(load_flickr30k(tmp_path / "captions.txt")) == 3


def test_cli_writes_a_set(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "lensjax.data.synthetic", "--out", str(out), "--images", "4",
         "--seed", "3", "--size", "64", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 4 images" in result.stdout
    assert len(load_flickr30k(out / "captions.txt")) == 4
    reference = tmp_path / "ref"
    generate(reference, images=4, seed=3, size=64, progress=False)
    assert (out / "captions.txt").read_bytes() == (reference / "captions.txt").read_bytes()


def test_cli_help_explains_the_output():
    result = subprocess.run(
        [sys.executable, "-m", "lensjax.data.synthetic", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0
    assert "captions.txt" in result.stdout and "--images" in result.stdout


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"images must be at least 1"):
        generate(tmp_path, images=0, progress=False)
    with pytest.raises(ValueError, match=r"size must be at least 32"):
        generate(tmp_path, images=1, size=8, progress=False)
