"""The largest per-device training batch that fits in the accelerator's memory (`scripts/find_batch_size.py`, after
NeMo's OOMptimizer): real optimizer steps on a worst-case batch, growing until out of memory, then bisected.

The worst case is every row of the batch holding the data's longest clip and its longest label sequence, at the
full 30-s window (the encoder's cost is the window's, whatever the clip; the decoder's grows with the labels). A
batch that fits that fits every batch of the data. The steps run through a `Device`, the one place out-of-memory
comes from, so a test can put a fake one in its place (`MemoryCap`) and run the same search on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from loop.data.collator import SpeechSeq2SeqCollator
from loop.data.loaders import Rows


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
        return ("scripts/find_batch_size.py needs an accelerator (a CUDA GPU): it measures the accelerator's memory "
                "by running training steps until they run out of it, and on CPU memory is host RAM, where a batch too "
                "large swaps instead of failing. Run it on the GPU machine that will train.")

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
