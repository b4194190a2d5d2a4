"""What one child process times: data preparation, training and evaluation of one side, in that order.

    python -m benchmarks.sides SPEC.json RESULT.json     # started by benchmarks/run.py, from the project root

Ours runs the library's own functions as `scripts/train.py` does: `loop.data.prepare.prepare`, `loop.train.setup()`
then `loop.train.optimizer_step` (what `fit()` calls once per step), `loop.eval.evaluation.evaluate`. The
reference runs the blog's recipe (benchmarks/reference_recipe.py) through `Seq2SeqTrainer`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
from transformers import WhisperConfig

from benchmarks.measure import LabelWidths, MemoryPeak, step_clock, synchronize
from benchmarks.reference_recipe import (
    DataCollatorSpeechSeq2SeqWithPadding,
    blog_compute_metrics,
    numpy_path_feature_extractor,
    reference_arguments,
    reference_model,
    reference_prepare,
)
from benchmarks.settings import LANGUAGE, TASK, BenchSettings
from benchmarks.workspace import DYNAMIC, PACKED, Workspace, dynamic_config, loop_config, manifest_rows, packed_config
from loop.config import RunConfig
from loop.data.sources import SkipLog, load_utterances
from loop.data.splits import SplitReport, prepare
from loop.eval.evaluation import evaluate
from loop.model.loading import load_model, load_processor
from loop.train import Run, endless_batches, optimizer_step, setup


@dataclass
class ChildSpec:
    """What the parent asks one child process to time (written as JSON, since the child is a fresh process)."""

    side: str
    """`loop`, `reference`, `packed` (ours, training only, on packed rows) or `dynamic` (ours at the dynamic
    encoder window, training and evaluation)."""
    settings: BenchSettings
    """Resolved settings."""
    root: Path
    """The workspace folder the parent filled."""

    def to_json(self) -> str:
        return json.dumps({"side": self.side, "settings": asdict(self.settings), "root": str(self.root)})

    @classmethod
    def from_json(cls, text: str) -> ChildSpec:
        spec = json.loads(text)
        return cls(spec["side"], BenchSettings(**spec["settings"]), Path(spec["root"]))


def time_loop_prep(config: RunConfig, processor) -> dict:
    """Ours: `loop.data.prepare.prepare` of the training manifest into an empty cache folder (clips/s)."""
    rows = load_utterances(config.data, "train", SkipLog())
    max_label_length = WhisperConfig.from_pretrained(config.model.name_or_path).max_target_positions
    with tempfile.TemporaryDirectory(dir=config.data.cache_dir) as fresh:
        started = time.perf_counter()
        table = prepare(rows, processor.feature_extractor, processor.tokenizer, SplitReport("train"),
                        max_duration_s=config.data.max_duration_s, max_label_length=max_label_length,
                        num_proc=config.data.num_proc, cache_dir=fresh)
        seconds = time.perf_counter() - started
        kept, cache_bytes = len(table), folder_bytes(fresh)
    return {"clips": len(rows), "kept": kept, "seconds": seconds, "clips_per_second": len(rows) / seconds,
            "cache_bytes_per_clip": cache_bytes / max(1, kept)}


def time_reference_prep(settings: BenchSettings, workspace: Workspace, processor) -> dict:
    """Reference: the blog's one-example-at-a-time map on the NumPy STFT, into an empty cache file (clips/s)."""
    rows = manifest_rows(workspace, "train")
    numpy_path = numpy_path_feature_extractor(processor.feature_extractor)
    with tempfile.TemporaryDirectory(dir=workspace.root) as fresh:
        started = time.perf_counter()
        table = reference_prepare(rows, numpy_path, processor.tokenizer, Path(fresh) / "train.arrow",
                                  settings.prep_num_proc)
        seconds = time.perf_counter() - started
        kept, cache_bytes = len(table), folder_bytes(fresh)
    return {"clips": len(rows), "kept": kept, "seconds": seconds, "clips_per_second": len(rows) / seconds,
            "cache_bytes_per_clip": cache_bytes / max(1, kept)}


def folder_bytes(folder) -> int:
    """Bytes of every file below `folder`: what a prepared cache costs on disk."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def time_loop_training(run: Run, warmup_steps: int, timed_steps: int) -> dict:
    """`warmup_steps` untimed then `timed_steps` timed calls of `loop.train.optimizer_step`, as `fit()` makes
    them, data loading included (samples/s; utterances/s counts each utterance of a packed row)."""
    widths = LabelWidths()
    batches = widths.batches(endless_batches(run))
    with MemoryPeak() as memory:  # warm-up and timed steps, as on the reference side
        for _ in range(warmup_steps):
            optimizer_step(run, batches)
        synchronize()
        warmup_batches = len(widths.widths)
        steps = []
        started = time.perf_counter()
        for _ in range(timed_steps):
            steps.append(optimizer_step(run, batches))
        synchronize()
        seconds = time.perf_counter() - started
    samples = sum(step.samples for step in steps)
    utterances = int(sum(step.utterances for step in steps))  # device tensors: read once the clock has stopped
    audio_seconds = float(sum(step.audio_seconds for step in steps))
    return {"steps": timed_steps, "samples": samples, "seconds": seconds, "samples_per_second": samples / seconds,
            "utterances_per_second": utterances / seconds,
            "audio_seconds_per_second": audio_seconds / seconds,
            "label_tokens": widths.mean(skip=warmup_batches), **memory.figures()}


def time_loop_eval(run: Run) -> dict:
    """Ours: `loop.eval.evaluation.evaluate` (loss and generation) over the longest-first selection loader, on a
    fresh copy of the folder's weights, so both sides decode with the same (initial) model (utterances/s)."""
    model, _ = load_model(run.config.model, run.config.eval)
    model = run.accelerator.prepare_model(model, evaluation_mode=True)
    with MemoryPeak() as memory:
        started = time.perf_counter()
        result = evaluate(model, run.selection_loader, run.accelerator, run.processor.tokenizer,
                          run.data.selection["text"], run.config.model.language, log_mel=run.log_mel,
                          description="benchmark eval")
        synchronize()
        seconds = time.perf_counter() - started
    ids = run.data.selection["id"]
    hypotheses = {ids[p["index"]]: p["hypothesis"] for p in result.predictions}
    n = result.metrics["num_utterances"]
    return {"utterances": n, "seconds": seconds, "utterances_per_second": n / seconds,
            "wer": result.metrics["wer"], "hypotheses": hypotheses, **memory.figures()}


