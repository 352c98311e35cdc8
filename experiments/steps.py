"""What `make demo` and `make forgetting` share: running a lensjax command line, in this
process or in a child process that sees the CPU's cores as separate XLA devices."""

from __future__ import annotations

import os
import subprocess
import sys

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def run_cli(who: str, module, argv: list[str]) -> None:
    """Run a lensjax command-line entry point (`module.main`) in this process, printing the
    command; stop experiment `who` if it fails."""
    print("   $ python -m " + module.__name__ + " " + " ".join(argv), flush=True)
    code = module.main(argv)
    if code:
        sys.exit(f"{who}: python -m {module.__name__} failed with exit status {code}")


def run_cli_on_cores(who: str, module_name: str, argv: list[str], devices: int) -> None:
    """Run `python -m module_name argv` in a child process whose XLA shows `devices` CPU
    devices (`XLA_FLAGS=--xla_force_host_platform_device_count`; a count the user set is
    kept), so a data-parallel command splits its batches over the cores; stop experiment
    `who` if it fails."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG not in flags:
        env["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={devices}".strip()
    print(f"   $ XLA_FLAGS={env['XLA_FLAGS']} python -m {module_name} {' '.join(argv)}",
          flush=True)
    code = subprocess.call([sys.executable, "-m", module_name, *argv], env=env)
    if code:
        sys.exit(f"{who}: python -m {module_name} failed with exit status {code}")
