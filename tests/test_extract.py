"""python -m lensjax.extract: features equal the model's, bad images skipped, resumable."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lensjax import Captioner, CaptionerConfig, CaptionModel
from lensjax.data.cache import FeatureCache
from lensjax.data.images import load_image
from lensjax.extract import extract
from lensjax.extract import main as extract_cli


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = CaptionModel(Captioner(CaptionerConfig.from_preset("tiny"), rngs=nnx.Rngs(0)))
    model.save(path)
    return path, model


def _images(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / f"{index:04d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_cache_holds_the_encoder_output_for_each_file(tiny_checkpoint, tmp_path):
    _, model = tiny_checkpoint
    paths = _images(tmp_path / "images", 5)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG broken")
    paths.insert(2, tmp_path / "images" / "broken.png")
    written, errors = extract(model, paths, tmp_path / "cache", shards=2, batch_size=4,
                              progress=False)
    assert written == 5
    assert [e.args[0].split(":")[0] for e in errors] == [str(paths[2])]
    with FeatureCache(tmp_path / "cache") as cache:
        assert len(cache) == 5 and "broken.png" not in cache
        batch = np.zeros((4, 224, 224, 3), np.float32)  # the same padded batch as extract's
        batch[:2] = [load_image(p) for p in paths[:2]]
        direct = np.asarray(model.encode(batch))
        for row, path in enumerate(paths[:2]):
            np.testing.assert_array_equal(cache[path.name], direct[row].astype(np.float16))


def test_cli_exit_status_and_skips_on_rerun(tiny_checkpoint, tmp_path, capsys):
    checkpoint, _ = tiny_checkpoint
    _images(tmp_path / "images", 3)
    args = [str(tmp_path / "images"), "--weights", str(checkpoint), "--out",
            str(tmp_path / "cache"), "--shards", "2"]
    assert extract_cli(args) == 0
    assert extract_cli(args) == 0
    assert "3 of 3 images already in" in capsys.readouterr().out
    (tmp_path / "images" / "bad.jpg").write_text("nope")
    os.mkfifo(tmp_path / "images" / "pipe.png")  # never opened: it would block forever
    assert extract_cli(args) == 1
    err = capsys.readouterr().err
    assert "bad.jpg: not an image file" in err and "pipe.png: a FIFO (named pipe)" in err


def test_duplicate_file_names_are_refused(tiny_checkpoint, tmp_path, capsys):
    checkpoint, _ = tiny_checkpoint
    _images(tmp_path / "a", 1)
    _images(tmp_path / "b", 1)
    code = extract_cli([str(tmp_path / "a"), str(tmp_path / "b"), "--weights", str(checkpoint),
                        "--out", str(tmp_path / "cache")])
    assert code == 2
    assert "occur more than once (0000.png)" in capsys.readouterr().err


def test_checkpoint_without_encoder_is_refused(tmp_path, capsys):
    cfg = CaptionerConfig.from_preset("tiny", encoder=None, head=None)
    CaptionModel(Captioner(cfg, rngs=nnx.Rngs(0))).save(tmp_path / "noenc")
    _images(tmp_path / "images", 1)
    code = extract_cli([str(tmp_path / "images"), "--weights", str(tmp_path / "noenc"),
                        "--out", str(tmp_path / "cache")])
    assert code == 2
    assert "no image encoder" in capsys.readouterr().err


# Runs the CLI and SIGKILLs its own process right after the second commit of the cache.
KILLED_AFTER_TWO_COMMITS = """
import os, signal, sys
from lensjax.data.cache import FeatureCacheWriter
from lensjax.extract import main

commit, commits = FeatureCacheWriter.commit, []

def commit_then_die(self):
    commit(self)
    commits.append(1)
    if len(commits) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

FeatureCacheWriter.commit = commit_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_extraction_then_resume_loses_and_duplicates_nothing(tiny_checkpoint,
                                                                        tmp_path):
    """The run is killed with SIGKILL right after its second commit (4 images, in batches of
    2 committed every 2); a rerun of the same command completes the cache."""
    checkpoint, model = tiny_checkpoint
    paths = _images(tmp_path / "images", 9)
    args = [*map(str, paths), "--weights", str(checkpoint), "--out", str(tmp_path / "cache"),
            "--shards", "3", "--batch-size", "2", "--commit-every", "2", "--threads", "2"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_COMMITS, *args],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with FeatureCache(tmp_path / "cache") as cache:
        assert sorted(cache.keys()) == [p.name for p in paths[:4]]
    result = subprocess.run([sys.executable, "-m", "lensjax.extract", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "4 of 9 images already in" in result.stdout
    with FeatureCache(tmp_path / "cache") as cache:
        assert sorted(cache.keys()) == sorted(p.name for p in paths)
        assert len(cache) == 9
        batch = np.zeros((2, 224, 224, 3), np.float32)
        batch[0] = load_image(paths[8])
        expected = np.asarray(model.encode(batch))[0]
        np.testing.assert_array_equal(cache[paths[8].name], expected.astype(np.float16))


def test_v1_and_v2_features_come_from_keras_inception_weights_without_a_checkpoint(
        tmp_path, capsys):
    """`--family v1|v2 --inception FILE`: Keras' own InceptionV3 output on the same resized
    pixels (pooled for v1, mixed10's 64 patches for v2), stored as float16."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    from lensjax.data.images import resize

    reference = keras.applications.InceptionV3(weights=None, include_top=False)
    with h5py.File(tmp_path / "inception.h5", "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    paths = _images(tmp_path / "images", 2)
    pixels = np.stack([resize(Image.open(p).convert("RGB"), 299) for p in paths])
    mixed10 = reference.predict(pixels.astype(np.float32) / 127.5 - 1.0, verbose=0)
    for family, expected in (("v1", mixed10.mean(axis=(1, 2))),
                             ("v2", mixed10.reshape(2, 64, 2048))):
        out = tmp_path / f"features_{family}"
        assert extract_cli([str(tmp_path / "images"), "--family", family, "--inception",
                            str(tmp_path / "inception.h5"), "--out", str(out), "--shards", "1",
                            "--batch-size", "2"]) == 0
        with FeatureCache(out) as cache:
            got = cache.get_batch([p.name for p in paths]).astype(np.float32)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=2e-3,
                                   atol=2e-3 * (1 + np.abs(expected).max()))
    with pytest.raises(SystemExit) as exit_:
        extract_cli([str(tmp_path / "images"), "--family", "v1", "--weights",
                     str(tmp_path / "ckpt"), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "--family and --inception go together" in capsys.readouterr().err


def test_inception_weights_that_are_not_a_weights_file_are_one_error_line(tmp_path, capsys):
    _images(tmp_path / "images", 1)
    (tmp_path / "inception.h5").write_text("not hdf5")
    assert extract_cli([str(tmp_path / "images"), "--family", "v2", "--inception",
                        str(tmp_path / "inception.h5"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "not an HDF5 file" in err
    assert not (tmp_path / "out").exists()
