"""python -m lensjax.train and python -m lensjax.evaluate on bad input (a table checked with
the harness's contract: exit 2, one `error:` line naming the input, nothing written), and how
a training run stops: Ctrl-C, a failure, what interrupted writes leave and --resume removes.

The training loop runs here with its step and validation loss stubbed out (no compilation), so
that Ctrl-C and the run folder's bookkeeping are tested in seconds; the real step is tested in
test_train_cli.py.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from cli_harness import (
    TEMPORARY,
    Case,
    assert_clean_exit,
    assert_nothing_lost,
    assert_refused,
    call_main,
    case_ids,
    check_case,
    in_process_runner,
    run_cli,
    snapshot,
)

import lensjax.checkpoint
from lensjax import CaptionerConfig, evaluate
from lensjax.data.cache import FeatureCache
from lensjax.train import cli as train
from lensjax.train.step import Trainer

# --- python -m lensjax.train ---------------------------------------------------------------


def _train_inputs(tmp: Path) -> None:
    """A caption file and a feature folder that exist (the cases fail before reading them)."""
    (tmp / "captions.txt").write_text("image_name| comment_number| comment\na.png| 0| a dot\n")
    (tmp / "features").mkdir()


def _with_files(*paths: str):
    """setup(tmp): the train inputs, plus `NAME=TEXT` files (folders created as needed)."""
    def setup(tmp: Path) -> None:
        _train_inputs(tmp)
        for item in paths:
            name, _, text = item.partition("=")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return setup


TRAIN = ["--phase", "demo-prepend", "--data", "{tmp}/captions.txt", "--features",
         "{tmp}/features", "--out", "{tmp}/run", "--quiet"]
RUN_JSON = json.dumps({"settings": {"phase": "demo-prepend"}})


def _train(id_: str, extra: list[str], names, setup=None) -> Case:
    return Case(id_, [*TRAIN, *extra], 2, names, setup or _with_files())


TRAIN_CASES = [
    # Numbers out of range: named with their range before any work (issue item 8).
    _train("val-batches-0", ["--val-batches", "0"], ["--val-batches", "at least 1"]),
    _train("subset-0", ["--subset", "0"], ["--subset", "at least 1"]),
    _train("epochs-0", ["--epochs", "0"], "--epochs"),
    _train("max-steps-0", ["--max-steps", "0"], "--max-steps"),
    _train("patience-0", ["--patience", "0"], "--patience"),
    _train("batch-size-0", ["--batch-size", "0"], "--batch-size"),
    _train("save-every-0", ["--save-every", "0"], "--save-every"),
    _train("log-every-0", ["--log-every", "0"], "--log-every"),
    _train("eval-images-negative", ["--eval-images", "-1"], "--eval-images"),
    _train("max-len-2", ["--max-len", "2"], ["--max-len", "at least 3"]),
    # The demo model has 128 positions, 8 of them for the prepended latents.
    _train("max-len-beyond-positions", ["--max-len", "500"], ["--max-len", "120"]),
    _train("seed-beyond-64-bits", ["--seed", str(2**64)], ["--seed", str(2**63 - 1)]),
    _train("seed-negative", ["--seed", "-1"], "--seed"),
    _train("process-id-too-high", ["--num-processes", "2", "--process-id", "2"],
           "--process-id"),
    _train("lr-nan", ["--lr", "perceiver=nan"], ["--lr", "finite"]),
    _train("lr-infinite", ["--lr", "gpt2=inf"], ["--lr", "finite"]),
    _train("lr-negative", ["--lr", "gpt2=-1e-4"], ["--lr", ">= 0"]),
    _train("epochs-not-a-number", ["--epochs", "ten"], "--epochs"),
    _train("resume-and-force", ["--resume", "--force"], ["--resume", "--force"]),
    # Outputs refused before any work (item 7).
    _train("out-is-a-file", [], "{tmp}/run", _with_files("run=")),
    _train("out-under-a-file", ["--out", "{tmp}/file/run"], "{tmp}/file/run",
           _with_files("file=")),
    _train("out-not-writable", ["--out", "/sys/lensjax-run"], "/sys/lensjax-run"),
    # Inputs.
    _train("data-is-a-folder", ["--data", "{tmp}/features"], ["--data", "is a folder"]),
    _train("data-missing", ["--data", "{tmp}/none.txt"], ["--data", "none.txt"]),
    _train("val-data-missing", ["--val-data", "{tmp}/none.txt"], ["--val-data", "none.txt"]),
    _train("features-is-a-file", ["--features", "{tmp}/captions.txt"], "--features"),
    _train("occupied-out", [], ["{tmp}/run", "--resume"], _with_files(f"run/run.json={RUN_JSON}")),
    _train("damaged-run-json", ["--resume"], "run.json", _with_files("run/run.json={")),
    _train("damaged-latest", ["--resume"], "lensjax.json",
           _with_files(f"run/run.json={RUN_JSON}", "run/latest/lensjax.json={")),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=case_ids(TRAIN_CASES))
def test_train_refuses_bad_input(case, tmp_path, capsys):
    check_case(in_process_runner(train.main, capsys), case, tmp_path)


def test_batch_size_must_split_over_the_devices():
    args = train._parser().parse_args(["--phase", "demo-prepend", "--batch-size", "7"])
    with pytest.raises(train.TrainError, match="--batch-size 7 must be divisible by the 2"):
        train.resolve_settings(args, train.PHASES["demo-prepend"], devices=2)


# --- a training run that stops: Ctrl-C, a failure, leftovers (items 9 and 10) --------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 images with one caption each and random demo-sized features."""
    root = tmp_path_factory.mktemp("stop_data")
    names = [f"{i:02d}.png" for i in range(20)]
    (root / "captions.txt").write_text("image_name| comment_number| comment\n" + "".join(
        f"{name}| 0| a red circle on the left .\n" for name in names))
    dim = CaptionerConfig.from_preset("demo").feature_dim
    rng = np.random.default_rng(0)
    with FeatureCache.create(root / "features", 1, shape=(64, dim)) as writer:
        for name in names:
            writer.put(name, rng.standard_normal((64, dim)).astype(np.float16))
    return root


