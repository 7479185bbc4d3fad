"""Atomic file writes: a reader, or a run resumed after a crash, sees the old file or the new one.

Everything fedmae writes for later reading (checkpoints, split files, results, reports) goes
through :func:`atomic_write`: the content goes to a temporary file in the target's folder, is
flushed to disk, and is renamed over the target. A half-written file never appears under the real
name, and a crash in the middle leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write`` on a binary temporary file beside ``path``, fsync it and rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a small text file (a result, a report) so that readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, allow_nan: bool = True) -> Path:
    """``obj`` as JSON (``json.dumps(obj, indent=indent, allow_nan=allow_nan)``), written like
    :func:`atomic_write_text`; ``allow_nan=False`` for strict JSON (NaN refused, not written)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=allow_nan))
