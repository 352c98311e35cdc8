"""python -m lensjax.caption and CaptionModel.caption: every good file captioned, bad files
reported by name, LensToWords' demo flags, atomic output files, the compilation cache."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import lensjax
from lensjax import Captioner, CaptionerConfig, CaptionModel
from lensjax.caption import decoding_options, parse_args
from lensjax.caption import main as caption_cli
from lensjax.data.images import ImageError, escape_text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("caption") / "tiny"
    CaptionModel(Captioner(CaptionerConfig.from_preset("tiny"), rngs=nnx.Rngs(1))).save(path)
    return path



def _folder(tmp_path, good=3):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(good):
        Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(
            folder / f"good{index}.jpg")
    data = (folder / "good0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello")
    Image.new("1", (20000, 10000)).save(folder / "bomb.png")
    os.symlink(folder / "gone.jpg", folder / "dangling.jpg")
    os.mkfifo(folder / "pipe.png")  # never opened: it would block forever
    (folder / "folder.jpg").mkdir()
    return folder


def test_folder_with_bad_files_captions_every_good_one(checkpoint, tmp_path, capsys):
    folder = _folder(tmp_path)
    out = tmp_path / "captions.jsonl"
    code = caption_cli([str(folder), "--weights", str(checkpoint), "--out", str(out),
                        "--max-new-tokens", "5", "--batch-size", "2"])
    assert code == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in rows) == ["good0.jpg", "good1.jpg",
                                                             "good2.jpg"]
    assert all(isinstance(r["caption"], str) for r in rows)
    err = capsys.readouterr().err
    for name in ("truncated.jpg", "empty.png", "text.jpg", "bomb.png", "dangling.jpg",
                 "pipe.png", "folder.jpg"):
        assert f"skipped: {folder / name}" in err
    assert "7 skipped" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_odd_file_names_are_written_whole_and_printed_one_line_each(checkpoint, tmp_path,
                                                                    capsys):
    """Issue items 7 and 11: a file name that is not UTF-8 (bytes b'caf\\xe9.png') aborted a
    run with --out x.csv and lost every caption; a TAB or newline in a name split its
    printed line."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [os.fsdecode(b"caf\xe9.png"), "tab\there.png", "new\nline.png"]
    for index, name in enumerate(names):
        Image.fromarray(np.full((50, 70, 3), 60 * index, np.uint8)).save(folder / name, "PNG")
    args = [str(folder), "--weights", str(checkpoint), "--max-new-tokens", "5",
            "--batch-size", "2"]
    out = tmp_path / "x.csv"
    assert caption_cli([*args, "--out", str(out)]) == 0
    note = f"1 file name(s) are not UTF-8 ({escape_text(str(folder / names[0]))})"
    assert note in capsys.readouterr().err
    with open(out, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    assert sorted(os.fsencode(image) for image, _ in rows) == sorted(
        os.fsencode(folder / name) for name in names)
    assert caption_cli(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(
        escape_text(str(folder / name)) for name in names)
    assert {line.split("\t")[1] for line in lines} == {escape_text(c) for _, c in rows}


def test_temperature_zero_decodes_greedily():
    """Issue item 4: --temp 0 divided the logits by zero; it now means greedy decoding."""
    assert decoding_options(parse_args(["x.jpg", "--temp", "0"]))["method"] == "greedy"
    assert decoding_options(parse_args(["x.jpg", "--temp", "0", "--beam"]))["method"] == "beam"
    assert decoding_options(parse_args(["x.jpg"]))["method"] == "topk"


def test_lenstowords_demo_flags_and_csv_output(checkpoint, tmp_path):
    folder = _folder(tmp_path, good=2)
    out = tmp_path / "captions.csv"
    code = caption_cli(["--image", str(folder / "good0.jpg"), "--image",
                        str(folder / "good1.jpg"), "--beam", "--beam-width", "2",
                        "--weights", str(checkpoint), "--out", str(out),
                        "--max-new-tokens", "4"])
    assert code == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image", "caption"] and len(rows) == 3
    assert caption_cli(["--image", str(folder / "good0.jpg"), "--top-k", "30", "--temp", "0.8",
                        "--weights", str(checkpoint), "--max-new-tokens", "4"]) == 0


def test_printed_captions_equal_the_python_api(checkpoint, tmp_path, capsys):
    folder = _folder(tmp_path, good=3)
    paths = sorted(folder.glob("good*.jpg"))
    assert caption_cli([*map(str, paths), "--weights", str(checkpoint), "--seed", "5",
                        "--max-new-tokens", "6"]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    model = CaptionModel(Captioner(CaptionerConfig.from_preset("tiny"), rngs=nnx.Rngs(1)))
    expected = model.caption(paths, seed=5, max_new_tokens=6)
    assert [printed[str(p)] for p in paths] == expected


def test_dtype_bfloat16_captions_with_bfloat16_weights(checkpoint, tmp_path, capsys):
    folder = _folder(tmp_path, good=2)
    paths = sorted(folder.glob("good*.jpg"))
    assert caption_cli([*map(str, paths), "--weights", str(checkpoint), "--dtype", "bfloat16",
                        "--greedy", "--max-new-tokens", "5"]) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    model = lensjax.load_pretrained(checkpoint, dtype="bfloat16")
    assert model.dtype == "bfloat16"
    expected = model.caption(paths, method="greedy", max_new_tokens=5)
    assert [printed[str(p)] for p in paths] == expected


def test_caption_api_raises_naming_a_bad_file(checkpoint, tmp_path):
    folder = _folder(tmp_path, good=1)
    model = CaptionModel(Captioner(CaptionerConfig.from_preset("tiny"), rngs=nnx.Rngs(1)))
    with pytest.raises(ImageError, match="text.jpg"):
        model.caption([folder / "good0.jpg", folder / "text.jpg"])


def test_missing_checkpoint_and_bad_output_suffix_exit_2(checkpoint, tmp_path, capsys):
    folder = _folder(tmp_path, good=1)
    assert caption_cli([str(folder), "--weights", str(tmp_path / "nothing")]) == 2
    assert "python -m bridge import" in capsys.readouterr().err
    assert caption_cli([str(folder), "--weights", str(checkpoint), "--out",
                        str(tmp_path / "x.txt")]) == 2
    assert "must end in .jsonl or .csv" in capsys.readouterr().err


def test_a_second_run_reuses_the_compilation_cache(checkpoint, tmp_path):
    folder = _folder(tmp_path, good=1)
    env = {**os.environ, "LENSJAX_CACHE_DIR": str(tmp_path / "fresh-cache")}
    command = [sys.executable, "-m", "lensjax.caption", str(folder / "good0.jpg"),
               "--weights", str(checkpoint), "--max-new-tokens", "3"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in (tmp_path / "fresh-cache").iterdir())
    assert entries, "the first run should have written compiled programs"
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(p.name for p in (tmp_path / "fresh-cache").iterdir()) == entries
