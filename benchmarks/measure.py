"""Instruments for a child process: device sync, peak memory while a block runs, the label widths that pass
(for the FLOP count), and a Trainer callback that clocks step ends."""

from __future__ import annotations

import os
import resource
import statistics
import threading
import time

import torch


def synchronize() -> None:
    """Waits for queued GPU work, so a clock read afterwards includes it (CUDA runs asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def resident_mb() -> float:
    """This process's resident memory now in MB (Linux /proc), else its peak so far."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MemoryPeak:
    """Peak resident memory while the block runs (MB, sampled every 20 ms by a thread, since the process peak
    cannot be reset) and, on a GPU, the peak CUDA allocation (GB)."""

    def __enter__(self):
        synchronize()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.peak_mb = resident_mb()
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak_mb = max(self.peak_mb, resident_mb())

    def __exit__(self, *exc):
        synchronize()
        self.done.set()
        self.sampler.join()
        self.peak_mb = max(self.peak_mb, resident_mb())

    def figures(self) -> dict:
        """`peak_rss_mb`, and `cuda_peak_gb` on a GPU."""
        figures = {"peak_rss_mb": self.peak_mb}
        if torch.cuda.is_available():
            figures["cuda_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
        return figures


class LabelWidths:
    """Records the padded label width of every batch that passes (decoder positions, for the FLOP count)."""

    def __init__(self):
        self.widths: list[int] = []

    def batches(self, batches):
        """`batches`, recorded as they are drawn."""
        for batch in batches:
            self.widths.append(int(batch["labels"].shape[1]))
            yield batch

    def collator(self, collate):
        """`collate`, recording the width of every batch it makes."""
        def recording(rows):
            batch = collate(rows)
            self.widths.append(int(batch["labels"].shape[1]))
            return batch

        return recording

    def mean(self, skip: int = 0) -> float:
        """Mean width of the batches after the first `skip` (the warm-up steps); 0 when there are none."""
        kept = self.widths[skip:]
        return statistics.fmean(kept) if kept else 0.0


def step_clock():
    """A Trainer callback noting the time at the end of every optimizer step (in `ends`, perf_counter seconds)."""
    # takes seconds to import; only the reference needs it
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            self.ends.append(time.perf_counter())

    return StepClock()
