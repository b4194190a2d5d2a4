"""The one place an `accelerate.Accelerator` is built, for training and for standalone evaluation."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs

from loop.config import MIXED_PRECISION, ConfigError


def resolve_mixed_precision(requested: str | None, option: str) -> str:
    """`accelerate launch`'s setting (ACCELERATE_MIXED_PRECISION) wins over the config's; fp16/bf16 need a GPU
    for fp16 (bf16 autocast runs on CPU too)."""
    mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION") or requested or "no"
    if mixed_precision not in MIXED_PRECISION:
        raise ConfigError([f"{option} must be one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}"])
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError([f"{option}=fp16 needs a GPU; on CPU use {option}=no (or bf16)"])
    return mixed_precision


DEFAULT_TIMEOUT_MINUTES = 60.0


def build_accelerator(mixed_precision: str, *, gradient_accumulation_steps: int = 1, log_with: list | None = None,
                      project_dir: str | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Accelerator:
    """An Accelerator with the loop's settings; `accelerate launch` decides the processes. `timeout_minutes`: how
    long a process waits in a collective before the process group gives up (`train.ddp_timeout_minutes`)."""
    return Accelerator(
        # NCCL's default is 10 minutes, shorter than the other processes can wait at a barrier for the main one:
        # preparing an uncached corpus, hashing a checkpoint of several GB, merging LoRA into best/.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))],
        # Several processes and no GPU (torchrun, or `accelerate launch --multi_gpu` on a CPU machine): gloo on CPU.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=mixed_precision,
        # Accumulate exactly gradient_accumulation_steps micro-batches, also across epoch ends, so every
        # optimizer step sees the same amount of data and steps can be counted.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # The schedule runs over optimizer steps; by default a prepared scheduler steps once per process.
        step_scheduler_with_optimizer=False,
        # Batches come from pinned memory (the loaders pin on CUDA), so their copy to the GPU need not block.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
        log_with=log_with,
        project_dir=project_dir,
    )


def reset_state() -> None:
    """Forgets the process's Accelerate state (its singletons), so that a second run in the same process (a sweep's
    next trial) builds its Accelerator afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
