"""What `make demo` and `make forgetting` share: running a lensjax command line in this
process."""

from __future__ import annotations

import sys


def run_cli(who: str, module, argv: list[str]) -> None:
    """Run a lensjax command-line entry point (`module.main`) in this process, printing the
    command; stop experiment `who` if it fails."""
    print("   $ python -m " + module.__name__ + " " + " ".join(argv), flush=True)
    code = module.main(argv)
    if code:
        sys.exit(f"{who}: python -m {module.__name__} failed with exit status {code}")
