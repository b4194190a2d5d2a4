"""Guard sets: extra evaluation sets, scored at every evaluation beside the selection split (`eval.guard_sets`).

Fine-tuning on one language makes Whisper better at it and can make it worse at everything else: other languages
and English fade, and language detection drifts. A guard set makes that visible while the run trains: each one is
read by the data layer like the run's own data (a Common Voice folder, a manifest or a Hub dataset), decoded
with the same settings but forced to its own language, and scored for WER, hallucinations and language ID at step
0 and at every evaluation. It never takes part in choosing `best/`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import datasets
from torch.utils.data import DataLoader

from loop.config import GuardSet, RunConfig, source_of
from loop.data.loaders import eval_dataloader
from loop.data.prepare import SplitReport
from loop.data.splits import build_eval_split
from loop.eval.evaluation import EvalResult, evaluate

# What each evaluation of a guard set keeps in `LoopState.evaluations` and results.json.
GUARD_FIGURES = ("wer", "cer", "normalized_wer", "normalized_cer", "language_id", "insertion_rate", "loop_share",
                 "long_share", "compressible_share", "empty_share", "num_utterances")


@dataclass
class PreparedGuardSet:
    """One guard set, read and prepared: its settings, its table and what happened to its rows."""

    guard: GuardSet
    table: datasets.Dataset
    report: SplitReport
    loader: DataLoader | None = None


def guard_run_config(config: RunConfig, guard: GuardSet) -> RunConfig:
    """The run's configuration with its data section pointed at `guard`'s source (preparation settings kept)."""
    data = dataclasses.replace(config.data, **vars(source_of(guard)), eval_split=guard.split,
                               max_eval_samples=guard.max_samples)
    return dataclasses.replace(config, data=data)


def build_guard_sets(config: RunConfig, processor, max_label_length: int) -> list[PreparedGuardSet]:
    """Each of `eval.guard_sets` prepared like a held-out split (implausible rows kept and flagged)."""
    prepared = []
    for guard in config.eval.guard_sets:
        table, report = build_eval_split(guard_run_config(config, guard), processor, max_label_length)
        if len(table) == 0:
            raise ValueError(f"eval.guard_sets {guard.name!r}: no usable utterances in split {guard.split!r} of "
                             f"{guard.path or guard.dataset_name} ({report.summary()})")
        prepared.append(PreparedGuardSet(guard, table, report))
    return prepared


def attach_loaders(guards: list[PreparedGuardSet], config: RunConfig, decoder_start_token_id: int,
                   accelerator) -> None:
    """An evaluation DataLoader per guard set, prepared by the accelerator (sharded across processes)."""
    for prepared in guards:
        loader = eval_dataloader(prepared.table, config.eval.per_device_eval_batch_size, decoder_start_token_id,
                                 config.train.dataloader_num_workers)
        prepared.loader = accelerator.prepare(loader)


def evaluate_guard_sets(model, guards: list[PreparedGuardSet], accelerator, tokenizer, *, log_mel,
                        step: int) -> dict[str, EvalResult]:
    """Every guard set decoded in its own language; no loss (the labels carry the run's language token)."""
    return {
        prepared.guard.name: evaluate(model, prepared.loader, accelerator, tokenizer, prepared.table["text"],
                                      prepared.guard.language, log_mel=log_mel, compute_loss=False,
                                      decode_language=prepared.guard.language,
                                      description=f"guard {prepared.guard.name} step {step}")
        for prepared in guards
    }


def guard_figures(metrics: dict) -> dict:
    """The part of one guard-set evaluation that is kept per step."""
    return {key: metrics[key] for key in GUARD_FIGURES if key in metrics}


def guard_summary(evaluations: list[dict], best_step: int) -> dict[str, dict]:
    """{name: {"initial": figures at step 0 (or the first evaluation), "best": figures at the best step, "final":
    at the last evaluation}} from `LoopState.evaluations`, for results.json and the model card."""
    with_guards = [entry for entry in evaluations if entry.get("guards")]
    if not with_guards:
        return {}
    best = next((entry for entry in with_guards if entry["step"] == best_step), with_guards[-1])
    return {
        name: {"initial": with_guards[0]["guards"].get(name), "initial_step": with_guards[0]["step"],
               "best": best["guards"].get(name), "best_step": best["step"],
               "final": with_guards[-1]["guards"].get(name)}
        for name in with_guards[0]["guards"]
    }


def language_id_drops(evaluations: list[dict], threshold: float) -> list[str]:
    """Warnings for every set (the selection split and each guard set) whose language-ID share fell by more than
    `threshold` points from the first evaluation to the latest."""
    if len(evaluations) < 2:
        return []
    first, latest = evaluations[0], evaluations[-1]
    pairs = [("the selection split", first.get("language_id"), latest.get("language_id"))]
    latest_guards = latest.get("guards") or {}
    pairs += [(f"guard set {name!r}", figures.get("language_id"), latest_guards.get(name, {}).get("language_id"))
              for name, figures in (first.get("guards") or {}).items()]
    return [f"language ID on {where} fell from {before:.1f}% at step {first['step']} to {after:.1f}% at step "
            f"{latest['step']} (more than eval.language_id_drop_warning={threshold:g} points): the model is losing "
            "Whisper's language detection; mix in other languages (data.mix) or lower the learning rate"
            for where, before, after in pairs
            if before is not None and after is not None and before - after > threshold]
