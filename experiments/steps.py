"""What `make demo` and `make forgetting` share: running a lensjax command line in this
process, and the small random-initialised encoder both extract features with."""

from __future__ import annotations

import sys
from pathlib import Path

from flax import nnx

from lensjax import Captioner, CaptionerConfig, CaptionModel


def run_cli(who: str, module, argv: list[str]) -> None:
    """Run a lensjax command-line entry point (`module.main`) in this process, printing the
    command; stop experiment `who` if it fails."""
    print("   $ python -m " + module.__name__ + " " + " ".join(argv), flush=True)
    code = module.main(argv)
    if code:
        sys.exit(f"{who}: python -m {module.__name__} failed with exit status {code}")


def save_random_encoder(path: Path, created_by: str) -> None:
    """The `demo` preset's ConvNeXt and head, random-initialised (seed 0), saved to `path`:
    the frozen encoder the experiments extract features with."""
    encoder = CaptionModel(Captioner(CaptionerConfig.from_preset("demo"), rngs=nnx.Rngs(0)),
                           {"provenance": {"created_by": created_by, "note": "random encoder"}})
    encoder.save(path)
