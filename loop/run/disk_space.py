"""Disk space for what a run saves: an estimate before the first save, and one clear error when a save fails.

A full disk shows itself in many forms: `OSError: [Errno 28] No space left on device` from plain writes,
`RuntimeError: [enforce fail at inline_container.cc:...] unexpected pos ...` or `PytorchStreamWriter failed
writing file` from `torch.save` (optimizer, scheduler, RNG states), a `SafetensorError` from the weights. Each
save of the loop (a checkpoint, `best/`, `results.json`, and any later export) runs inside
`reporting_save_failure`, which removes the save's partial staging folder, leaves every complete file and folder
as it was, and raises one `SaveError` that says what failed, where, about how much it needed and how much is
free, and the command that resumes the run.
"""

from __future__ import annotations

import errno
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

MB = 1e6
# torch.save reports a failed write as a RuntimeError, safetensors as a SafetensorError; their write errors' phrases.
WRITE_FAILURES = ("unexpected pos", "file write failed", "No space left", "PytorchStreamWriter failed writing",
                  "I/O error", "os error")


class SaveError(RuntimeError):
    """A save (checkpoint, best/, results.json, an export) failed; the message says what to do."""


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the filesystem of `folder` (or of its nearest existing parent: it may not exist yet)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def folder_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.is_dir() else 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def storage_key(tensor: torch.Tensor):
    """What two names of one tensor share: its storage address and shape. An FSDP2 parameter is a DTensor, whose
    own `data_ptr()` is 0 for every parameter: its local shard's address then (an empty shard has none: the
    tensor's identity)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor, without importing it
    address = local.data_ptr()
    return (address, tuple(tensor.shape)) if address else id(tensor)


def weights_bytes(model) -> int:
    """Bytes of the model's state dict (parameters and buffers) as safetensors writes them: a tensor shared by two
    names (Whisper's output projection is its token embedding) once. A sharded (DTensor) tensor counts whole:
    its `numel()` is the full tensor's."""
    return tensor_bytes({storage_key(t): t for t in model.state_dict().values()}.values())


def optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state. Before its first step it has none yet: then AdamW's two moments (`exp_avg`,
    `exp_avg_sq`), shaped and typed like each parameter it updates, plus a 4-byte step count per parameter."""
    state = getattr(optimizer, "optimizer", optimizer).state  # Accelerate wraps the optimizer
    if state:
        return sum(tensor_bytes(values.values()) for values in state.values())
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    return sum(2 * p.numel() * p.element_size() + 4 for p in parameters)


def checkpoint_bytes(accelerator) -> int:
    """About what `accelerator.save_state` writes: every prepared model's weights and optimizer's state (the
    scheduler, scaler and RNG states are a few kB)."""
    return (sum(weights_bytes(model) for model in accelerator._models)
            + sum(optimizer_bytes(optimizer) for optimizer in accelerator._optimizers))


def space_warning(output_dir: str | Path, checkpoint: int, best: int, keep: int) -> str:
    """A warning when the output folder's filesystem cannot hold `keep` checkpoints, the one being written beside
    them and `best/`; empty when it can."""
    needed, free = (keep + 1) * checkpoint + best, free_bytes(output_dir)
    if free >= needed:
        return ""
    return (f"{output_dir} has {free / MB:,.1f} MB free, but {keep} checkpoints (train.save_total_limit), the one "
            f"being written and best/ need about {needed / MB:,.1f} MB (a checkpoint is about {checkpoint / MB:,.1f} MB, "
            f"best/ {best / MB:,.1f} MB): the run will stop at a save once the disk is full. Free some space, lower "
            "train.save_total_limit or choose another --output_dir")


def warn_if_short_of_space(accelerator, model, optimizer, output_dir: str | Path, keep: int) -> str:
    """Says `space_warning` on the main process before the first save; returns it."""
    weights = weights_bytes(model)
    warning = space_warning(output_dir, weights + optimizer_bytes(optimizer), weights, keep)
    if warning:
        accelerator.print(f"warning: {warning}")
    return warning


def resume_command(output_dir: str | Path) -> str:
    """The command that resumes the run: the one that started it plus `--train.resume=true` when it was
    `scripts/train.py`, else the run's saved configuration (`<output_dir>/config.json` is a valid `--config`)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("train.py"):
        kept = [a for a in argv[1:] if a != "--resume" and not a.startswith("--train.resume")]
        return shlex.join(["python", argv[0], *kept, "--train.resume=true"])
    return shlex.join(["python", "scripts/train.py", "--config", str(Path(output_dir) / "config.json"),
                       "--train.resume=true"])


def is_write_failure(error: BaseException, folder: Path, needed: int) -> bool:
    """Whether `error` is a failed write: any OSError, or torch's and safetensors' reports of one (or any error of
    theirs while the disk has less free space than the save needs)."""
    if isinstance(error, OSError):
        return True
    if not isinstance(error, Exception) or type(error).__name__ not in ("RuntimeError", "SafetensorError"):
        return False
    return any(phrase in str(error) for phrase in WRITE_FAILURES) or free_bytes(folder) < needed


def failure_message(what: str, folder: Path, needed: int, error: BaseException, resume: str) -> str:
    free = free_bytes(folder)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or free < needed
    if full:
        reason = "the disk is full"
    elif isinstance(error, OSError):
        reason = f"{error.strerror or error} ({errno.errorcode.get(error.errno, 'OSError')})"
    else:
        reason = "a write failed: " + " ".join(str(error).split())[:200]
    return (f"could not save {what} in {folder}: {reason}. It needs about {needed / MB:,.1f} MB; "
            f"{free / MB:,.1f} MB is free there. The partial save was removed; every complete checkpoint is kept. "
            f"Free some space, then resume with: {resume}")


@contextmanager
def reporting_save_failure(what: str, folder: Path, needed: int, output_dir: str | Path, staging: Path | None = None):
    """Runs a save; when it fails with a write error, removes `staging` (the save's partial folder) and raises one
    SaveError saying which save (`what`) failed in `folder`, the `needed` and free bytes and the resume command.
    Other errors pass unchanged."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, SaveError) or not is_write_failure(error, Path(folder), needed):
            raise
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise SaveError(failure_message(what, Path(folder), needed, error, resume_command(output_dir))) from error
