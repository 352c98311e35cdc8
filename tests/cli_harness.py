"""Run a lensjax CLI as a user would, and check the contract every CLI keeps on bad input.

The contract (issue "Hardening"): the documented exit code; exactly one `error:` line on
stderr, naming the bad input; no Python traceback; no file lost, changed or half-written
(no hidden `.NAME.tmp-*` / `.NAME.old-*` siblings left behind); no process alive after
`timeout` seconds (the whole process group is killed, and the case fails).

    result = run_cli("lensjax.caption", ["photos/", "--out", "x.csv"], cwd=tmp_path)
    assert_refused(result, code=2, names="x.csv")

A process costs ~2 s of start-up (jax, flax), so `call_main` runs a CLI's `main(argv)` in
this process instead where process-level behaviour (hangs, signals, exit-time noise) is not
what the case is about; an exception escaping `main` fails the test as a traceback would.

`Case` rows make a table: `pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))`,
checked by `check_case(runner, case, tmp)` with `runner = subprocess_runner(module)` or
`in_process_runner(main, capsys)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACEBACK = "Traceback (most recent call last)"
TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


@dataclasses.dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    seconds: float


def run_cli(
    module: str,
    args: Sequence[str | os.PathLike],
    *,
    cwd: Path,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
    interrupt_after: float | None = None,
    interrupt_when: Callable[[], bool] | None = None,
) -> CliResult:
    """`python -m module *args` in its own process group; the case fails if any process of
    the group outlives `timeout` seconds (the group is killed first).

    `interrupt_after` sends SIGINT (Ctrl-C) to the group that many seconds after start, or
    as soon as `interrupt_when()` is true after that, to test interrupted runs.
    """
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.setdefault("LENSJAX_CACHE_DIR", str(cwd / ".jax-cache"))
    command = [sys.executable, "-m", module, *map(str, args)]
    start = time.monotonic()
    with _ctrl_c_deliverable():
        process = subprocess.Popen(command, cwd=cwd, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   start_new_session=True, text=True, errors="replace")
    try:
        if interrupt_after is not None:
            _wait_then_interrupt(process, start, interrupt_after, interrupt_when, timeout)
        stdout, stderr = process.communicate(timeout=max(0.1, timeout - (time.monotonic()
                                                                        - start)))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"`{' '.join(command)}` was still running after {timeout:.0f}s (killed)\n"
            f"stderr:\n{stderr[-3000:]}") from None
    finally:
        _kill_group_leftovers(process.pid)
    return CliResult(process.returncode, stdout, stderr, time.monotonic() - start)


def call_main(main: Callable[[list[str]], int], argv: Sequence[str | os.PathLike],
              capsys) -> CliResult:
    """`main(argv)` in this process, its stdout/stderr captured by pytest's `capsys`;
    argparse's SystemExit becomes the exit code."""
    capsys.readouterr()
    start = time.monotonic()
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err, time.monotonic() - start)


Runner = Callable[[list[str], Path], CliResult]


def subprocess_runner(module: str, timeout: float = 30.0) -> Runner:
    return lambda argv, tmp: run_cli(module, argv, cwd=tmp, timeout=timeout)


def in_process_runner(main: Callable[[list[str]], int], capsys) -> Runner:
    return lambda argv, tmp: call_main(main, argv, capsys)


@contextlib.contextmanager
def _ctrl_c_deliverable() -> Iterator[None]:
    """SIGINT at its default while a CLI is started. A shell starts background jobs
    (`make test &`) with SIGINT ignored, Python keeps an ignored SIGINT ignored, and children
    inherit that: the CLI would then never see the Ctrl-C a test sends it."""
    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wait_then_interrupt(process, start, after, when, timeout) -> None:
    while time.monotonic() - start < after and process.poll() is None:
        time.sleep(0.05)
    while when is not None and not when() and process.poll() is None:
        if time.monotonic() - start > timeout:
            return
        time.sleep(0.05)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)


def _kill_group_leftovers(group: int) -> None:
    """Fail loudly if the CLI left a child process of its group running."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return
    os.killpg(group, signal.SIGKILL)
    raise AssertionError(f"process group {group} still had a live process after the CLI exited")


def assert_refused(result: CliResult, code: int, names: str | Sequence[str]) -> str:
    """Exit `code`, one `error:` line that contains each of `names`, no traceback.

    Returns the error line.
    """
    assert TRACEBACK not in result.stderr, f"traceback on stderr:\n{result.stderr[-3000:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one `error:` line, got {errors}:\n{result.stderr[-3000:]}"
    for name in [names] if isinstance(names, str) else names:
        assert name in errors[0], f"{name!r} not named in {errors[0]!r}"
    assert result.code == code, f"exit {result.code}, expected {code}:\n{result.stderr[-3000:]}"
    return errors[0]


def assert_clean_exit(result: CliResult, code: int) -> None:
    """Exit `code` and no traceback (for runs that partly succeed: skipped files, ...)."""
    assert TRACEBACK not in result.stderr, f"traceback on stderr:\n{result.stderr[-3000:]}"
    assert result.code == code, f"exit {result.code}, expected {code}:\n{result.stderr[-3000:]}"


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: content hash} of every regular file under `folder` (links not followed,
    the JAX compilation cache ignored)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".jax-cache"]
        for name in names:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                files[str(path.relative_to(folder))] = hashlib.sha256(
                    path.read_bytes()).hexdigest()
    return files


def assert_nothing_lost(before: dict[str, str], folder: Path,
                        allow_new: Callable[[str], bool] = lambda _: False) -> None:
    """Every file of `before` is still there with the same bytes; new files only where
    `allow_new(relative path)`; no temporary sibling anywhere under `folder`."""
    after = snapshot(folder)
    lost = sorted(p for p in before if p not in after)
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    new = sorted(p for p in after if p not in before and not allow_new(p))
    assert not lost and not changed, f"lost {lost}, changed {changed}"
    assert not new, f"unexpected new files {new}"
    leftovers = [str(p.relative_to(folder)) for p in folder.rglob(".*")
                 if TEMPORARY.match(p.name)]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@dataclasses.dataclass
class Case:
    """One bad input: `args` may contain `{tmp}` (the case's working folder); `setup(tmp)`
    makes the files the case needs; the CLI must exit `code` naming `names`."""

    id: str
    args: list[str]
    code: int
    names: str | list[str]
    setup: Callable[[Path], None] | None = None

    def argv(self, tmp: Path) -> list[str]:
        return [arg.replace("{tmp}", str(tmp)) for arg in self.args]


def case_ids(cases: Sequence[Case]) -> list[str]:
    return [case.id for case in cases]


def check_case(runner: Runner, case: Case, tmp: Path) -> CliResult:
    """Set the case up in `tmp`, run it, and check the whole contract."""
    if case.setup is not None:
        case.setup(tmp)
    before = snapshot(tmp)
    result = runner(case.argv(tmp), tmp)
    names = [case.names] if isinstance(case.names, str) else case.names
    assert_refused(result, case.code, [name.replace("{tmp}", str(tmp)) for name in names])
    assert_nothing_lost(before, tmp)
    return result
