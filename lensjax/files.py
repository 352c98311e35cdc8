"""Write-then-rename: the hidden sibling paths that every atomic write in lensjax uses."""

from __future__ import annotations

import os
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
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
