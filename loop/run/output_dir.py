"""A run's output folder: what it holds, and the checks made before a run writes into it."""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from loop.config import FIXED_ON_RESUME, ConfigError, RunConfig, config_differences
from loop.run import lock as run_lock
from loop.run.best_model import BEST_DIR
from loop.run.checkpoint_integrity import choose_resume_checkpoint, set_aside_newer
from loop.run.checkpoints import list_checkpoints, read_run_config

TENSORBOARD_DIR = "tensorboard"  # logs land in <output_dir>/tensorboard

RESULTS_FILE = "results.json"  # what a finished run reports (`loop.results`)


def prepare_output_dir(config: RunConfig, accelerator: Accelerator) -> Path | None:
    """Takes the folder's lock (one run per folder), refuses to mix two runs in one folder (another run's
    checkpoints need --train.resume or --train.overwrite_output_dir), and returns the checkpoint to resume from:
    the one `--train.resume` asks for, verified (None: start at step 0). Nothing in the folder is written before
    the lock is held."""
    output_dir = Path(config.output_dir)
    note = main_process_decides(accelerator, lambda: run_lock.acquire(output_dir))
    if note:
        accelerator.print(note)
    existing = list_checkpoints(output_dir)
    if existing and not config.train.resume and not config.train.overwrite_output_dir:
        raise ConfigError([
            f"output_dir {output_dir} already holds checkpoints of a run (up to step {existing[-1][0]}): "
            "pass --train.resume=true to continue it or --train.overwrite_output_dir=true to start afresh"
        ])
    checkpoint = None
    if config.train.resume:
        checkpoint = main_process_decides(
            accelerator, lambda: choose_resume_checkpoint(output_dir, config.train.resume, accelerator.print))
    if checkpoint is not None:
        check_resume_config(config, checkpoint, accelerator)
        if accelerator.is_main_process:
            set_aside_newer(output_dir, checkpoint, accelerator.print)
    if existing and config.train.overwrite_output_dir and accelerator.is_main_process:
        for stale in ("checkpoints", BEST_DIR, TENSORBOARD_DIR, RESULTS_FILE):
            path = output_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return checkpoint


def main_process_decides(accelerator: Accelerator, decide):
    """`decide()` on the main process only (it reads or locks the shared folder), its result or its exception
    sent to every process, so all of them go on, or stop with the same error, together."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("value", decide())]
        except Exception as error:  # noqa: BLE001 (raised again below, on every process)
            outcome = [("error", error)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def check_resume_config(config: RunConfig, checkpoint: Path, accelerator: Accelerator) -> None:
    """Compares the configuration saved in `checkpoint` with the new one. Changes that make the resumed run differ
    from an uninterrupted one (`FIXED_ON_RESUME`: data, batch, accumulation, seed, model) are refused unless
    `train.allow_config_change`; the others (learning rate, max_steps, eval and save intervals, ...) are listed
    and applied from the resumed step on."""
    saved = read_run_config(checkpoint)  # run_config.json, or config.json in a checkpoint of an earlier version
    if saved is None:
        return
    changes = config_differences(saved, config)
    fixed = [change for change in changes if change[0] in FIXED_ON_RESUME]
    if fixed and not config.train.allow_config_change:
        raise ConfigError([
            f"--train.resume: {option} was {before!r} in {checkpoint.name}, now {after!r}" for option, before, after in fixed
        ] + ["these change the data or its order, so the resumed run would not continue the saved one: undo them, "
             "or pass --train.allow_config_change=true to resume anyway"])
    for option, before, after in changes:
        accelerator.print(f"resuming with {option} changed: {before!r} in {checkpoint.name} -> {after!r}")
