"""The largest per-device training batch that fits in the accelerator's memory (`scripts/find_batch_size.py`, after
NeMo's OOMptimizer): real optimizer steps on a worst-case batch, growing until out of memory, then bisected.

`train.per_device_train_batch_size: auto` runs the same search before training (`choose_batch_size`), keeping the
configuration's effective batch by the accumulation, and a resumed run takes the choice its folder recorded.

The worst case is every row of the batch holding the data's longest clip and its longest label sequence, at the
full 30-s window (the encoder's cost is the window's, whatever the clip; the decoder's grows with the labels). A
batch that fits that fits every batch of the data. The steps run through a `Device`, the one place out-of-memory
comes from, so a test can put a fake one in its place (`MemoryCap`) and run the same search on CPU.
"""

from __future__ import annotations

import copy
import functools
import gc
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from loop.config import RunConfig, TrainConfig
from loop.config.types import AUTO
from loop.data.collator import SpeechSeq2SeqCollator
from loop.data.loaders import Rows
from loop.run.accelerator import reset_state
from loop.run.checkpoints import read_run_config
from loop.run.lock import release

MARGIN = 0.1
"""The share of the largest batch left free: memory fragmentation, the evaluation's generation, long batches."""
MAX_BATCH_SIZE = 512
"""Batches grow no further than this."""


class BatchSizeError(RuntimeError):
    """`per_device_train_batch_size: auto` cannot choose a batch here; the message says why, in one line."""


NOTHING_FITS = ("not even a batch of 1 fits: try --model.gradient_checkpointing=true, bf16/fp16, LoRA or a smaller "
                "model")


class Device(Protocol):
    """Runs a training step and says when memory ran out (by raising `torch.OutOfMemoryError`)."""

    def unavailable(self) -> str:
        """Why the search cannot run here ("" when it can)."""

    def run(self, step: Callable[[], None], batch_size: int) -> None:
        """Runs `step` at `batch_size` to its end (a GPU's queue synchronised) and frees what it left behind."""


class CudaDevice:
    def unavailable(self) -> str:
        if torch.cuda.is_available():
            return ""
        return ("needs an accelerator (a CUDA GPU): it measures the accelerator's memory by running training steps "
                "until they run out of it, and on CPU memory is host RAM, where a batch too large swaps instead of "
                "failing")

    def run(self, step: Callable[[], None], batch_size: int) -> None:
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.empty_cache()


@dataclass
class MemoryCap:
    """A stand-in device whose memory holds batches of at most `largest` rows: the step runs (on CPU) up to it and
    out-of-memory is raised above it, as a GPU would."""

    largest: int
    tried: list[int] | None = None

    def unavailable(self) -> str:
        return ""

    def run(self, step: Callable[[], None], batch_size: int) -> None:
        self.tried = [*(self.tried or []), batch_size]
        if batch_size > self.largest:
            raise torch.OutOfMemoryError(f"MemoryCap: {batch_size} rows do not fit, {self.largest} do")
        step()


def worst_case_row(table) -> dict:
    """The longest clip of a prepared table with the longest label sequence of the table."""
    durations, label_lengths = table["duration"], [len(labels) for labels in table["labels"]]
    rows = Rows(table)
    row = dict(rows[max(range(len(durations)), key=durations.__getitem__)])
    row["labels"] = rows[max(range(len(label_lengths)), key=label_lengths.__getitem__)]["labels"]
    row["utterances"] = 1
    return row


def worst_case_batch(row: dict, batch_size: int, decoder_start_token_id: int, device) -> dict:
    batch = SpeechSeq2SeqCollator(decoder_start_token_id)([{**row, "index": i} for i in range(batch_size)])
    return {name: tensor.to(device) for name, tensor in batch.items()}


def largest_batch(device: Device, step_at: Callable[[int], None], limit: int, log=print) -> int:
    """The largest batch size up to `limit` whose step runs on `device`: doubling from 1 until a step runs out of
    memory, then bisecting between the last that fit and the first that did not. 0 when even 1 does not fit."""
    fits, fails = 0, None
    size = 1
    while size <= limit:
        if _fits(device, step_at, size, log):
            fits, size = size, size * 2
        else:
            fails = size
            break
    if fails is None:  # every doubling up to `limit` fitted
        if fits == limit or _fits(device, step_at, limit, log):
            return limit
        fails = limit
    while fails - fits > 1:
        middle = (fits + fails) // 2
        if _fits(device, step_at, middle, log):
            fits = middle
        else:
            fails = middle
    return fits


def _fits(device: Device, step_at: Callable[[int], None], size: int, log) -> bool:
    try:
        device.run(lambda: step_at(size), size)
    except torch.OutOfMemoryError:
        log(f"batch {size}: out of memory")
        return False
    log(f"batch {size}: fits")
    return True


