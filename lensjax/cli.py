"""What lensjax's command-line tools share: an argparse parser whose usage errors are one
`error:` line, argument types that name the allowed range, one-line OSError messages, and the
exit codes every tool documents."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from lensjax.checks import SEED_MAX

EXIT_DONE, EXIT_PARTIAL, EXIT_BAD_INPUT, EXIT_NON_FINITE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
CACHE_ENV = "LENSJAX_CACHE_DIR"

__all__ = ["CACHE_ENV", "EXIT_BAD_INPUT", "EXIT_DONE", "EXIT_INTERRUPTED", "EXIT_NON_FINITE",
           "EXIT_PARTIAL", "SEED_MAX", "CliParser", "describe_os_error",
           "enable_compilation_cache", "finite_float", "int_in"]


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors end in one `error: ...` line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse `type=`: an integer in low..high (no upper bound when `high` is None)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def finite_float(low: float | None = None) -> Callable[[str], float]:
    """argparse `type=`: a finite float (>= `low` when given)."""
    allowed = "a finite number" + ("" if low is None else f" >= {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and value < low):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value

    return parse


def describe_os_error(error: OSError) -> str:
    """An OSError as one line naming its file: `PATH: reason`."""
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def enable_compilation_cache() -> Path:
    """Persist compiled programs across runs (JAX's on-disk compilation cache) in
    $LENSJAX_CACHE_DIR, default ~/.cache/lensjax/jax: a second run of the same program (a
    caption run, a resumed training phase) skips compiling it."""
    import jax

    directory = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lensjax" / "jax"))
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
