"""A whole run scored at once: every intact checkpoint of `<run>/checkpoints/` and `best/`, each decoded on the same
prepared utterances of one split (and the guard sets, if asked) as `scripts/evaluate.py` decodes one model, in a
table by step beside the WER the loop selected on (`results.json`, or the newest checkpoint's `loop_state.json`).

Writes to the output folder `run_scores.json`, `run_scores.md` (the table), `run_scores.png` (test WER by step and
the selection WER), and each model's metrics.json, predictions.jsonl and report.md in a folder of its own; the
same points go into the run's TensorBoard log under `checkpoint_eval/<split>/...`. A checkpoint that fails
verification (`loop.run.checkpoint_integrity`) is listed as skipped with the reason, never decoded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from loop.config import RunConfig
from loop.eval.guard_sets import attach_loaders, build_guard_sets, evaluate_guard_sets, guard_figures
from loop.eval.saved_model import DecodeOverrides, evaluate_saved_model, write_outputs
from loop.extras import require
from loop.files import write_json_atomic, write_text_atomic
from loop.model.features import LogMel
from loop.model.loading import ModelLoadError
from loop.run.accelerator import build_accelerator, resolve_mixed_precision
from loop.run.best_model import BEST_DIR, best_dir
from loop.run.checkpoint_integrity import verify_best, verify_checkpoint
from loop.run.checkpoints import STATE_FILE, list_checkpoints
from loop.run.lock import holder_of
from loop.run.output_dir import RESULTS_FILE, TENSORBOARD_DIR

SCORES_FILE = "run_scores"  # .json, .md and .png in the output folder
TENSORBOARD_TAG = "checkpoint_eval"  # <tag>/<split>/<figure> in the run's TensorBoard log
FIGURES = ("wer", "cer", "normalized_wer", "insertion_rate", "loop_share", "long_share", "empty_share", "language_id")
HEADERS = ("WER", "CER", "norm. WER", "insertions %", "loops %", "too long %", "empty %", "language ID %")


@dataclass
class Member:
    """One model of the run: a checkpoint (`step`) or best/ (the step it was saved at)."""

    name: str
    folder: Path
    step: int | None
    skipped: str = ""
    """Why it was not scored (fails verification); empty when it was."""


def loop_history(run_dir: Path) -> tuple[list[dict], int | None]:
    """(the loop's evaluations on its selection split, its best step) from results.json, else from the newest
    checkpoint's loop_state.json (a run that has not finished)."""
    for path in [run_dir / RESULTS_FILE, *(p / STATE_FILE for _, p in reversed(list_checkpoints(run_dir)))]:
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        best = values.get("best_step")
        return values.get("evaluations") or [], best if best is not None and best >= 0 else None
    return [], None


def run_members(run_dir: Path, best_step: int | None) -> list[Member]:
    """Every complete checkpoint, oldest first, then best/; those failing verification marked as skipped."""
    members = []
    for step, path in list_checkpoints(run_dir):
        verification = verify_checkpoint(path)
        members.append(Member(path.name, path, step, "" if verification.ok else "; ".join(verification.problems)))
    if best_dir(run_dir).is_dir():
        verification = verify_best(best_dir(run_dir))
        members.append(Member(BEST_DIR, best_dir(run_dir), best_step,
                              "" if verification.ok else "; ".join(verification.problems)))
    return members


def score_run(config: RunConfig, run_dir: str | Path, *, decode: DecodeOverrides | None = None,
              batch_size: int | None = None, mixed_precision: str | None = None, guard_sets: bool = False,
              tensorboard: bool = True, say=print) -> dict:
    """Scores every member of `run_dir` on `config.data.eval_split` (with `guard_sets`, on `config.eval.guard_sets`
    too), all processes together, and writes the table, the picture and each model's outputs to
    `config.output_dir` on the main process. Returns what run_scores.json holds."""
    require_matplotlib()  # before the models are scored, not after
    run_dir, output_dir = Path(run_dir), Path(config.output_dir)
    decode = decode or DecodeOverrides()
    batch_size = batch_size or config.eval.per_device_eval_batch_size
    evaluations, best_step = loop_history(run_dir)
    members = run_members(run_dir, best_step)
    accelerator = build_accelerator(resolve_mixed_precision(mixed_precision, "--mixed_precision"))
    split, guards, rows = None, None, []
    scored = [member for member in members if not member.skipped]
    if not scored:
        raise ModelLoadError(f"no model of {run_dir} passes verification: "
                             + " | ".join(f"{m.name}: {m.skipped}" for m in members)
                             + " (python scripts/verify_checkpoints.py lists them)")
    for member in tqdm(scored, desc=f"score {run_dir.name}", unit="model", disable=not accelerator.is_main_process):
        evaluation, split = evaluate_saved_model(config, str(member.folder), decode, accelerator, batch_size,
                                                 same_as=split)
        row = {"model": member.name, "step": member.step,
               **{key: evaluation.metrics.get(key) for key in FIGURES}}
        if guard_sets and config.eval.guard_sets:
            if guards is None:  # prepared once, with the first model's processor (a run's models share it)
                guards = prepare_guards(config, evaluation.model, split.processor, accelerator)
            row["guards"] = score_guards(evaluation.model, guards, split.processor, accelerator, member.step or 0)
        rows.append(row)
        if accelerator.is_main_process:
            write_outputs(output_dir / member.name, evaluation, None, html=False)
    result = {"run": str(run_dir), "split": config.data.eval_split, "best_step": best_step,
              "num_utterances": len(split.table) if split is not None else 0, "rows": rows,
              "skipped": [{"model": m.name, "step": m.step, "reason": m.skipped} for m in members if m.skipped],
              "selection": [{"step": e["step"], "wer": e.get("wer")} for e in evaluations]}
    if accelerator.is_main_process:
        write_scores(output_dir, result)
        if tensorboard:
            note = log_to_tensorboard(run_dir, result)
            if note:
                say(note)
    accelerator.wait_for_everyone()
    return result


def prepare_guards(config: RunConfig, model, processor, accelerator):
    with accelerator.main_process_first():
        guards = build_guard_sets(config, processor, model.config.max_target_positions)
    attach_loaders(guards, config, model.config.decoder_start_token_id, accelerator)
    return guards


def score_guards(model, guards, processor, accelerator, step: int) -> dict:
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    log_mel = LogMel(processor.feature_extractor).to(accelerator.device)
    results = evaluate_guard_sets(prepared, guards, accelerator, processor.tokenizer, log_mel=log_mel, step=step)
    return {name: guard_figures(result.metrics) for name, result in results.items()}


def write_scores(output_dir: Path, result: dict) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(output_dir / f"{SCORES_FILE}.json", result),
               write_text_atomic(output_dir / f"{SCORES_FILE}.md", scores_markdown(result))]
    picture = plot_scores(result, output_dir / f"{SCORES_FILE}.png")
    return written + ([picture] if picture else [])


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def scores_markdown(result: dict) -> str:
    """The table: one row per scored model, by step, the selection WER the loop saw at that step beside it."""
    selection = {entry["step"]: entry["wer"] for entry in result["selection"]}
    guard_names = sorted({name for row in result["rows"] for name in row.get("guards", {})})
    header = ["model", "step", *[f"{result['split']} {h}" for h in HEADERS], "selection WER",
              *[f"{name} WER" for name in guard_names]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        step = row["step"]
        guards = [_cell(row.get("guards", {}).get(name, {}).get("wer")) for name in guard_names]
        lines.append("| " + " | ".join([row["model"], "-" if step is None else str(step),
                                         *[_cell(row[key]) for key in FIGURES], _cell(selection.get(step)),
                                         *guards]) + " |")
    lines += [f"\n{result['num_utterances']} utterances of split {result['split']}; best/ is the model the loop "
              f"chose (step {result['best_step']})."]
    lines += [f"- skipped {s['model']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def plot_scores(result: dict, path: Path) -> Path | None:
    """run_scores.png: the split's WER of each checkpoint by step, best/ marked, and the loop's selection WER."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    checkpoints = [row for row in result["rows"] if row["model"] != BEST_DIR and row["step"] is not None]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot([r["step"] for r in checkpoints], [r["wer"] for r in checkpoints], "o-",
              label=f"{result['split']} WER of checkpoints/step_N")
    if result["selection"]:
        axes.plot([e["step"] for e in result["selection"]], [e["wer"] for e in result["selection"]], "s--",
                  alpha=0.7, label="selection WER (the loop's evaluations)")
    best = next((row for row in result["rows"] if row["model"] == BEST_DIR and row["step"] is not None), None)
    if best is not None:  # hollow, so the checkpoint of the same step shows through
        axes.plot([best["step"]], [best["wer"]], "*", markersize=18, markerfacecolor="none", markeredgewidth=1.5,
                  label=f"best/ ({result['split']} WER)")
    steps = [row["step"] for row in result["rows"] if row["step"] is not None]
    if steps:  # at least a step either side, so that a single checkpoint gets whole-number ticks too
        pad = max(1.0, 0.08 * (max(steps) - min(steps)))
        axes.set_xlim(min(steps) - pad, max(steps) + pad)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    axes.margins(y=0.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("WER (%)")
    axes.set_title(f"{Path(result['run']).name}: {result['split']} WER by step")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def require_matplotlib():
    return require("matplotlib", "checkpoints", "the picture of a run's scores")


def log_to_tensorboard(run_dir: Path, result: dict) -> str:
    """The checkpoints' figures as scalars `checkpoint_eval/<split>/<figure>` at their steps, in a new event file
    of the run's TensorBoard folder; a note instead when the run is running (its folder is its own until then)."""
    if holder_of(run_dir) is not None:
        return f"note: {run_dir} is a run that is running now: its TensorBoard log is left alone"
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
    try:
        for row in result["rows"]:
            if row["model"] == BEST_DIR or row["step"] is None:
                continue
            for key in FIGURES:
                if row[key] is not None:
                    writer.add_scalar(f"{TENSORBOARD_TAG}/{result['split']}/{key}", row[key], row["step"])
    finally:
        writer.close()
    return ""
