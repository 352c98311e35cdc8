"""Bad inputs to `python -m lensjax.caption` and `python -m lensjax.extract`.

Each row of the tables is refused with the documented exit status and one `error:` line
naming the input, with no traceback and no file lost, changed or left half-written
(`cli_harness.check_case`). Most rows call `main(argv)` in this process; the FIFO rows and
Ctrl-C run real processes, because a hang or a signal is what they test.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_harness import (
    TRACEBACK,
    Case,
    assert_nothing_lost,
    case_ids,
    check_case,
    in_process_runner,
    run_cli,
    snapshot,
    subprocess_runner,
)
from flax import nnx
from PIL import Image

from lensjax import Captioner, CaptionerConfig, CaptionModel
from lensjax.caption import main as caption_main
from lensjax.data.cache import FeatureCache
from lensjax.extract import main as extract_main


def _save_tiny(path: Path, **overrides) -> Path:
    """A checkpoint of the tiny preset with all-zero weights.

    Built from the parameter shapes alone (`nnx.eval_shape`): random initialisation compiles
    one program per parameter shape, ~20 s on two cores, and these cases never need
    meaningful captions.
    """
    cfg = CaptionerConfig.from_preset("tiny", **overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Captioner(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), state)
    CaptionModel(nnx.merge(graphdef, state)).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """{"ckpt": a tiny checkpoint, "noenc": one without an image encoder} as CLI arguments."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {"ckpt": str(_save_tiny(root / "tiny")),
            "noenc": str(_save_tiny(root / "noenc", encoder=None, head=None))}



def _with_checkpoints(case: Case, checkpoints: dict[str, str]) -> Case:
    """`case` with {ckpt} / {noenc} in its arguments replaced by the checkpoint paths."""
    def fill(text: str) -> str:
        return text.replace("{ckpt}", checkpoints["ckpt"]).replace("{noenc}",
                                                                  checkpoints["noenc"])
    names = [case.names] if isinstance(case.names, str) else case.names
    return dataclasses.replace(case, args=[fill(arg) for arg in case.args],
                               names=[fill(name) for name in names])


def _photos(tmp: Path, count: int = 1, name: str = "photos") -> Path:
    folder = tmp / name
    folder.mkdir()
    for index in range(count):
        Image.fromarray(np.full((24, 32, 3), index % 256, np.uint8)).save(
            folder / f"{index:03d}.png")
    return folder


def _bad_photos(tmp: Path) -> None:
    folder = tmp / "photos"
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")


def _fifo_photos(tmp: Path) -> None:
    folder = tmp / "photos"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")


def _old_output(name: str):
    def setup(tmp: Path) -> None:
        _bad_photos(tmp)
        (tmp / name).write_text("old results\n")
    return setup


def _photos_and(extra):
    """A setup: one photo in {tmp}/photos, then `extra(tmp)`."""
    def setup(tmp: Path) -> None:
        _photos(tmp)
        extra(tmp)
    return setup


