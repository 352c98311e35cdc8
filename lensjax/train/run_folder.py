"""A run folder: run.json, metrics.jsonl, the latest/ and best/ checkpoints, loss.png."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lensjax.checkpoint import CheckpointError
from lensjax.train.messages import TrainError
from lensjax.train.settings import Settings

LATEST, BEST, RUN_FILE, METRICS_FILE, TRAIN_STATE, EWC_DIR, FISHER = (
    "latest", "best", "run.json", "metrics.jsonl", "train_state", "ewc", "fisher")
# Settings a resumed run may change (extending a run); everything else must match.
RESUMABLE_CHANGES = frozenset({"epochs", "max_steps", "patience", "eval_images", "eval_method",
                               "plot"})
# Hidden write-then-rename siblings (lensjax.files.temporary_sibling): `.NAME.tmp-xxxxxxxx`
# is never complete; `.NAME.old-xxxxxxxx` is the previous NAME while it is being replaced.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<tag>tmp|old)-[0-9a-f]{8}$")


@dataclasses.dataclass
class Progress:
    """Where a run is; saved with every `latest` checkpoint."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    stopped_early: bool = False
    plateau: dict[str, float] | None = None  # lensjax.train.plateau's state (v1/v2 phases)


@dataclasses.dataclass(frozen=True)
class Resumed:
    """What latest/ holds for --resume: weights, optimizer state, RNG key and progress."""

    params: dict[str, np.ndarray]
    opt_leaves: list[np.ndarray]
    key: np.ndarray
    progress: Progress


def read_latest(latest: Path) -> Resumed:
    """Read `latest` for --resume; TrainError when it is damaged or not a training checkpoint."""
    from lensjax.checkpoint import load_checkpoint, load_extra

    try:
        params, metadata = load_checkpoint(latest, merge_lora=False)
        saved = load_extra(latest, TRAIN_STATE)
        progress = Progress(**metadata["training"])
        leaves = [saved[f"opt_{i}"] for i in range(len(saved) - 1)]
        return Resumed(params, leaves, saved["key"], progress)
    except CheckpointError as error:
        raise TrainError(f"cannot resume: {error}; pass --force to start the run over"
                         ) from None
    except (KeyError, TypeError) as error:
        raise TrainError(f"cannot resume: {latest} is not a complete training checkpoint "
                         f"(missing {error}); pass --force to start the run over") from None


@dataclasses.dataclass(frozen=True)
class Start:
    """How a run starts in its folder: from latest/ (`resume`) or from the beginning, and
    whether an earlier run is cleared first (`clear`)."""

    resume: bool
    clear: bool


class RunFolder:
    """run.json, metrics.jsonl and the checkpoints of one run."""

    def __init__(self, path: Path):
        self.path = path

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def read_run(self) -> dict[str, Any] | None:
        """run.json, or None when there is none; TrainError when it is damaged."""
        if not self.run_file.is_file():
            return None
        try:
            document = json.loads(self.run_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TrainError(f"{self.run_file} is damaged ({error}); pass --force to start "
                             "the run over") from None
        if not isinstance(document, dict) or not isinstance(document.get("settings"), dict):
            raise TrainError(f"{self.run_file} holds no run settings; pass --force to start "
                             "the run over")
        return document

    def write_run(self, document: Mapping[str, Any]) -> None:
        from lensjax.files import write_text_atomic

        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_file, json.dumps(document, indent=2, sort_keys=True))

    def log(self, record: Mapping[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records; TrainError naming the line of a damaged one."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise TrainError(f"{path}:{number}: not a JSON record ({error.msg}); remove the "
                                 "line to resume, or pass --force to start over") from None
        return records

    def write_ewc(self, ewc, metadata: Mapping[str, Any], batches: int) -> None:
        """Save EWC's anchor and Fisher (`lensjax.train.step.EWC`) as ewc/: a checkpoint of
        the anchored weights with the Fisher in its `fisher` tree."""
        from lensjax.checkpoint import save_checkpoint

        meta = {k: v for k, v in metadata.items() if k not in ("lora", "training")}
        meta["ewc"] = {"batches": batches, "weights": len(ewc.anchor)}
        save_checkpoint(self.path / EWC_DIR, ewc.anchor, meta, overwrite=True,
                        extra={FISHER: ewc.fisher})

    def read_ewc(self, settings: Settings):
        """ewc/'s anchor and Fisher for a resumed --ewc run (None without --ewc)."""
        from lensjax.checkpoint import load_checkpoint, load_extra
        from lensjax.train.step import EWC

        if settings.ewc is None:
            return None
        try:
            anchor, _ = load_checkpoint(self.path / EWC_DIR)
            return EWC(anchor, load_extra(self.path / EWC_DIR, FISHER))
        except CheckpointError as error:
            raise TrainError(f"cannot resume the EWC run: {error}; pass --force to start "
                             "over") from None

    def rewind_metrics(self, step: int) -> None:
        """Drop log lines after `step`: a resumed run logs them again."""
        from lensjax.files import write_text_atomic

        kept = [r for r in self.records() if r.get("step", 0) <= step and "event" not in r]
        write_text_atomic(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    def prepare(self, settings: Settings, resume: bool, force: bool, say) -> Start:
        """Check the folder against the flags; -> how the run starts. Nothing is changed here:
        `begin` does that once every input has been checked."""
        existing = self.read_run()
        if existing is None:
            if self.path.exists() and any(self.path.iterdir()) and not force:
                raise TrainError(f"{self.path} is not empty and holds no lensjax run; choose "
                                 "another --out or pass --force to clear it")
            return Start(resume=False, clear=force and self.path.exists())
        if force:
            say(f"--force: clearing the earlier run in {self.path}")
            return Start(resume=False, clear=True)
        if not resume:
            raise TrainError(f"{self.path} already holds a run of phase "
                             f"{existing['settings'].get('phase')}: pass --resume to continue "
                             "it or --force to start over")
        changed = {k: (v, settings.to_dict().get(k)) for k, v in existing["settings"].items()
                   if settings.to_dict().get(k) != v and k not in RESUMABLE_CHANGES}
        if changed:
            raise TrainError(f"{self.path} holds a run with different settings; --resume needs "
                             "the same ones: " + "; ".join(
                                 f"{k}: {old!r} there, {new!r} now"
                                 for k, (old, new) in changed.items()))
        self.records()  # a damaged metrics.jsonl is refused before anything changes
        if not (self.path / LATEST).is_dir():
            say(f"{self.path} has no checkpoint yet: starting the phase from the beginning")
            return Start(resume=False, clear=False)
        return Start(resume=True, clear=False)

    def begin(self, start: Start, say) -> None:
        """Clear the folder (`start.clear`), or remove what interrupted writes left in it."""
        if start.clear:
            shutil.rmtree(self.path)
        elif self.path.is_dir():
            self.remove_temporaries(say)

    def remove_temporaries(self, say) -> None:
        """Remove the unfinished writes of a killed or interrupted run: every `.NAME.tmp-*`,
        and `.NAME.old-*` once NAME exists (the write that replaced it finished)."""
        removed = []
        for path in sorted(self.path.iterdir()):
            match = _TEMPORARY.match(path.name)
            if match is None or (match["tag"] == "old"
                                 and not (self.path / match["name"]).exists()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
        if removed:
            say(f"removed the unfinished writes of an earlier run: {', '.join(removed)}")


def plot_losses(records: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Train (per log line) and validation (per epoch) loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from lensjax.files import save_figure

    save_figure(fig, path)
