"""File writes that a kill or a concurrent reader never sees half done."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path`` and rename it into place: readers (and a kill) see the
    old file or the new one, never part of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
