"""Writing files so that a crash never leaves a half-written one in place: stage, fsync, rename.

Every file a run leaves for users or for a resume (checkpoint state, `best/`, `results.json`, `data_report.json`,
`config.json`) goes through here. A rename within one filesystem is atomic: readers see the old file or the new
one, never a mixture. The fsyncs make the rename durable: without them a power loss can keep the new name but
lose the data behind it, or lose the new name after the old one is gone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` through a temporary file beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | Path, values) -> Path:
    """`values` as indented JSON (non-ASCII text kept readable), atomically."""
    return write_text_atomic(path, json.dumps(values, indent=2, ensure_ascii=False))


def replace_dir(staging: Path, final: Path) -> None:
    """Moves the complete folder `staging` to `final`, replacing an older `final` only once the new one is whole:
    the old one is renamed aside first and deleted last, so at every moment one complete folder exists."""
    fsync_dir(staging)
    previous = final.with_name(f".old-{final.name}")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Makes the folder's entries (new names, renames) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