def suggestion(largest: int, margin: float, effective_batch: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps): at most `largest` less a `margin` share (room for fragmentation and
    the evaluation's generation), with the accumulation that keeps the effective batch `effective_batch` (or the
    nearest above it when it does not divide)."""
    cap = max(1, math.floor(largest * (1 - margin)))
    accumulation = math.ceil(effective_batch / cap)
    return math.ceil(effective_batch / accumulation), accumulation


def effective_batch(t: TrainConfig) -> int:
    """Utterances per optimizer step and process that a search's suggestion keeps: batch x accumulation, or with
    `auto` its `auto_effective_batch` (the defaults' batch x accumulation when that is unset)."""
    if t.per_device_train_batch_size == AUTO:
        return t.auto_effective_batch or TrainConfig.per_device_train_batch_size * t.gradient_accumulation_steps
    return t.per_device_train_batch_size * t.gradient_accumulation_steps


def probe_config(config: RunConfig, folder: str) -> RunConfig:
    """The run's configuration for the search's steps, in a scratch `folder`: its model, precision, LoRA,
    optimizer and EMA as they are, one micro-batch a step, at the full window, without trackers, guard sets or
    resume."""
    probe = copy.deepcopy(config)
    probe.output_dir = folder
    probe.model.encoder_window = "full"  # the worst case: the encoder always sees the whole window
    probe.train.per_device_train_batch_size = 1  # the search builds its own batches
    probe.train.gradient_accumulation_steps = 1  # one micro-batch per probe step
    probe.train.report_to, probe.train.resume, probe.eval.guard_sets = ["none"], False, []
    return probe


def search(config: RunConfig, device: Device, setup: Callable, step: Callable, limit: int, log=print) -> int:
    """The largest batch up to `limit` whose optimizer step fits on `device`, for `config`'s model and data.
    `setup(config) -> run` and `step(run, batches)` are the loop's own (`loop.train`, which this layer cannot
    import). The probe run is freed, and Accelerate's state reset, before this returns."""
    with tempfile.TemporaryDirectory(prefix="find-batch-size-") as folder:
        try:
            largest = _search_in(setup(probe_config(config, folder)), device, step, limit, log)
        finally:
            release(folder)  # setup() took the folder's lock
    gc.collect()  # the probe's model, optimizer and batches, before the run that trains loads its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reset_state()  # the run that trains builds its Accelerator afresh, with its own accumulation
    return largest


def _search_in(run, device: Device, step: Callable, limit: int, log) -> int:
    row = worst_case_row(run.data.train)
    log(f"worst case: {row['duration']:.1f}-s clip, {len(row['labels'])} label tokens, full window")
    return largest_batch(device, functools.partial(_probe_step, run, step, row), limit, log)


def _probe_step(run, step: Callable, row: dict, batch_size: int) -> None:
    """One real optimizer step of the loop on `batch_size` copies of `row`."""
    batch = worst_case_batch(row, batch_size, run.model.config.decoder_start_token_id, run.accelerator.device)
    step(run, iter([batch]))


def choose_batch_size(config: RunConfig, setup: Callable, step: Callable, device: Device | None = None,
                      log=print) -> RunConfig:
    """`config` with `per_device_train_batch_size: auto` made a number before training: the largest batch that
    fits `device` (a CUDA GPU unless a test passes a stand-in), `MARGIN` below it, with the accumulation that keeps
    `effective_batch`. A resumed run takes the batch and accumulation its folder's config.json recorded (the
    run's first start wrote the choice there), so it continues with the batches it had. A config with a number
    comes back as it is. Raises BatchSizeError where no search can run."""
    t = config.train
    if t.per_device_train_batch_size != AUTO:
        return config
    chosen, effective = copy.deepcopy(config), effective_batch(t)
    recorded = (read_run_config(config.output_dir) or {}).get("train", {}) if t.resume else {}
    if isinstance(recorded.get("per_device_train_batch_size"), int):
        chosen.train.per_device_train_batch_size = recorded["per_device_train_batch_size"]
        chosen.train.gradient_accumulation_steps = recorded["gradient_accumulation_steps"]
        log(f"per_device_train_batch_size=auto: resuming with the batch this run chose, "
            f"{chosen.train.per_device_train_batch_size} x {chosen.train.gradient_accumulation_steps} accumulation")
        return chosen
    device = device or CudaDevice()
    if device.unavailable():
        raise BatchSizeError(f"train.per_device_train_batch_size=auto {device.unavailable()}. Here, give a number "
                             "(--train.per_device_train_batch_size=4)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BatchSizeError("train.per_device_train_batch_size=auto searches in one process: run "
                             "scripts/find_batch_size.py on one GPU and launch with the numbers it prints")
    limit = min(MAX_BATCH_SIZE, math.ceil(effective / (1 - MARGIN)))  # a larger batch would not be used
    largest = search(config, device, setup, step, limit, log)
    if largest == 0:
        raise BatchSizeError(NOTHING_FITS)
    batch, accumulation = suggestion(largest, MARGIN, effective)
    chosen.train.per_device_train_batch_size, chosen.train.gradient_accumulation_steps = batch, accumulation
    kept = batch * accumulation
    log(f"per_device_train_batch_size=auto: batches of {largest} rows fit"
        + (" (the search stopped there: a larger batch would not be used)" if largest == limit else "")
        + f"; training with --train.per_device_train_batch_size={batch} --train.gradient_accumulation_steps="
        f"{accumulation}, {MARGIN:.0%} below: {kept} utterances per optimizer step and process"
        + ("" if kept == effective else f", the nearest above the configured {effective}"))
    return chosen
