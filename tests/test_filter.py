"""python -m lensjax.filter: CLIP scores of Instagram-style pairs, the threshold, resuming
after a kill, and bad inputs. A random tiny CLIP and generated images: the scores are
meaningless, the bookkeeping is what is pinned."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from flax import nnx

from lensjax.clip import ClipModel
from lensjax.data.captions import load_instagram
from lensjax.data.synthetic import describe, generate, read_scenes
from lensjax.filter import clip_scores, main
from lensjax.models.clip import CLIP, CLIPConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    generate(root / "shapes", images=10, seed=0, progress=False)
    weights = ClipModel(CLIP(CLIPConfig.from_preset("clip-tiny"), rngs=nnx.Rngs(0))).save(
        root / "clip")
    scenes = read_scenes(root / "shapes")
    rows = [(s.name, describe(s)[0]) for s in scenes]  # each image with its own caption
    rows += [(scenes[0].name, "an unrelated caption about a beach #sunset"),
             ("absent.png", "an image that is not there"), ("notes.png", "not an image")]
    (root / "shapes" / "images" / "notes.png").write_text("plain text, not a PNG")
    data = root / "posts.csv"
    with open(data, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("Image File", "Caption"), *rows, ("empty.png", "")])
    return {"root": root, "weights": weights, "data": data, "rows": rows,
            "images": root / "shapes" / "images"}


def _run(setup, out, *extra):
    return main(["--data", str(setup["data"]), "--images", str(setup["images"]), "--weights",
                 str(setup["weights"]), "--out", str(out), "--batch-size", "4", "--quiet",
                 *extra])


def _scores(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_scores_equal_clip_scores_and_the_threshold_keeps_ties(setup, tmp_path):
    out = tmp_path / "filtered.csv"
    assert _run(setup, out, "--threshold", "-1") == 0
    rows = _scores(tmp_path / "scores.csv")
    assert [(r["image_name"], r["caption"]) for r in rows] == setup["rows"]
    scored = [r for r in rows if r["score"]]
    assert [r["image_name"] for r in rows if not r["score"]] == ["absent.png", "notes.png"]
    expected = clip_scores([setup["images"] / r["image_name"] for r in scored],
                           [r["caption"] for r in scored], setup["weights"])
    np.testing.assert_allclose([float(r["score"]) for r in scored], expected, atol=1e-6)
    # A pair scoring exactly the threshold is kept; anything below it is dropped.
    tie = sorted(float(r["score"]) for r in scored)[5]
    again = tmp_path / "again" / "filtered.csv"
    assert _run(setup, again, "--threshold", repr(tie)) == 0
    kept = load_instagram(again)
    assert sum(len(c) for c in kept.values()) == 6
    report = json.loads((again.parent / "filter.json").read_text())
    assert (report["kept"], report["dropped"], report["missing"]) == (6, 5, 2)
    assert report["missing_images"] == ["absent.png", "notes.png"]
    assert report["empty_captions"] == 1  # the posts.csv row of empty.png
    assert report["empty_caption_rows"] == [f"{setup['data']}:15"]
    assert (again.parent / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_a_killed_run_resumes_without_recomputing_and_ends_the_same(setup, tmp_path, capsys):
    whole = tmp_path / "whole" / "filtered.csv"
    assert _run(setup, whole) == 0
    killed = tmp_path / "killed" / "filtered.csv"
    killed.parent.mkdir()
    lines = (whole.parent / "scores.csv").read_text().splitlines(keepends=True)
    # What a kill leaves: the header, five rows, and half a row.
    (killed.parent / "scores.csv").write_text("".join(lines[:6]) + lines[6][:7])
    capsys.readouterr()
    assert _run(setup, killed) == 0
    assert "resuming: 5 of 13 pairs already scored" in capsys.readouterr().err
    resumed = (killed.parent / "scores.csv").read_text().splitlines(keepends=True)
    assert resumed[:6] == lines[:6]  # what was scored is kept, not recomputed
    ours, theirs = _scores(killed.parent / "scores.csv"), _scores(whole.parent / "scores.csv")
    assert [(r["index"], r["image_name"], r["caption"]) for r in ours] == [
        (r["index"], r["image_name"], r["caption"]) for r in theirs]
    np.testing.assert_allclose([float(r["score"] or "nan") for r in ours],
                               [float(r["score"] or "nan") for r in theirs], atol=1e-6)
    assert killed.read_text() == whole.read_text()


def test_strict_and_bad_inputs_are_named(setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(setup, tmp_path / "n.csv", "--threshold", "nan")
    assert exit_.value.code == 2 and "must be a finite number" in capsys.readouterr().err
    assert _run(setup, tmp_path / "s" / "f.csv", "--strict") == 2
    assert "absent.png" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("name,words\na.png,hello\n")
    assert main(["--data", str(bad), "--images", str(setup["images"]), "--weights",
                 str(setup["weights"]), "--out", str(tmp_path / "b.csv"), "--quiet"]) == 2
    assert "unknown Instagram CSV layout" in capsys.readouterr().err
    latin = tmp_path / "latin.csv"
    latin.write_bytes("Image File,Caption\na.png,caf\xe9\n".encode("latin-1"))
    assert main(["--data", str(latin), "--images", str(setup["images"]), "--weights",
                 str(setup["weights"]), "--out", str(tmp_path / "c.csv"), "--quiet"]) == 2
    assert "UTF-8" in capsys.readouterr().err
    other = tmp_path / "other" / "filtered.csv"
    other.parent.mkdir()
    (other.parent / "scores.csv").write_text("index,image_name,caption,score\n0,x.png,y,0.1\n")
    assert _run(setup, other) == 2
    assert "holds scores of other data" in capsys.readouterr().err


def test_a_clip_checkpoint_is_refused_as_a_captioner_and_a_captioner_as_clip(setup, tmp_path,
                                                                              capsys):
    from lensjax import Captioner, CaptionerConfig, CaptionModel, caption
    from lensjax.filter import FilterError, _model

    assert caption.main([str(setup["images"]), "--weights", str(setup["weights"])]) == 2
    assert "is a CLIP checkpoint" in capsys.readouterr().err
    captioner = CaptionModel(Captioner(CaptionerConfig.from_preset("tiny"), rngs=nnx.Rngs(0)),
                             {}).save(tmp_path / "v3b")
    with pytest.raises(FilterError, match="is a v3b captioner, not a CLIP checkpoint"):
        _model(captioner)


def test_kill_9_then_resume_gives_the_outputs_of_one_run(setup, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = setup["rows"][:10] * 30  # 300 pairs, one per batch: long enough to be killed
    data = tmp_path / "many.csv"
    with open(data, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("image_name", "caption"), *rows])
    args = ["--data", str(data), "--images", str(setup["images"]), "--weights",
            str(setup["weights"]), "--batch-size", "1", "--quiet"]
    killed = tmp_path / "killed" / "filtered.csv"
    process = subprocess.Popen([sys.executable, "-m", "lensjax.filter", *args, "--out",
                                str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    scores = killed.parent / "scores.csv"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if scores.is_file() and scores.read_text().count("\n") > 20:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = scores.read_text().count("\n") - 1
    assert 20 <= before < len(rows) and not killed.exists()
    assert main([*args, "--out", str(killed)]) == 0
    whole = tmp_path / "whole" / "filtered.csv"
    assert main([*args, "--out", str(whole)]) == 0
    assert killed.read_text() == whole.read_text()
    ours, theirs = _scores(scores), _scores(whole.parent / "scores.csv")
    assert [r["index"] for r in ours] == [str(i) for i in range(len(rows))]
    np.testing.assert_allclose([float(r["score"]) for r in ours],
                               [float(r["score"]) for r in theirs], atol=1e-6)
