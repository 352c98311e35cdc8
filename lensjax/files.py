"""Output files: write-then-rename through hidden sibling paths, and checking an output
location before any work starts."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique path next to `path` (`.NAME.TAG-xxxxxxxx`), for write-then-rename."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a fsynced temporary sibling renamed into place, so a
    reader sees the old file or the whole new one, never a part."""
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OutputError(ValueError):
    """An output location cannot be written; the message names it and says why."""


def check_output(path: str | os.PathLike, *, directory: bool = False) -> Path:
    """Fail before any work starts if `path` cannot be written as a file (or, with
    `directory`, as a folder that is created or already exists).

    Refused: a file output that is an existing folder, a folder output that is an existing
    file, a location under a regular file, and one whose nearest existing folder cannot be
    written (tried by creating and removing an anonymous file there). Missing parent folders
    are allowed: writers create them. Returns `path` as a Path.
    """
    path = Path(path)
    if path.is_dir() and not directory:
        raise OutputError(f"{path} is a folder; give a file name for the output")
    if path.exists() and not path.is_dir() and directory:
        raise OutputError(f"{path} is a file; the output must be a folder")
    ancestor = path.absolute().parent if not path.is_dir() else path.absolute()
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {path}: {ancestor} is not a folder")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as error:
        raise OutputError(f"cannot write {path}: {ancestor} is not writable "
                          f"({error.strerror or error})") from error
    return path


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as a PNG through a temporary sibling renamed into place, and
    close it."""
    import matplotlib.pyplot as plt

    tmp = temporary_sibling(path)
    try:
        fig.savefig(tmp, format="png")
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