def time_reference_training(settings: BenchSettings, workspace: Workspace, processor) -> dict:
    """Reference: `Seq2SeqTrainer.train()` for warmup + timed steps; the timed span runs from the end of the last
    warm-up step to the end of the last step (samples/s)."""
    # takes seconds to import; only the reference needs it
    from transformers import Seq2SeqTrainer

    model = reference_model(workspace.model_dir, settings.attn_implementation)
    widths = LabelWidths()
    clock = step_clock()
    collator = DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id)
    trainer = Seq2SeqTrainer(
        model=model,
        args=reference_arguments(settings, workspace.root / "reference-run"),
        train_dataset=datasets.Dataset.from_file(str(workspace.reference_data / "train.arrow")),
        data_collator=widths.collator(collator),
        processing_class=processor.feature_extractor,
        callbacks=[clock],
    )
    with MemoryPeak() as memory:
        trainer.train()
    seconds = clock.ends[-1] - clock.ends[settings.warmup_steps - 1]
    samples = settings.timed_steps * settings.train_batch_size
    mean_duration = json.loads(workspace.clip_facts.read_text())["train_mean_duration_s"]
    return {"steps": settings.timed_steps, "samples": samples, "seconds": seconds,
            "samples_per_second": samples / seconds,
            # the Trainer never sees durations: samples x the training clips' mean duration
            "audio_seconds_per_second": samples * mean_duration / seconds,
            "label_tokens": widths.mean(skip=settings.warmup_steps), **memory.figures()}


def time_reference_eval(settings: BenchSettings, workspace: Workspace, processor) -> dict:
    """Reference: `trainer.predict` with `predict_with_generate` on a fresh copy of the folder's weights, with
    the blog's WER `compute_metrics` (utterances/s)."""
    from transformers import Seq2SeqTrainer

    model = reference_model(workspace.model_dir, settings.attn_implementation)
    evaluation = datasets.Dataset.from_file(str(workspace.reference_data / "eval.arrow"))
    trainer = Seq2SeqTrainer(
        model=model,
        args=reference_arguments(settings, workspace.root / "reference-run"),
        data_collator=DataCollatorSpeechSeq2SeqWithPadding(processor, model.config.decoder_start_token_id),
        compute_metrics=blog_compute_metrics(processor.tokenizer),
        processing_class=processor.feature_extractor,
    )
    with MemoryPeak() as memory:
        started = time.perf_counter()
        prediction = trainer.predict(evaluation)
        synchronize()
        seconds = time.perf_counter() - started
    ids = manifest_rows(workspace, "eval")["id"]
    predicted = prediction.predictions
    predicted[predicted == -100] = processor.tokenizer.pad_token_id
    texts = [t.strip() for t in processor.tokenizer.batch_decode(predicted, skip_special_tokens=True)]
    n = len(evaluation)
    return {"utterances": n, "seconds": seconds, "utterances_per_second": n / seconds,
            "wer": prediction.metrics.get("test_wer"), "hypotheses": dict(zip(ids, texts)), **memory.figures()}


def quiet_libraries() -> None:
    """No progress bars or warnings in the child's log, so a failure's tail shows the error."""
    import warnings

    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_side(spec: ChildSpec) -> dict:
    """One side, one repeat, in this (fresh) process: {"prep", "train", "eval"} figures (for `packed`: "train";
    for `dynamic`: "train" and "eval")."""
    quiet_libraries()
    settings, workspace = spec.settings, Workspace(spec.root)
    if spec.side == PACKED:
        run = setup(packed_config(settings, workspace))
        return {"train": time_loop_training(run, settings.warmup_steps, settings.timed_steps)}
    if spec.side == DYNAMIC:
        run = setup(dynamic_config(settings, workspace))
        return {"train": time_loop_training(run, settings.warmup_steps, settings.timed_steps),
                "eval": time_loop_eval(run)}
    processor = load_processor(str(workspace.model_dir), LANGUAGE, TASK)
    if spec.side == "reference":
        return {"prep": time_reference_prep(settings, workspace, processor),
                "train": time_reference_training(settings, workspace, processor),
                "eval": time_reference_eval(settings, workspace, processor)}
    config = loop_config(settings, workspace)
    figures = {"prep": time_loop_prep(config, processor)}
    run = setup(config)  # the prepared tables come from the cache the parent filled
    figures["train"] = time_loop_training(run, settings.warmup_steps, settings.timed_steps)
    figures["eval"] = time_loop_eval(run)
    return figures


def main(spec_path: str, result_path: str) -> None:
    spec = ChildSpec.from_json(Path(spec_path).read_text())
    Path(result_path).write_text(json.dumps(run_side(spec)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
