"""One writer per output folder: a run holds a lock on `<output_dir>/run.lock` for as long as it lives.

The lock file holds who took it (PID, host, start time, command), so a second run on the same folder, and
`scripts/evaluate.py` asked to write inside it, can say which process is using it. The lock itself is a POSIX
record lock (`fcntl.lockf`) on a descriptor the run keeps open: the kernel drops it when the process ends in any way
(kill -9 included), so a lock left by a dead run is free and the next run takes it over, with a note.

Why `lockf` and not `flock`: an `flock` lock belongs to the open file, which forked children inherit. The
`datasets.map` worker pool (`data.num_proc`) and DataLoader workers are forked after the lock is taken, and after a
kill -9 of the run the map's workers live on as orphans (seen: three `prepare_data.py` workers still sleeping
under PID 1 after their parent was killed), which would keep an `flock` held with no run behind it. POSIX record
locks belong to the process and are not inherited by `fork`. Their catch, that closing *any* descriptor of the file
in the holding process drops the lock, is why this module never opens a lock file that its own process holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_FILE = "run.lock"
_HELD: dict[str, int] = {}  # resolved folder -> the open descriptor holding its lock, in this process
_HOLDERS: dict[str, Holder] = {}


class FolderInUseError(RuntimeError):
    """Another running process holds the output folder's lock; the message names it."""


@dataclass
class Holder:
    """Who holds (or last held) a folder's lock, as its lock file says."""

    pid: int
    host: str
    started: str
    """UTC, ISO 8601."""
    command: str

    def describe(self, command: bool = True) -> str:
        return f"PID {self.pid} on {self.host}, started {self.started}" + (f": {self.command}" if command else "")


def _key(folder: str | Path) -> str:
    return str(Path(folder).resolve())


def _read_holder(descriptor: int) -> Holder | None:
    text = os.pread(descriptor, 65536, 0).decode("utf-8", "replace")
    try:
        values = json.loads(text)
        return Holder(int(values["pid"]), str(values["host"]), str(values["started"]), str(values["command"]))
    except (ValueError, KeyError, TypeError):
        return None


def acquire(folder: str | Path, command: str | None = None) -> str:
    """Takes `folder`'s lock for this process (creating the folder); returns a note when it took over the lock of
    a process that is gone, else "". Raises FolderInUseError when a running process holds it. Taking a lock this
    process already holds is a no-op (in-process runs one after another on one folder)."""
    key = _key(folder)
    if key in _HELD:
        return ""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(descriptor)
        os.close(descriptor)
        who = holder.describe() if holder else "another process (its lock file names none)"
        raise FolderInUseError(
            f"output_dir {folder} is in use by another run: {who}. Two runs in one folder would overwrite each "
            "other's checkpoints: wait for it to finish, stop it (kill -TERM saves a checkpoint, then resume with "
            "--train.resume=true), or choose another --output_dir"
        ) from None
    previous = _read_holder(descriptor)
    holder = Holder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    command or shlex.join([os.path.basename(sys.executable), *sys.argv]))
    data = json.dumps(asdict(holder)).encode()
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, data, 0)
    os.fsync(descriptor)
    _HELD[key], _HOLDERS[key] = descriptor, holder
    if previous is None:
        return ""
    return (f"note: took over the lock of {folder} left by {previous.describe(command=False)}, which ended without "
            "releasing it (killed?) and is no longer running")


def release(folder: str | Path) -> None:
    """Drops this process's lock on `folder` (a no-op when it holds none). The file is emptied first: a lock file
    that still names a process is one whose run died holding it."""
    key = _key(folder)
    descriptor = _HELD.pop(key, None)
    _HOLDERS.pop(key, None)
    if descriptor is not None:
        os.ftruncate(descriptor, 0)
        os.close(descriptor)  # closing the descriptor drops the lock


def holder_of(folder: str | Path) -> Holder | None:
    """The running process that holds `folder`'s lock (this one included), or None when no run holds it."""
    key = _key(folder)
    if key in _HOLDERS:
        return _HOLDERS[key]
    path = Path(folder) / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            # A shared lock is refused while a run holds its exclusive one; it is dropped again at once.
            fcntl.lockf(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(descriptor) or Holder(0, "?", "?", "?")
        fcntl.lockf(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def locked_run_around(path: str | Path) -> tuple[Path, Holder] | None:
    """(run folder, holder) when `path` or one of its parents is the output folder of a run that is running now."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if (folder / LOCK_FILE).is_file() and (holder := holder_of(folder)) is not None:
            return folder, holder
    return None


def refuse_inside_running_run(path: str | Path, option: str = "--output_dir") -> str:
    """An error message when `path` lies in the folder of a running training run (which owns everything in it),
    else ""."""
    found = locked_run_around(path)
    if found is None:
        return ""
    folder, holder = found
    return (f"{option} {path} is inside {folder}, the folder of a training run that is running now ({holder.describe()}): "
            "write elsewhere (e.g. runs/eval-NAME), or wait until the run has finished")
