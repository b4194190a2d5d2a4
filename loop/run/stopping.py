"""Stopping a run cleanly: SIGTERM or SIGINT (a preempted machine, Ctrl-C) is noted, and every process stops at
the same step boundary, after a checkpoint (`loop.train.stop_and_save`)."""

from __future__ import annotations

import signal

import torch
from accelerate import Accelerator


class StopRequested:
    """Set by SIGTERM/SIGINT (a preempted machine, Ctrl-C); the loop saves and exits at the next step boundary."""

    def __init__(self):
        self.signal_name = ""

    def __call__(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self)


STOP_CHECK_STEPS = 10
"""With several processes, steps between agreements on a stop: each is an all-reduce and a host-device sync, which
at a few tens of milliseconds a step would stall the GPU every step; a stop then waits at most 9 steps more."""


def agreed_stop(accelerator: Accelerator, stop, step: int = 0) -> bool:
    """Whether any process was signalled, agreed at `step` (the optimizer steps taken): all of them must stop at the
    same step, or the others would wait in the next step's collectives forever. With several processes they agree
    every `STOP_CHECK_STEPS` steps only (the same steps on every process); a single process stops at once."""
    if accelerator.num_processes == 1:
        return bool(stop.signal_name)
    if step % STOP_CHECK_STEPS:
        return False
    flag = torch.tensor(1.0 if stop.signal_name else 0.0, device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0