@pytest.fixture
def stub_steps(monkeypatch):
    """Stub the initial weights (zeros), the train step and the validation loss (1.0);
    `on_step[n]()` runs in step n."""
    from lensjax.params import abstract_params

    on_step: dict[int, object] = {}
    steps = []

    def zeros(cfg, *args):
        return {p: np.zeros(s.shape, s.dtype) for p, s in abstract_params(cfg).items()}, {}

    monkeypatch.setattr(train, "initial_params", zeros)

    def step(self, state, batch):
        steps.append(batch)
        on_step.get(len(steps), lambda: None)()
        return state, {"loss": 1.0}

    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(Trainer, "eval_loss", lambda self, state, batch: 1.0)
    return on_step


def _ctrl_c() -> None:
    signal.raise_signal(signal.SIGINT)


def _run(data: Path, out: Path, capsys, *extra: str):
    """train.main in this process; 18 training pairs in batches of 2: 9 steps per epoch."""
    try:
        return call_main(train.main, [
            "--phase", "demo-prepend", "--data", data / "captions.txt", "--features",
            data / "features", "--out", out, "--batch-size", "2", "--max-len", "12", "--epochs",
            "1", "--save-every", "2", "--eval-images", "0", "--quiet", *extra], capsys)
    except KeyboardInterrupt:  # it would end the whole pytest session
        pytest.fail("Ctrl-C escaped train.main as KeyboardInterrupt")


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def _temporaries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if TEMPORARY.match(p.name))


def test_ctrl_c_stops_after_the_step_and_resume_cleans_up_and_continues(
        data, tmp_path, capsys, stub_steps, monkeypatch):
    out = tmp_path / "run"
    stub_steps[3] = _ctrl_c
    result = _run(data, out, capsys)
    line = assert_refused(result, 130, ["after step 3", "holds step 2", "--resume"])
    assert str(out / "latest") in line
    assert {k: _run_json(out)[k] for k in ("status", "step", "saved_step")} == {
        "status": "interrupted", "step": 3, "saved_step": 2}
    assert _temporaries(out) == []

    # What a killed writer leaves; --resume removes it. Ctrl-C during the first save of the
    # resumed run lets that checkpoint finish, then stops.
    (out / ".latest.tmp-0123abcd" / "params").mkdir(parents=True)
    (out / ".run.json.tmp-89abcdef").write_text("{")
    (out / ".best.old-76543210").mkdir()  # best/ does not exist: the only copy, kept
    save = lensjax.checkpoint.save_checkpoint

    def interrupted_save(*args, **kwargs):
        _ctrl_c()
        return save(*args, **kwargs)

    monkeypatch.setattr(lensjax.checkpoint, "save_checkpoint", interrupted_save)
    result = _run(data, out, capsys, "--resume")
    assert_refused(result, 130, ["after step 4", "holds step 4"])
    assert ".latest.tmp-0123abcd" in result.stderr  # said what it removed
    assert _temporaries(out) == [".best.old-76543210"]
    assert train.read_latest(out / "latest").progress.step == 4
    assert _run_json(out)["status"] == "interrupted"

    monkeypatch.setattr(lensjax.checkpoint, "save_checkpoint", save)
    assert_clean_exit(_run(data, out, capsys, "--resume"), 0)
    run = _run_json(out)
    assert (run["status"], run["step"], run["stopped_early"]) == ("done", 9, False)
    steps = [r["step"] for r in train.RunFolder(out).records() if "train_loss" in r]
    assert steps == sorted(set(steps))


