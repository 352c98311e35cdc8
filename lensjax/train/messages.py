"""What `python -m lensjax.train` tells its user: the errors it stops with, progress lines,
and the end-of-phase report."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any


class TrainError(RuntimeError):
    """A problem with the command's input, explained for the user."""


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT) stopped the command; the message says where the run stands."""


def say(message: str) -> None:
    """Print `message` above the progress bar (process 0 only)."""
    import jax

    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def format_report(phase: str, report: Mapping[str, Any]) -> str:
    """The end-of-phase evaluation (`PhaseRun.evaluate`) as printable lines."""
    lines = [f"phase {phase}: {report['method']} captions of {report['images']} validation "
             "images"]
    for sample in report["samples"]:
        lines.append(f"  {sample['image']}: {sample['caption']}")
        lines += [f"  {'':>{len(sample['image'])}}  ref: {r}" for r in sample["references"]]
    lines.append(f"  LensToWords BLEU-4 (mean sentence BLEU): {report['lenstowords_bleu4']:.4f}")
    if "corpus_bleu4" in report:
        lines.append(f"  corpus BLEU-4 (pycocoevalcap, {report['corpus_tokenizer']} tokens): "
                     f"{report['corpus_bleu4']:.4f}")
    return "\n".join(lines)
