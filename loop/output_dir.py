"""A run's output folder: what it holds, and the checks made before a run writes into it."""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

from loop.best_model import BEST_DIR
from loop.checkpointing import list_checkpoints
from loop.config import ConfigError, RunConfig
from loop.results import RESULTS_FILE

TENSORBOARD_DIR = "tensorboard"  # logs land in <output_dir>/tensorboard


def prepare_output_dir(config: RunConfig, accelerator: Accelerator) -> None:
    """Refuses to mix two runs in one folder: another run's checkpoints need --train.resume or
    --train.overwrite_output_dir."""
    output_dir = Path(config.output_dir)
    existing = list_checkpoints(output_dir)
    if existing and not config.train.resume and not config.train.overwrite_output_dir:
        raise ConfigError([
            f"output_dir {output_dir} already holds checkpoints of a run (up to step {existing[-1][0]}): "
            "pass --train.resume=true to continue it or --train.overwrite_output_dir=true to start afresh"
        ])
    if existing and config.train.overwrite_output_dir and accelerator.is_main_process:
        for stale in ("checkpoints", BEST_DIR, TENSORBOARD_DIR, RESULTS_FILE):
            path = output_dir / stale
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
