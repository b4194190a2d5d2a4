"""What the training loop measures and logs: one step's figures, their sums over a logging interval, the time
spent waiting for data, and the log line / TensorBoard scalars written every `logging_steps`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from loop.eval.guard_sets import language_id_drops
from loop.run.trackers import log_examples


@dataclass
class StepFigures:
    """One optimizer step on this process; the tensors stay on the device until logged (reading them would sync)."""

    loss_sum: torch.Tensor
    """Summed token cross-entropy of the step's micro-batches."""
    tokens: torch.Tensor
    """Target tokens those losses cover."""
    grad_norm: torch.Tensor
    """Gradient norm before clipping (of all processes: the gradients are all-reduced)."""
    samples: int
    """Rows in the step's micro-batches."""
    utterances: torch.Tensor
    """Utterances in those rows (more than rows when rows are packed)."""
    audio_seconds: torch.Tensor
    """Seconds of audio in those rows."""


class WaitClock:
    """The training batches, with the seconds the loop spent waiting for them added up in `seconds`: with
    DataLoader workers the next batch is ready before it is asked for and the wait stays near zero."""

    def __init__(self, batches):
        self.batches, self.seconds = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        started = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - started


class Interval:
    """Training figures summed since the last log line; tensors stay on the device until logged."""

    def __init__(self):
        self.loss_sum, self.tokens, self.samples, self.utterances, self.audio_seconds = 0.0, 0, 0, 0, 0.0
        self.seconds, self.data_wait = 0.0, 0.0

    def add(self, figures: StepFigures, *, seconds: float, data_wait: float) -> None:
        """`seconds` of this step alone: evaluation and saving between steps do not count as training time.
        (Each step ends with a sync, so wall time is the device's time too.) `data_wait`: of those, the seconds
        spent waiting for batches."""
        self.loss_sum = self.loss_sum + figures.loss_sum
        self.tokens = self.tokens + figures.tokens
        self.samples += figures.samples
        self.utterances = self.utterances + figures.utterances
        self.audio_seconds = self.audio_seconds + figures.audio_seconds
        self.seconds += seconds
        self.data_wait += data_wait


def log_training(accelerator, state, interval: Interval, grad_norm, scheduler, max_steps: int, progress) -> dict:
    """Reduces the interval's sums over processes, adds them to `state` (samples and utterances seen, training
    seconds), logs the scalars and prints one line; returns the scalars."""
    seconds = max(interval.seconds, 1e-9)
    state.train_seconds += seconds
    sums = [interval.loss_sum, interval.tokens, interval.audio_seconds, interval.utterances]
    totals = accelerator.reduce(torch.stack([torch.as_tensor(v, device=accelerator.device).float() for v in sums]),
                                reduction="sum").tolist()  # CPU-GPU sync point, once per logging interval
    processes = accelerator.num_processes
    state.samples_seen += interval.samples * processes
    state.utterances_seen += round(totals[3])
    values = {
        "train/loss": totals[0] / max(totals[1], 1),
        "train/learning_rate": scheduler.get_last_lr()[0],
        "train/grad_norm": float(grad_norm),
        "train/samples_per_second": interval.samples * processes / seconds,
        "train/audio_seconds_per_second": totals[2] / seconds,
        "train/utterances_per_second": totals[3] / seconds,  # above samples/s when rows are packed
        "train/data_wait_fraction": interval.data_wait / seconds,
        "train/epoch": state.epoch,
        "train/nonfinite_steps": state.nonfinite_steps,
        "memory/rss_mb": resident_memory_mb(),
    }
    if torch.cuda.is_available():
        values["memory/max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    accelerator.log(values, step=state.step)
    progress.set_postfix(loss=f"{values['train/loss']:.3f}", lr=f"{values['train/learning_rate']:.2e}")
    if accelerator.is_main_process:
        progress.write(
            f"step {state.step}/{max_steps}  loss {values['train/loss']:.4f}  "
            f"lr {values['train/learning_rate']:.3e}  grad_norm {values['train/grad_norm']:.3f}  "
            f"{values['train/samples_per_second']:.1f} samples/s  {values['train/utterances_per_second']:.1f} utt/s  "
            f"{values['train/audio_seconds_per_second']:.1f} audio s/s  "
            f"data wait {100 * values['train/data_wait_fraction']:.1f}%"
        )
    return values


def resident_memory_mb() -> float:
    """This process's resident memory now (Linux), for spotting leaks over a long run; 0 where unknown."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


HALLUCINATION_FIGURES = ("insertion_rate", "loop_share", "long_share", "compressible_share", "empty_share")


def log_evaluation(accelerator, step: int, result, improved: bool, split: str, config) -> None:
    """One evaluation on the selection split (`loop.eval.evaluation.EvalResult`): the trackers' `eval/*`, the log
    line, and a table of examples."""
    m = result.metrics
    values = {f"eval/{key}": m[key] for key in ("wer", "cer", "normalized_wer", "normalized_cer", "loss",
                                                 "language_id", *HALLUCINATION_FIGURES) if key in m}
    values["eval/seconds"] = result.seconds
    accelerator.log(values, step=step)
    if not accelerator.is_main_process:
        return
    accelerator.print(
        f"eval step {step} on {split}: WER {m['wer']:.2f}  CER {m['cer']:.2f}  normalized WER "
        f"{m['normalized_wer']:.2f}  loss {m['loss']:.4f}  loops {m['loop_share']:.1f}%"
        + (f"  language ID {m['language_id']:.1f}%" if "language_id" in m else "")
        + f"  ({result.seconds:.1f} s)" + ("  best so far" if improved else "")
    )
    log_examples(accelerator, result.predictions[: config.eval.num_logged_examples], step)


def log_guard_sets(accelerator, state, results: dict, drop_warning: float) -> None:
    """Each guard set's figures (TensorBoard `guard/<name>/...`, one log line each), and a warning when language
    detection has fallen since step 0 by more than `drop_warning` points."""
    for name, result in results.items():
        m = result.metrics
        accelerator.log({f"guard/{name}/{key}": m[key] for key in ("wer", "cer", "normalized_wer", "language_id",
                                                                  *HALLUCINATION_FIGURES) if key in m}, step=state.step)
        accelerator.print(
            f"  guard {name}: WER {m['wer']:.2f}  normalized WER {m['normalized_wer']:.2f}  "
            f"loops {m['loop_share']:.1f}%"
            + (f"  language ID {m['language_id']:.1f}%" if "language_id" in m else "") + f"  ({result.seconds:.1f} s)"
        )
    for warning in language_id_drops(state.evaluations, drop_warning):
        accelerator.print(f"warning: {warning}")