def _folder_with_a_file(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("not a cache")


PHOTOS = ["{tmp}/photos", "--weights", "{ckpt}"]
TO_CACHE = [*PHOTOS, "--out", "{tmp}/cache"]


def _flag_cases(args: list[str], flags: list[tuple[str, str, str]]) -> list[Case]:
    """One row per (flag, bad value, text the message must hold), after good `args`."""
    return [Case(f"{flag}={value}", [*args, flag, value], 2, [flag, allowed], _photos)
            for flag, value, allowed in flags]


CAPTION_CASES = [
    Case("missing-file", ["{tmp}/missing.jpg", "--weights", "{ckpt}"], 2, "missing.jpg"),
    Case("missing-pattern", ["{tmp}/photos/*.tif", "--weights", "{ckpt}"], 2, "*.tif",
         _photos),
    Case("empty-folder", PHOTOS, 2, "photos", lambda tmp: (tmp / "photos").mkdir()),
    Case("out-is-a-folder", [*PHOTOS, "--out", "{tmp}/out.csv"], 2, "out.csv",
         _photos_and(lambda tmp: (tmp / "out.csv").mkdir())),
    Case("out-under-a-file", [*PHOTOS, "--out", "{tmp}/file/x.csv"], 2, "file/x.csv",
         _photos_and(lambda tmp: (tmp / "file").write_text("x"))),
    Case("out-not-writable", [*PHOTOS, "--out", "/sys/x.csv"], 2, "/sys/x.csv", _photos),
    Case("out-suffix", [*PHOTOS, "--out", "{tmp}/x.txt"], 2, ["x.txt", ".jsonl or .csv"],
         _photos),
    Case("weights-not-a-checkpoint", ["{tmp}/photos", "--weights", "{tmp}/photos"], 2,
         "photos", _photos),
    Case("weights-a-file", ["{tmp}/photos", "--weights", "{tmp}/photos/000.png"], 2,
         "000.png", _photos),
    Case("weights-missing", ["{tmp}/photos", "--weights", "{tmp}/nothing"], 2, "nothing",
         _photos),
    Case("checkpoint-without-encoder", ["{tmp}/photos", "--weights", "{noenc}"], 2,
         ["{noenc}", "encoder"], _photos),
    Case("beam-and-greedy", [*PHOTOS, "--beam", "--greedy"], 2, ["--greedy", "--beam"],
         _photos),
    Case("min-over-max", [*PHOTOS, "--min-new-tokens", "9", "--max-new-tokens", "3"], 2,
         ["--min-new-tokens", "--max-new-tokens"], _photos),
    Case("no-inputs", ["--weights", "{ckpt}"], 2, "no images given"),
    # Every image fails: exit 2, and an existing --out is kept as it was (issue items 3, 11).
    Case("every-image-bad", PHOTOS, 2, ["empty.png", "1 more"], _bad_photos),
    Case("every-image-bad-keeps-out", [*PHOTOS, "--out", "{tmp}/out.csv"], 2,
         ["out.csv", "left unchanged"], _old_output("out.csv")),
    *_flag_cases(PHOTOS, [
        ("--batch-size", "0", ">= 1"), ("--threads", "0", ">= 1"),
        ("--beam-width", "0", ">= 1"), ("--max-new-tokens", "0", ">= 1"),
        ("--min-new-tokens", "-1", ">= 0"), ("--top-k", "0", ">= 1"),
        ("--top-k", "many", ">= 1"), ("--temp", "-0.5", ">= 0"), ("--temp", "inf", "finite"),
        ("--temp", "nan", "finite"), ("--alpha", "nan", "finite"), ("--seed", "-1", "0.."),
        ("--seed", str(2**63), str(2**63 - 1)),
    ]),
]

EXTRACT_CASES = [
    Case("missing-file", ["{tmp}/missing.jpg", "--weights", "{ckpt}", "--out", "{tmp}/cache"],
         2, "missing.jpg"),
    Case("missing-pattern", ["{tmp}/photos/*.tif", "--weights", "{ckpt}", "--out",
                             "{tmp}/cache"], 2, "*.tif", _photos),
    Case("out-is-a-file", TO_CACHE, 2, "cache",
         _photos_and(lambda tmp: (tmp / "cache").write_text("x"))),
    Case("out-under-a-file", [*PHOTOS, "--out", "{tmp}/file/cache"], 2, "file/cache",
         _photos_and(lambda tmp: (tmp / "file").write_text("x"))),
    Case("out-not-writable", [*PHOTOS, "--out", "/sys/cache"], 2, "/sys/cache", _photos),
    Case("out-not-a-cache", TO_CACHE, 2, "cache",
         _photos_and(lambda tmp: _folder_with_a_file(tmp / "cache"))),
    Case("weights-not-a-checkpoint", ["{tmp}/photos", "--weights", "{tmp}/photos", "--out",
                                      "{tmp}/cache"], 2, "photos", _photos),
    Case("checkpoint-without-encoder", ["{tmp}/photos", "--weights", "{noenc}", "--out",
                                        "{tmp}/cache"], 2, ["{noenc}", "encoder"], _photos),
    Case("duplicate-names", ["{tmp}/photos", "{tmp}/more", "--weights", "{ckpt}", "--out",
                             "{tmp}/cache"], 2, "000.png",
         _photos_and(lambda tmp: _photos(tmp, name="more"))),
    # Every image fails: exit 2 and no empty cache left behind (issue item 11).
    Case("every-image-bad", TO_CACHE, 2, ["empty.png", "cache"], _bad_photos),
    *_flag_cases(TO_CACHE, [
        ("--batch-size", "0", ">= 1"), ("--threads", "0", ">= 1"), ("--shards", "0", ">= 1"),
        ("--commit-every", "0", ">= 1"), ("--commit-every", "often", ">= 1"),
    ]),
]


@pytest.mark.parametrize("case", CAPTION_CASES, ids=case_ids(CAPTION_CASES))
def test_caption_refuses(case, checkpoints, tmp_path, capsys):
    check_case(in_process_runner(caption_main, capsys), _with_checkpoints(case, checkpoints),
               tmp_path)


@pytest.mark.parametrize("case", EXTRACT_CASES, ids=case_ids(EXTRACT_CASES))
def test_extract_refuses(case, checkpoints, tmp_path, capsys):
    check_case(in_process_runner(extract_main, capsys), _with_checkpoints(case, checkpoints),
               tmp_path)


FIFO_CASES = [
    Case("lensjax.caption", PHOTOS, 2, ["pipe.png", "FIFO"], _fifo_photos),
    Case("lensjax.extract", TO_CACHE, 2, ["pipe.png", "FIFO"], _fifo_photos),
]


@pytest.mark.parametrize("case", FIFO_CASES, ids=case_ids(FIFO_CASES))
def test_a_fifo_is_skipped_unopened(case, checkpoints, tmp_path):
    """Issue item 1: a FIFO named *.png used to block the run forever (the harness fails a
    process still alive after 30 s)."""
    check_case(subprocess_runner(case.id), _with_checkpoints(case, checkpoints), tmp_path)


def _interrupted_line(result) -> str:
    assert TRACEBACK not in result.stderr, result.stderr[-3000:]
    assert result.code == 130, f"exit {result.code}:\n{result.stderr[-3000:]}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_ctrl_c_during_caption_leaves_the_output_unchanged(checkpoints, tmp_path):
    """Issue item 9: Ctrl-C while captioning exits 130 with one line, no traceback, the old
    --out intact and no temporary file (a fresh compilation cache keeps the run busy)."""
    _photos(tmp_path, 4)
    (tmp_path / "out.csv").write_text("old results\n")
    before = snapshot(tmp_path)

    def writing() -> bool:
        return any(p.name.startswith(".out.csv.tmp-") for p in tmp_path.iterdir())

    result = run_cli("lensjax.caption", [tmp_path / "photos", "--weights", checkpoints["ckpt"],
                                         "--out", tmp_path / "out.csv"],
                     cwd=tmp_path, env={"LENSJAX_CACHE_DIR": str(tmp_path / ".jax-cache")},
                     interrupt_after=0.0, interrupt_when=writing)
    assert "out.csv left unchanged" in _interrupted_line(result)
    assert_nothing_lost(before, tmp_path)


def test_ctrl_c_during_extract_keeps_what_was_committed(checkpoints, tmp_path):
    """Issue item 9: Ctrl-C after the first commits exits 130 saying how many images were
    committed and that a rerun resumes; the cache stays readable."""
    _photos(tmp_path, 60)
    cache = tmp_path / "cache"

    def committed() -> bool:
        try:
            with FeatureCache(cache) as features:
                return len(features) > 0
        except (OSError, ValueError):
            return False

    result = run_cli("lensjax.extract", [tmp_path / "photos", "--weights", checkpoints["ckpt"],
                                         "--out", cache, "--batch-size", "1",
                                         "--commit-every", "1"],
                     cwd=tmp_path, env={"LENSJAX_CACHE_DIR": str(tmp_path / ".jax-cache")},
                     interrupt_after=0.0, interrupt_when=committed)
    line = _interrupted_line(result)
    with FeatureCache(cache) as features:
        assert 0 < len(features) < 60, result.stderr[-3000:]
        assert f"{len(features)} image(s) of this run committed to" in line
    assert "rerun the same command to resume" in line
    assert_nothing_lost({}, tmp_path, allow_new=lambda path: True)  # no temporary file left
