"""The prepared-data cache's files are reused only when their preparation finished: a completion marker.

`datasets.map` writes each cache file (one per `num_proc` worker) to a temporary file and renames it into place
when that worker is done, and the next run reuses every file it finds under the expected name. Measured by killing
`scripts/prepare_data.py` with SIGKILL inside the map: the renamed files of finished workers are reused and the
missing ones prepared again, but (1) the killed worker's temporary file (`tmpXXXXXXXX`, as large as what it had
written) stays in the cache folder forever, and (2) nothing is fsynced, so after a power loss or a crash of the
machine a renamed file can be empty or cut short and would still be reused (the next run then fails on it, or
reads a table that is missing rows).

So a split's files count only when `<split>-<fingerprint>.complete.json` lists them with their sizes: it is
written (atomically) after the map returned and its files were fsynced. Before a map, files of that fingerprint
that no complete marker vouches for are removed (`datasets` then prepares them again), and temporary files no
process has written to for `STALE_TEMPORARY_S` are deleted. A cache written before markers existed is prepared
again once.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from loop.files import fsync_dir, write_json_atomic

STALE_TEMPORARY_S = 3600  # a temporary file untouched this long belongs to no live preparation (each map batch writes)


def marker_path(cache_dir: Path, stem: str) -> Path:
    return cache_dir / f"{stem}.complete.json"


def is_complete(cache_dir: Path, stem: str) -> bool:
    """Whether the marker exists and every file it lists is there at its recorded size."""
    try:
        files = json.loads(marker_path(cache_dir, stem).read_text(encoding="utf-8"))["files"]
        return bool(files) and all((cache_dir / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def discard_unfinished(cache_dir: Path, stem: str, now: float | None = None) -> list[Path]:
    """Before preparing `stem`: removes its cache files unless a complete marker vouches for them, and stale
    temporary files of killed preparations; returns what it removed."""
    removed = []
    if not is_complete(cache_dir, stem):
        marker_path(cache_dir, stem).unlink(missing_ok=True)
        for path in cache_dir.glob(f"{stem}*.arrow"):  # the single file and every `_0000N_of_0000M` shard
            path.unlink(missing_ok=True)
            removed.append(path)
    now = time.time() if now is None else now
    for path in cache_dir.glob("tmp*"):
        try:
            if path.is_file() and now - path.stat().st_mtime > STALE_TEMPORARY_S:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another preparation finished and renamed it meanwhile
            pass
    return removed


def mark_complete(cache_dir: Path, stem: str, files: list[str]) -> Path:
    """After the map returned: makes `files` durable, then writes the marker listing them with their sizes."""
    for name in files:
        descriptor = os.open(name, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    fsync_dir(cache_dir)
    return write_json_atomic(marker_path(cache_dir, stem),
                             {"files": {Path(name).name: os.path.getsize(name) for name in files}})


def cached_map(table, function, cache_dir: Path, stem: str, fingerprint: str, **map_kwargs):
    """`table.map(function, ...)` into `<cache_dir>/<stem>.arrow`, reused on the next run only when a complete
    marker vouches for it: unfinished files of `stem` are removed first, and the marker is written once the map's
    files are durable. Every prepared table of a run (splits, no-speech rows) is made through here."""
    discard_unfinished(cache_dir, stem)  # a killed preparation's files are prepared again, never reused
    mapped = table.map(function, cache_file_name=str(cache_dir / f"{stem}.arrow"), load_from_cache_file=True,
                       new_fingerprint=fingerprint, **map_kwargs)
    if not is_complete(cache_dir, stem):  # prepared now, not reused: its files are vouched for from here on
        mark_complete(cache_dir, stem, [f["filename"] for f in mapped.cache_files])
    return mapped
