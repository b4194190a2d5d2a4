"""Writing files so that a crash never leaves a half-written one in place: stage, fsync, rename.

Every file a run leaves for users or for a resume (checkpoint state, `best/`, `results.json`, `data_report.json`,
`config.json`) goes through here. A rename within one filesystem is atomic: readers see the old file or the new
one, never a mixture. The fsyncs make the rename durable: without them a power loss can keep the new name but
lose the data behind it, or lose the new name after the old one is gone.

A folder's files can also be checksummed (`file_checksums`, SHA-256 and size per file) and checked against what
was recorded (`checksum_problems`): a rename protects against a crash, not against a truncated copy or a bad disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` through a temporary file beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:  # a full disk: leave no partial temporary file behind
        temporary.unlink(missing_ok=True)
        raise
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


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_checksums(folder: str | Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """`{relative path: {"sha256": ..., "bytes": ...}}` for every file below `folder` except `skip` (its top-level
    names), in sorted order."""
    folder = Path(folder)
    return {path.relative_to(folder).as_posix(): {"sha256": sha256_of(path), "bytes": path.stat().st_size}
            for path in sorted(folder.rglob("*")) if path.is_file() and path.relative_to(folder).parts[0] not in skip}


def checksum_problems(folder: str | Path, recorded: dict[str, dict]) -> list[str]:
    """What is wrong with the files `recorded` lists in `folder`, one line per file (missing, a different size,
    a different SHA-256); empty when all match. Files that were not recorded are not checked."""
    folder, problems = Path(folder), []
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (size := path.stat().st_size) != expected["bytes"]:
            problems.append(f"{name}: {size:,} bytes, {expected['bytes']:,} when saved"
                            + (" (truncated)" if size < expected["bytes"] else ""))
        elif sha256_of(path) != expected["sha256"]:
            problems.append(f"{name}: SHA-256 differs from the one recorded when saved (the file is corrupt)")
    return problems
