"""Is a checkpoint intact? Its files against the SHA-256 and sizes `loop_state.json` recorded when it was saved;
which checkpoint a resume uses; every checkpoint of a run checked at once (`scripts/verify_checkpoints.py`).

A rename makes a save atomic against a crash, but a checkpoint can still be damaged afterwards: a partial copy
between machines, a bad disk, a file edited by hand. `--train.resume=true` verifies the newest checkpoint and falls
back to the newest one that passes, naming each one that fails and the file at fault; `--train.resume=step_N`
takes that one (and refuses it when it fails). Checkpoints written before checksums were recorded load unverified,
with a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from loop.files import checksum_problems
from loop.run.best_model import CHECKSUMS_FILE, best_dir
from loop.run.checkpoints import CHECKPOINT, STATE_FILE, checkpoints_dir, list_checkpoints, recorded_checksums

SET_ASIDE_DIR = "set-aside"  # checkpoints/set-aside/: checkpoints newer than the one a resume went back to


class CheckpointError(ValueError):
    """No checkpoint to resume from: the one asked for is missing or fails verification, or none passes."""


@dataclass
class Verification:
    """The outcome of checking one saved folder (a checkpoint or best/)."""

    folder: Path
    problems: list[str] = field(default_factory=list)
    """One line per file at fault (missing, truncated, a different SHA-256)."""
    files: int = 0
    """Files checked."""
    has_checksums: bool = True
    """False for a folder saved before checksums were recorded: nothing could be checked."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        if self.problems:
            return f"{self.folder.name}: " + "; ".join(self.problems)
        if not self.has_checksums:
            return f"{self.folder.name}: no checksums recorded (saved by an earlier version), not verified"
        return f"{self.folder.name}: {self.files} files intact"


def verify_checkpoint(checkpoint: Path) -> Verification:
    """Checks every file `loop_state.json` lists against its recorded size and SHA-256."""
    try:
        recorded = recorded_checksums(checkpoint)
    except ValueError as error:
        return Verification(checkpoint, [str(error)])
    if recorded is None:
        return Verification(checkpoint, has_checksums=False)
    return Verification(checkpoint, checksum_problems(checkpoint, recorded), files=len(recorded))


def verify_best(folder: Path) -> Verification:
    """best/ against its checksums.json (files added after it, such as the model card, are not checked)."""
    listing = folder / CHECKSUMS_FILE
    if not listing.is_file():
        return Verification(folder, has_checksums=False)
    try:
        recorded = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return Verification(folder, [f"{CHECKSUMS_FILE}: unreadable ({error})"])
    return Verification(folder, checksum_problems(folder, recorded), files=len(recorded))


def choose_resume_checkpoint(output_dir: str | Path, resume: bool | str, say=print) -> Path | None:
    """The checkpoint a resume continues from: `step_N` when `resume` names one (refused when it is missing or
    fails verification), else the newest that passes, each failing one named with its files (`say`). None when
    there is no checkpoint at all and `resume` is `true`."""
    checkpoints = list_checkpoints(output_dir)
    folder = checkpoints_dir(output_dir)
    if isinstance(resume, str) and CHECKPOINT.match(resume):
        wanted = [path for _, path in checkpoints if path.name == resume]
        if not wanted:
            available = ", ".join(path.name for _, path in checkpoints) or "none"
            raise CheckpointError(f"--train.resume={resume}: no such checkpoint in {folder} (complete ones: {available})")
        verification = verify_checkpoint(wanted[0])
        if not verification.ok:
            raise CheckpointError(f"--train.resume={resume}: {wanted[0]} fails verification: "
                                  + "; ".join(verification.problems)
                                  + " (python scripts/verify_checkpoints.py lists the run's intact checkpoints)")
        _note_unverified(verification, say)
        return wanted[0]
    failed = []
    for _, path in reversed(checkpoints):
        verification = verify_checkpoint(path)
        if verification.ok:
            _note_unverified(verification, say)
            if failed:
                say(f"resuming from {path.name}, the newest checkpoint that passes verification")
            return path
        failed.append(verification)
        say(f"warning: checkpoint {path} fails verification, not used: " + "; ".join(verification.problems))
    if failed:
        raise CheckpointError(f"no checkpoint in {folder} passes verification: "
                              + " | ".join(v.describe() for v in failed)
                              + "; start afresh with --train.overwrite_output_dir=true")
    return None


def _note_unverified(verification: Verification, say) -> None:
    if not verification.has_checksums:
        say(f"note: {verification.folder} has no checksums (saved by an earlier version): loading it unverified")


def set_aside_newer(output_dir: str | Path, resumed: Path, say=print) -> list[Path]:
    """Moves the checkpoints newer than `resumed` to `checkpoints/set-aside/`: the resumed run would otherwise
    rotate them in place of its own new ones (they are newer) or overwrite them when it reaches their step. They are
    kept, not deleted; returns their new paths."""
    resumed_step = int(CHECKPOINT.match(resumed.name).group(1))
    moved = []
    for step, path in list_checkpoints(output_dir):
        if step <= resumed_step:
            continue
        target = checkpoints_dir(output_dir) / SET_ASIDE_DIR / path.name
        number = 1
        while target.exists():
            target = target.with_name(f"{path.name}.{number}")
            number += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        moved.append(target)
        say(f"moved {path.name} (newer than {resumed.name}, the checkpoint resumed) to {target}: the resumed run "
            "writes its own; delete it once you no longer need it")
    return moved


def verify_run(run_dir: str | Path) -> list[Verification]:
    """Every complete checkpoint of a run, oldest first, and best/ when it exists."""
    results = [verify_checkpoint(path) for _, path in list_checkpoints(run_dir)]
    if best_dir(run_dir).is_dir():
        results.append(verify_best(best_dir(run_dir)))
    return results


def verify_run_report(run_dir: str | Path) -> tuple[list[str], bool]:
    """(lines to print, whether everything passed) for `scripts/verify_checkpoints.py`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return [f"{run_dir}: no such folder"], False
    results = verify_run(run_dir)
    if not results:
        return [f"{run_dir}: no complete checkpoint in {checkpoints_dir(run_dir)} and no best/"], False
    lines = [("FAILED  " if not v.ok else "ok      ") + v.describe() for v in results]
    failed = [v.folder.name for v in results if not v.ok]
    passing = [v.folder.name for v in results if v.ok and v.folder.name != best_dir(run_dir).name]
    if failed:
        lines.append(f"{len(failed)} of {len(results)} failed: {', '.join(failed)}"
                     + (f"; --train.resume=true uses {passing[-1]}, the newest that passes" if passing else ""))
    else:
        lines.append(f"all {len(results)} intact ({STATE_FILE} checksums)")
    return lines, not failed