def test_ctrl_c_before_training_leaves_the_folder_as_it_was(data, tmp_path, capsys,
                                                          monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier run's notes")
    load_data = train.load_data

    def interrupted(*args):
        _ctrl_c()
        return load_data(*args)

    monkeypatch.setattr(train, "load_data", interrupted)
    before = snapshot(tmp_path)
    result = _run(data, out, capsys, "--force")  # --force clears only once training starts
    assert_refused(result, 130, ["before training started", str(out)])
    assert_nothing_lost(before, tmp_path)


def test_ctrl_c_of_a_real_run_exits_130_with_one_line_and_leaves_nothing_half_written(
        data, tmp_path):
    # The one process-level case: the signal reaches a real process (compiling or stepping),
    # which must exit 130 without exit-time noise, leaving run.json `interrupted`.
    out = tmp_path / "run"
    result = run_cli("lensjax.train", [
        "--phase", "demo-prepend", "--data", data / "captions.txt", "--features",
        data / "features", "--out", out, "--batch-size", "2", "--max-len", "8", "--epochs", "1",
        "--save-every", "1", "--eval-images", "0", "--quiet"], cwd=tmp_path, timeout=120,
        interrupt_after=0, interrupt_when=(out / "run.json").is_file)
    assert_refused(result, 130, ["interrupted (Ctrl-C) after step", "--resume"])
    assert "Exception ignored" not in result.stderr and "Event loop" not in result.stderr
    assert _run_json(out)["status"] == "interrupted" and _temporaries(out) == []


def test_a_failure_during_training_is_recorded_in_run_json(data, tmp_path, capsys,
                                                           stub_steps):
    def disk_full():
        raise OSError(28, "No space left on device", str(tmp_path / "disk"))

    stub_steps[5] = disk_full
    result = _run(data, tmp_path / "run", capsys)
    assert_refused(result, 2, [str(tmp_path / "disk"), "No space left on device"])
    run = _run_json(tmp_path / "run")
    assert (run["status"], run["step"], run["saved_step"]) == ("failed", 4, 4)
    assert "No space left" in run["reason"]


# --- python -m lensjax.evaluate ------------------------------------------------------------

REFERENCES = ("image_name| comment_number| comment\n1.jpg| 0| a dog runs on the grass\n"
              "2.jpg| 0| a cat sleeps on a bed\n")


def _evaluate_files(predictions: str = "", name: str = "p.jsonl", *, extra: str | None = None):
    """setup(tmp): refs.txt, the predictions file `name`, and the file or folder `extra`."""
    def setup(tmp: Path) -> None:
        (tmp / "refs.txt").write_text(REFERENCES)
        (tmp / name).write_text(predictions)
        if extra is not None:
            (tmp / extra.rstrip("/")).mkdir() if extra.endswith("/") else (tmp / extra).touch()
    return setup


COMMON = ["--references", "{tmp}/refs.txt", "--no-coco", "--split", "all", "--out",
          "{tmp}/report"]
EVALUATE = ["--predictions", "{tmp}/p.jsonl", *COMMON]


def _evaluate(id_: str, extra: list[str], names, setup=None, *, predictions: str = "",
              name: str = "p.jsonl", base: list[str] = EVALUATE) -> Case:
    return Case(id_, [*base, *extra], 2, names, setup or _evaluate_files(predictions, name))


GOOD = '{"image": "1.jpg", "caption": "a dog"}\n'
CSV = ["--predictions", "{tmp}/p.csv"]
EVALUATE_CASES = [
    # Rows that raised tracebacks (issue item 9), named by file and line.
    _evaluate("jsonl-missing-caption", [], "p.jsonl:2",
              predictions=GOOD + '{"image": "2.jpg"}\n'),
    _evaluate("jsonl-numeric-image", [], ["p.jsonl:1", "'image'"],
              predictions='{"image": 1, "caption": "a dog"}\n'),
    _evaluate("jsonl-list-caption", [], ["p.jsonl:1", "'caption'"],
              predictions='{"image": "1.jpg", "caption": ["a", "dog"]}\n'),
    _evaluate("jsonl-number-caption", [], ["p.jsonl:1", "'caption'"],
              predictions='{"image": "1.jpg", "caption": 7}\n'),
    _evaluate("jsonl-not-an-object", [], "p.jsonl:1", predictions='["1.jpg", "a dog"]\n'),
    _evaluate("jsonl-not-json", [], "p.jsonl:2", predictions=GOOD + "{'image': 'x'}\n"),
    _evaluate("jsonl-image-without-file-name", [], "p.jsonl:1",
              predictions='{"image": "/", "caption": "a dog"}\n'),
    _evaluate("csv-missing-caption", CSV, "p.csv:3", name="p.csv",
              predictions="image,caption\n1.jpg,a dog\n2.jpg\n"),
    _evaluate("csv-unquoted-comma", CSV, "p.csv:2", name="p.csv",
              predictions="image,caption\n1.jpg,a dog, running\n"),
    _evaluate("csv-empty-image", CSV, ["p.csv:2", "'image'"], name="p.csv",
              predictions="image,caption\n,a dog\n"),
    _evaluate("csv-without-header", CSV, ["p.csv", "image,caption"], name="p.csv",
              predictions="1.jpg,a dog\n"),
    _evaluate("duplicate-file-name-strict", ["--strict"], ["p.jsonl", "line 2", "'b/1.jpg'"],
              predictions='{"image": "a/1.jpg", "caption": "x"}\n'
                          '{"image": "b/1.jpg", "caption": "y"}\n'),
    # Inputs and outputs, before any work (items 7 and 9).
    _evaluate("references-folder", ["--references", "{tmp}/refs/"], ["--references", "folder"],
              _evaluate_files(GOOD, extra="refs/")),
    _evaluate("references-missing", ["--references", "{tmp}/none.txt"], "none.txt"),
    _evaluate("predictions-folder", ["--predictions", "{tmp}/dir"], "--predictions",
              _evaluate_files(extra="dir/")),
    _evaluate("out-is-a-file", [], "{tmp}/report", _evaluate_files(GOOD, extra="report")),
    _evaluate("out-under-a-file", ["--out", "{tmp}/file/report"], "{tmp}/file/report",
              _evaluate_files(GOOD, extra="file")),
    _evaluate("out-not-writable", ["--out", "/sys/lensjax-report"], "/sys/lensjax-report"),
    _evaluate("weights-without-features", ["--weights", "{tmp}"], ["--weights", "--features"],
              base=COMMON),
    _evaluate("weights-missing", ["--weights", "{tmp}/none", "--features", "{tmp}"],
              ["--weights", "none"], base=COMMON),
    _evaluate("batch-size-0", ["--batch-size", "0"], "--batch-size"),
    _evaluate("seed-beyond-64-bits", ["--seed", str(2**64)], "--seed"),
    _evaluate("seed-not-a-number", ["--seed", "x"], "--seed"),
    _evaluate("unknown-split", ["--split", "dev"], ["--split", "'dev'", "val"]),
]


@pytest.mark.parametrize("case", EVALUATE_CASES, ids=case_ids(EVALUATE_CASES))
def test_evaluate_refuses_bad_input(case, tmp_path, capsys):
    check_case(in_process_runner(evaluate.main, capsys), case, tmp_path)


def test_predictions_sharing_a_file_name_are_reported_and_the_first_is_scored(tmp_path,
                                                                             capsys):
    _evaluate_files('{"image": "a/1.jpg", "caption": "a dog runs on the grass"}\n'
                    '{"image": "b/1.jpg", "caption": "a cat sleeps on a bed"}\n'
                    '{"image": "2.jpg", "caption": "a cat sleeps on a bed"}\n')(tmp_path)
    result = call_main(evaluate.main, [a.replace("{tmp}", str(tmp_path)) for a in EVALUATE],
                       capsys)
    assert_clean_exit(result, 0)
    warning = next(line for line in result.stderr.splitlines() if "file name" in line)
    assert "line 2 'b/1.jpg' (line 1 'a/1.jpg' came first)" in warning
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["lenstowords_bleu4"] == pytest.approx(1.0)
