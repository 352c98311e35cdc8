"""Write-then-rename: the hidden sibling paths that every atomic write in lensjax uses."""

from __future__ import annotations

import uuid
from pathlib import Path


def temporary_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden, unique path next to `path` (`.NAME.TAG-xxxxxxxx`), for write-then-rename."""
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"
