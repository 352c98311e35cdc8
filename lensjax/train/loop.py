"""One phase run: the training loop, checkpoints, validation, the end-of-phase evaluation,
and what run.json says when it stops. Nothing here reads the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lensjax.phases import Phase
from lensjax.train.inputs import Data, usable
from lensjax.train.messages import Interrupted, NonFiniteLoss, TrainError, format_report, say
from lensjax.train.run_folder import (
    BEST,
    LATEST,
    TRAIN_STATE,
    Progress,
    Resumed,
    RunFolder,
    Start,
    plot_losses,
)
from lensjax.train.settings import Settings

if TYPE_CHECKING:
    from lensjax.data.batching import Tokenizer


class InterruptGuard:
    """Ctrl-C (SIGINT) during a run. Outside `held()` it raises KeyboardInterrupt at once, as
    Python does; inside, it is only recorded and raised by `check()` (after each step) or at
    the block's end. So a checkpoint being written is finished first, and the interrupt never
    lands in a library callback, where Python would print a traceback and drop it."""

    def __init__(self) -> None:
        self.requested = False
        self._holding = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT within the block (main thread only: elsewhere Python's stays)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if not self._holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Record Ctrl-C instead of raising it within the block; raise it at the end."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        self.check()

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt

    def absorb(self) -> None:
        """From now on only record Ctrl-C: the run is stopping and records where it stands."""
        self._holding += 1


def _loss_rows(batches, settings: Settings, devices: int) -> int:
    """The output layer's row budget for this run's training batches (`loss_row_budget`),
    from every training caption's counted positions."""
    from lensjax.data.tokenizer import shift
    from lensjax.train.step import counted_positions, loss_row_budget

    parts = batches.examples if isinstance(batches.examples, list) else [batches.examples]
    counts = np.concatenate([
        counted_positions(shift(part.sequences)[1], part.lengths, settings.loss, np).sum(1)
        for part in parts])
    return loss_row_budget(counts, settings.batch_size, devices)


