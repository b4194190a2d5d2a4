"""`results.json`: what a finished run reports, assembled in one place from the loop's state, the held-out
evaluation of `best/` and the run's settings."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

from loop.eval.guard_sets import guard_summary
from loop.files import write_json_atomic
from loop.run.disk_space import reporting_save_failure
from loop.run.output_dir import RESULTS_FILE

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "soundfile", "soxr", "jiwer", "tokenizers")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_results(config, state, test_metrics: dict, *, selection_split: str, data_report: dict,
                  num_processes: int, mixed_precision: str, test_by_window: dict | None = None) -> dict:
    """The contents of results.json. `state` is the loop's `LoopState`, `test_metrics` the held-out split's
    metrics of `best/` at the window it trained with; `test_by_window` the same at each window it was scored at."""
    t = config.train
    final = state.evaluations[-1] if state.evaluations else {}
    return {
        "initial_wer": state.initial_wer,
        "best_wer": state.best_wer,
        "best_step": state.best_step,
        "final_wer": final.get("wer"),
        "test_wer": test_metrics["wer"],
        "test_cer": test_metrics["cer"],
        "test_normalized_wer": test_metrics["normalized_wer"],
        "test_normalized_cer": test_metrics["normalized_cer"],
        "test_utterances": test_metrics["num_utterances"],
        "test_split": config.data.eval_split,
        "encoder_window": config.model.encoder_window,
        "test_by_window": {window: {key: metrics[key] for key in ("wer", "cer", "normalized_wer", "normalized_cer")}
                           for window, metrics in (test_by_window or {}).items()},
        "selection_split": selection_split,
        "selection_language_id": _first_and_best(state, "language_id"),
        "selection_loop_share": _first_and_best(state, "loop_share"),
        "guard_sets": guard_summary(state.evaluations, state.best_step),
        "selection_leaks_test": config.eval.select_on == "test",
        "steps": state.step,
        "nonfinite_steps": state.nonfinite_steps,
        "train_samples_per_second": _rate(state.samples_seen, state.train_seconds),
        "train_utterances_per_second": _rate(state.utterances_seen, state.train_seconds),
        "effective_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * num_processes,
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "seed": t.seed,
        "model": config.model.name_or_path,
        "evaluations": state.evaluations,
        "data": data_report,
        "versions": package_versions(),
    }


def _first_and_best(state, key: str) -> dict:
    """{"initial": `key` at the first evaluation, "best": at the best step} on the selection split."""
    evaluations = state.evaluations
    best = next((entry for entry in evaluations if entry["step"] == state.best_step), None)
    return {"initial": evaluations[0].get(key) if evaluations else None, "best": best.get(key) if best else None}


def _rate(count: int, seconds: float) -> float | None:
    return count / seconds if seconds else None


def write_results(output_dir: str | Path, results: dict) -> Path:
    path = Path(output_dir) / RESULTS_FILE
    with reporting_save_failure(RESULTS_FILE, path.parent, 2 * len(str(results)), output_dir):
        return write_json_atomic(path, results)