class PhaseRun:
    """One phase run: the loop, checkpoints, metrics and the end-of-phase evaluation.
    `progress` is where the loop is; `saved_step` the step latest/ holds (None: no
    checkpoint yet). `tokenizer`: GPT-2's BPE, or a v1/v2 word vocabulary (saved with the
    checkpoints); `token_weights` (V,): the weighted-words loss's. `strict`: images without
    inputs are an error, not skipped; `progress_bar`: show one (process 0 only)."""

    def __init__(self, phase: Phase, settings: Settings, cfg,
                 params: dict[str, np.ndarray] | Resumed, provenance: dict[str, str],
                 data: Data, folder: RunFolder, interrupts: InterruptGuard, *,
                 tokenizer: Tokenizer | None = None, token_weights: np.ndarray | None = None,
                 strict: bool = False, progress_bar: bool = True):
        import jax

        from lensjax.data.batching import CaptionBatches, MixedBatches
        from lensjax.data.tokenizer import GPT2Tokenizer
        from lensjax.lora import LoRASpec
        from lensjax.train.plateau import PlateauSchedule
        from lensjax.train.step import GPT2_LOSSES, Trainer

        self.phase, self.settings, self.cfg = phase, settings, cfg
        self.progress_bar = progress_bar
        self.provenance, self.data, self.folder = provenance, data, folder
        self.interrupts = interrupts
        self.progress, self.saved_step = Progress(), None
        self.main = jax.process_index() == 0
        devices = jax.device_count()
        self.tokenizer = tokenizer = tokenizer or GPT2Tokenizer()
        self.plateau = (None if settings.plateau is None
                        else PlateauSchedule(settings.plateau, settings.learning_rates))
        process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        tokens = {"tokenizer": tokenizer, "max_len": settings.max_len, **process}
        if settings.mix:  # per-source pairs, mixed per batch; validation per source
            train_parts = {name: usable(data.parts[name][0], data, strict,
                                        f"training set {name}", say) for name in settings.mix}
            val_parts = {name: usable(data.parts[name][1], data, strict,
                                      f"validation set {name}", say) for name in settings.mix}
        else:
            train_parts = {"": usable(data.train, data, strict, "training set", say)}
            val_parts = {"": usable(data.val, data, strict, "validation set", say)}
        pairs = sum(map(len, train_parts.values()))
        if pairs < settings.batch_size:
            raise TrainError(f"{pairs} training pairs cannot fill one batch of "
                             f"{settings.batch_size}; lower --batch-size")
        self.batches = (
            MixedBatches(train_parts, settings.mix, data.cache, batch_size=settings.batch_size,
                         seed=settings.seed, **tokens) if settings.mix else
            CaptionBatches(train_parts[""], data.cache, batch_size=settings.batch_size,
                           seed=settings.seed, **tokens))
        self.val_batches = {}  # source name ("" unmixed) -> its validation batches
        for name, pairs in val_parts.items():
            val_batch = min(settings.batch_size, len(pairs) // devices * devices)
            if val_batch == 0:
                raise TrainError(f"{len(pairs)} validation pairs{f' of {name}' if name else ''}"
                                 f" are fewer than the {devices} devices")
            self.val_batches[name] = CaptionBatches(pairs, data.cache, batch_size=val_batch,
                                                    seed=0, **tokens)
        self.lora_spec = (None if settings.lora is None
                          else LoRASpec.from_dict(settings.lora))
        self.trainer = Trainer(cfg, settings.learning_rates, loss=settings.loss,
                               remat=settings.remat, dtype=settings.dtype,
                               from_pixels=settings.from_pixels, lora_spec=self.lora_spec,
                               ewc_lambda=settings.ewc or 0.0, token_weights=token_weights,
                               clip_norm=settings.clip_norm, optimizer=settings.optimizer,
                               loss_rows=(_loss_rows(self.batches, settings, devices)
                                          if settings.loss in GPT2_LOSSES else None))
        self.resumed = params if isinstance(params, Resumed) else None
        self.params = {} if self.resumed else params

    # -- checkpoints

    def _metadata(self, progress: Progress | None) -> dict[str, Any]:
        from lensjax.checkpoint import GPT2_TOKENIZER
        from lensjax.data.word_vocab import WordVocabulary

        meta: dict[str, Any] = {
            "family": type(self.cfg).family,
            "config": self.cfg.to_dict(),
            "tokenizer": (self.tokenizer.to_metadata()
                          if isinstance(self.tokenizer, WordVocabulary) else GPT2_TOKENIZER),
            "provenance": {"created_by": "lensjax.train", "phase": self.phase.name,
                           "init": self.provenance, "data": self.data.sources,
                           "settings": self.settings.to_dict()},
        }
        if self.lora_spec is not None:
            meta["lora"] = self.lora_spec.to_dict()
        if progress is not None:
            meta["training"] = dataclasses.asdict(progress)
        return meta

    def save(self, name: str, state, progress: Progress | None) -> None:
        """Write checkpoint `name` whole: Ctrl-C meanwhile waits for the write to finish."""
        from lensjax.checkpoint import save_checkpoint

        extra = None
        if progress is not None and self.main:
            leaves, key, _ = self.trainer.host_state(state)
            extra = {TRAIN_STATE: {"key": key, **{f"opt_{i}": x for i, x in enumerate(leaves)}}}
        with self.interrupts.held():
            if self.main:
                save_checkpoint(self.folder.path / name, self.trainer.params(state),
                                self._metadata(progress), overwrite=True, extra=extra)
            if progress is not None:
                self.saved_step = progress.step

    def restore(self):
        """The training state and progress of `self.resumed` (latest/, read by `read_latest`)."""
        resumed, self.resumed = self.resumed, None
        progress = resumed.progress
        state = self.trainer.restore(resumed.params, resumed.opt_leaves, resumed.key,
                                     progress.step, self.folder.read_ewc(self.settings))
        if progress.plateau is not None:
            state = self.trainer.with_lr_scale(state, progress.plateau["scale"])
        self.saved_step = progress.step
        if self.main:
            self.folder.rewind_metrics(progress.step)
        say(f"resuming {self.folder.path} at epoch {progress.epoch + 1}, batch "
             f"{progress.batch}, step {progress.step}")
        return state, progress

    # -- the loop

    def run(self, resume: bool) -> Progress:
        """Train until the epochs, --max-steps or the patience run out; Ctrl-C raises
        KeyboardInterrupt after the step it arrives in."""
        with self.interrupts.held():
            return self._loop(resume)

    def _loop(self, resume: bool) -> Progress:
        from tqdm import tqdm

        from lensjax.train.step import Batch

        settings = self.settings
        if resume:
            state, self.progress = self.restore()
        else:
            state = self.trainer.init(self.params, settings.seed, self.estimate_ewc())
            self.params = {}  # the state holds them now
            if self.plateau is not None:
                self.progress.plateau = self.plateau.initial()
        progress = self.progress
        per_epoch = len(self.batches)
        window: list[float] = []
        window_start = time.perf_counter()

        def flush(epoch: int) -> None:
            nonlocal window, window_start
            if window and self.main:
                elapsed = time.perf_counter() - window_start
                self.folder.log({"step": progress.step, "epoch": epoch + 1,
                                 "train_loss": float(np.mean(window)), "lr": self.rates(),
                                 "samples_per_s": len(window) * settings.batch_size / elapsed})
            window, window_start = [], time.perf_counter()

        max_steps = settings.max_steps or math.inf

        while (progress.epoch < settings.epochs and not progress.stopped_early
               and progress.step < max_steps):
            epoch = progress.epoch
            last = min(per_epoch, progress.batch + max_steps - progress.step)  # batches to run
            bar = tqdm(total=last, initial=progress.batch, unit="step", dynamic_ncols=True,
                       mininterval=0.1 if sys.stderr.isatty() else 30,  # logs: a line per 30 s
                       desc=f"{self.phase.name} epoch {epoch + 1}/{settings.epochs}",
                       disable=not self.main or not self.progress_bar)
            for index, b in enumerate(self.batches.epoch(epoch, progress.batch),
                                      progress.batch):
                state, metrics = self.trainer.step(
                    state, Batch(b.features, b.inputs, b.targets, b.lengths))
                loss = metrics["loss"]
                if not math.isfinite(loss):
                    bar.close()
                    raise NonFiniteLoss(
                        f"the training loss became {loss} at step {progress.step + 1} (epoch "
                        f"{epoch + 1}, batch {index + 1}); {self.last_good()}. Lower the "
                        "learning rate (--lr) and --resume, or check the input features")
                progress.step, progress.batch = progress.step + 1, index + 1
                window.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if progress.step % settings.log_every == 0:
                    rate = len(window) * settings.batch_size / (time.perf_counter()
                                                                - window_start)
                    bar.set_postfix(loss=f"{np.mean(window):.4f}", samples_s=f"{rate:.1f}")
                    flush(epoch)
                self.interrupts.check()
                if index + 1 == last:  # the epoch's end, or --max-steps
                    break
                if progress.step % settings.save_every == 0:
                    flush(epoch)
                    self.save(LATEST, state, progress)
            bar.close()
            flush(epoch)
            val = self.validate(state)
            if not math.isfinite(val):
                raise NonFiniteLoss(f"the validation loss is {val} after epoch {epoch + 1} "
                                    f"(step {progress.step}); {self.last_good()}")
            improved = val < progress.best_val
            progress.epoch, progress.batch = epoch + 1, 0
            progress.best_val = min(val, progress.best_val)
            progress.bad_epochs = 0 if improved else progress.bad_epochs + 1
            progress.stopped_early = (progress.bad_epochs >= settings.patience
                                      and progress.epoch < settings.epochs)
            if self.main:
                self.folder.log({"step": progress.step, "epoch": epoch + 1, "val_loss": val,
                                 "best": improved})
            say(f"epoch {epoch + 1}: validation loss {val:.4f}"
                 + (" (best so far: saved best/)" if improved else
                    f" (best {progress.best_val:.4f}; {progress.bad_epochs} of "
                    f"{settings.patience} epochs without improvement)"))
            if improved:
                self.save(BEST, state, None)
            if self.plateau is not None:
                state = self.reduce_on_plateau(state, val)
            self.save(LATEST, state, progress)
            if progress.stopped_early:
                say(f"early stop: no improvement for {settings.patience} epochs")
        return progress

    def rates(self) -> dict[str, float]:
        """The learning rates now (the phase's, scaled by ReduceLROnPlateau)."""
        scale = self.progress.plateau["scale"] if self.progress.plateau else 1.0
        # 7 digits: the scale is a float32 product
        return {k: float(f"{v * scale:.7g}") for k, v in self.settings.learning_rates.items()}

    def reduce_on_plateau(self, state, val: float):
        """The epoch's validation loss into the plateau schedule; when it lowers the
        learning rates, `state` at the new scale (and, v2, with the best weights back)."""
        import jax

        from lensjax.checkpoint import load_checkpoint

        before = self.progress.plateau["scale"]
        self.progress.plateau = self.plateau.update(self.progress.plateau, val)
        scale = self.progress.plateau["scale"]
        if scale >= before:
            return state
        rates = ", ".join(f"{k} {v:.3g}" for k, v in self.rates().items())
        if self.plateau.reload_best:
            say(f"learning rates reduced to {rates}; reloading the best weights")
            if jax.process_count() > 1:  # process 0 has written best/ before anyone reads it
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("best weights written")
            state = self.trainer.with_params(
                state, load_checkpoint(self.folder.path / BEST, merge_lora=False)[0])
        else:
            say(f"learning rates reduced to {rates}")
        if self.main:
            self.folder.log({"step": self.progress.step, "event": "lr_reduced",
                             "lr": self.rates(), "reloaded_best": self.plateau.reload_best})
        return self.trainer.with_lr_scale(state, scale)

    def last_good(self) -> str:
        """Which step latest/ holds, for messages."""
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return (f"nothing after step {self.saved_step} was saved: {self.folder.path / LATEST} "
                "is the last good checkpoint")

    def estimate_ewc(self):
        """EWC's anchor (the initial trained weights) and diagonal Fisher on --ewc-data, saved
        into the run folder's ewc/ (None without --ewc)."""
        from lensjax.data.batching import CaptionBatches
        from lensjax.train.step import Batch

        settings = self.settings
        if settings.ewc is None:
            return None
        import jax

        pairs = usable(self.data.ewc, self.data, False, "--ewc-data", say)
        if len(pairs) < settings.batch_size:
            raise TrainError(f"--ewc-data: {len(pairs)} pairs cannot fill one batch of "
                             f"{settings.batch_size}")
        batches = CaptionBatches(pairs, self.data.cache, self.tokenizer,
                                 batch_size=settings.batch_size, max_len=settings.max_len,
                                 seed=settings.seed, process_index=jax.process_index(),
                                 process_count=jax.process_count())
        count = min(settings.ewc_batches, len(batches))
        say(f"EWC: estimating the Fisher information on {count} batches of --ewc-data")
        chosen = (Batch(b.features, b.inputs, b.targets, b.lengths)
                  for b in itertools.islice(batches.epoch(0), count))
        try:
            ewc = self.trainer.estimate_ewc(self.params, chosen)
        except ValueError as error:
            raise TrainError(f"--ewc: {error}") from None
        if self.main:
            with self.interrupts.held():
                self.folder.write_ewc(ewc, self._metadata(None), count)
        return ewc

    def validate(self, state) -> float:
        """The validation loss (with --mix: each source's, logged, and their mix-weighted
        mean)."""
        from lensjax.train.step import Batch

        losses = {}
        for name, batches in self.val_batches.items():
            count = len(batches)
            if self.settings.val_batches is not None:
                count = min(count, self.settings.val_batches)
            values = []
            for index in range(count):
                b = batches.batch(0, index)
                values.append(self.trainer.eval_loss(
                    state, Batch(b.features, b.inputs, b.targets, b.lengths)))
                self.interrupts.check()
            losses[name] = float(np.mean(values))
        if not self.settings.mix:
            return losses[""]
        if self.main:
            self.folder.log({"step": self.progress.step, "val_loss_by_source": losses})
        say("validation loss by source: " + ", ".join(f"{n} {v:.4f}" for n, v in losses.items()))
        return float(sum(self.settings.mix[n] * v for n, v in losses.items()))

    # -- end of phase

    def evaluate(self) -> dict[str, Any]:
        """Caption validation images with the best weights; both BLEU-4 protocols."""
        from lensjax.api import load_pretrained
        from lensjax.evaluate import EvaluationError, corpus_bleu4, seed_bleu4

        model = load_pretrained(self.folder.path / BEST)
        keys = [k for k in self.data.val if k in self.data.cache][: self.settings.eval_images]
        features = self.data.cache.get_batch(keys).astype(np.float32)
        if self.data.from_pixels:
            features = model.encode_padded(features)
        tokens = model.generate(features, self.settings.eval_method,
                                max_new_tokens=self.settings.max_len - 1,
                                seed=self.settings.seed)
        predictions = {k: model.tokenizer.decode_caption(t) for k, t in zip(keys, tokens,
                                                                            strict=True)}
        references = {k: self.data.val[k] for k in keys}
        report: dict[str, Any] = {"images": len(keys), "method": self.settings.eval_method,
                                  "lenstowords_bleu4": seed_bleu4(predictions, references)}
        try:
            report["corpus_bleu4"], report["corpus_tokenizer"] = corpus_bleu4(predictions,
                                                                              references)
        except EvaluationError as error:
            say(f"corpus BLEU-4 skipped: {error}")
        report["samples"] = [{"image": k, "caption": predictions[k],
                              "references": references[k][:2]} for k in keys[:5]]
        return report


def run_phase(trainer_run: PhaseRun, start: Start, command: Sequence[str]) -> dict[str, Any]:
    """Write run.json (recording `command`, the command line that started the run), train,
    evaluate; -> the final run.json document, which ends `done`, `failed` or `interrupted`."""
    import jax

    folder, settings, phase = trainer_run.folder, trainer_run.settings, trainer_run.phase
    document: dict[str, Any] = {
        "phase": phase.name, "summary": phase.summary, "settings": settings.to_dict(),
        "init": trainer_run.provenance, "data": trainer_run.data.sources, "status": "running",
        "command": list(command),
        "devices": jax.device_count(), "processes": jax.process_count(),
    }
    trained = False
    try:
        with trainer_run.interrupts.held():  # the folder is cleared or tidied whole
            if trainer_run.main:
                folder.begin(start, say)
                folder.write_run(document)
        say(f"phase {phase.name} ({phase.summary}): {len(trainer_run.batches)} steps per "
             f"epoch of {settings.batch_size} on {jax.device_count()} device(s); training "
             + ", ".join(f"{k} at {v:g}" for k, v in settings.learning_rates.items()))
        progress = trainer_run.run(start.resume)
        trained = True
        document.update(status="done", step=progress.step, stopped_early=progress.stopped_early,
                        best_val_loss=progress.best_val)
        if trainer_run.main:
            finish(trainer_run, document)
    except KeyboardInterrupt:
        trainer_run.interrupts.absorb()
        record_stop(trainer_run, document, "interrupted", "Ctrl-C (SIGINT)")
        raise Interrupted(interrupted_message(trainer_run, trained)) from None
    except Exception as error:
        trainer_run.interrupts.absorb()
        record_stop(trainer_run, document, "failed", str(error) or type(error).__name__)
        raise
    return document


def finish(trainer_run: PhaseRun, document: dict[str, Any]) -> None:
    """The end of a phase (process 0): evaluation, eval.json, loss.png, run.json `done`."""
    folder, settings, phase = trainer_run.folder, trainer_run.settings, trainer_run.phase
    if settings.eval_images > 0:
        report = trainer_run.evaluate()
        document["eval"] = {k: v for k, v in report.items() if k != "samples"}
        from lensjax.files import write_text_atomic

        write_text_atomic(folder.path / "eval.json", json.dumps(report, indent=2))
        folder.log({"event": "eval", **document["eval"]})
        say(format_report(phase.name, report))
    if settings.plot:
        plot_losses(folder.records(), folder.path / "loss.png", f"phase {phase.name}")
    trainer_run.interrupts.check()  # a Ctrl-C that a library callback caught and dropped
    folder.write_run(document)


def record_stop(trainer_run: PhaseRun, document: dict[str, Any], status: str,
                reason: str) -> None:
    """run.json `failed` or `interrupted`, with the step reached, the step latest/ holds and
    the reason; also a metrics.jsonl event. A write that fails too is left out, so that the
    first error is the one reported."""
    document.update(status=status, step=trainer_run.progress.step,
                    saved_step=trainer_run.saved_step, reason=reason)
    if trainer_run.main and trainer_run.folder.run_file.is_file():
        with contextlib.suppress(OSError):
            trainer_run.folder.write_run(document)
            trainer_run.folder.log({"event": status, "step": trainer_run.progress.step,
                                    "reason": reason})


def interrupted_message(trainer_run: PhaseRun, trained: bool) -> str:
    """Where an interrupted run stands, and how --resume continues it."""
    latest, name = trainer_run.folder.path / LATEST, trainer_run.phase.name
    if trained:
        return (f"interrupted (Ctrl-C) in the end-of-phase evaluation of phase {name}; "
                f"training is complete ({latest} holds step {trainer_run.saved_step}): the same "
                "command with --resume runs the evaluation again")
    where = f"interrupted (Ctrl-C) after step {trainer_run.progress.step} of phase {name}"
    if trainer_run.saved_step is None:
        return (where + ", before the first checkpoint: the same command with --resume starts "
                "the phase again")
    return (where + f"; {latest} holds step {trainer_run.saved_step}: the same command with "
            "--resume continues from there")
