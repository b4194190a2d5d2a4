"""Standalone evaluation of a saved model on one prepared split, through the same `loop.eval.evaluation.evaluate`
the training loop uses, optionally against a second model on the same utterances. `scripts/evaluate.py` is the
command line; this module does the work.

One decoding, three paths: the model folder's saved generation config (language, task, max_length, num_beams)
decides how it decodes, here as in the loop and the demo, unless the command line overrides it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
from accelerate import Accelerator

from loop.config import ConfigError, RunConfig
from loop.config.loading import parse_overrides
from loop.data.loaders import eval_dataloader
from loop.data.prepare import SplitReport
from loop.data.sources import DataError
from loop.data.splits import build_eval_split
from loop.eval.evaluation import EvalResult, evaluate
from loop.eval.hallucination import worst_hallucinations
from loop.eval.long_form import LongFormOptions, evaluate_long_form, plan_recordings
from loop.eval.report import (
    DEFAULT_HTML_AUDIO_MB,
    WORST_HALLUCINATIONS,
    utterance_rows,
    write_predictions_jsonl,
    write_report_html,
    write_report_md,
)
from loop.eval.timestamps import evaluate_timestamps
from loop.files import write_json_atomic
from loop.model.decoding_options import OPTION_NAMES, describe, override_decoding_options
from loop.model.encoder_window import saved_encoder_window
from loop.model.features import LogMel
from loop.model.loading import load_companion
from loop.run.accelerator import build_accelerator, resolve_mixed_precision
from loop.run.lock import refuse_inside_running_run
from loop.run.model_folder import load_inference_model

METRIC_KEYS = ("wer", "cer", "normalized_wer", "normalized_cer", "loss", "language_id", "insertion_rate", "loop_share",
               "long_share", "compressible_share", "reference_compressible_share", "empty_share",
               "hallucination_counts", "num_utterances", "num_failed")


@dataclass
class DecodeOverrides:
    """Decoding settings given on the command line; None keeps what the model folder saved."""

    language: str | None = None
    task: str | None = None
    num_beams: int | None = None
    max_length: int | None = None
    encoder_window: str | None = None
    """`full` or `dynamic`; None: the window the model was trained with (its config.json records it)."""
    options: dict = field(default_factory=dict)
    """The anti-hallucination options typed (`eval.no_repeat_ngram_size`, ...: `loop.model.decoding_options`)."""

    @classmethod
    def from_command_line(cls, language: str | None, task: str | None, num_beams: int | None,
                          overrides: list[str], encoder_window: str | None = None,
                          eval_config=None) -> DecodeOverrides:
        """`--language/--task/--num_beams/--encoder_window`, else the same settings given as `--model.language`,
        `--model.task`, `--eval.generation_num_beams`, `--eval.generation_max_length`, `--model.encoder_window`
        and the options of `loop.model.decoding_options` as `--eval.<name>`, their values from `eval_config` (the checked
        configuration) (a preset's values do not override the model folder: only what the user typed does)."""
        typed, _ = parse_overrides(overrides)
        model, evaluation = typed.get("model", {}), typed.get("eval", {})
        beams = num_beams if num_beams is not None else evaluation.get("generation_num_beams")
        max_length = evaluation.get("generation_max_length")
        return cls(
            language=language or model.get("language"),
            task=task or model.get("task"),
            num_beams=int(beams) if beams is not None else None,
            max_length=int(max_length) if max_length is not None else None,
            encoder_window=encoder_window or model.get("encoder_window"),
            options={name: getattr(eval_config, name) for name in OPTION_NAMES if name in evaluation}
            if eval_config is not None else {},
        )


@dataclass
class ModelEvaluation:
    """One model's result on the split: `metrics` as written to metrics.json, `rows` as in predictions.jsonl;
    `model`, the model as loaded (for the long-form evaluation), and `long_form_rows` as in
    long_form_predictions.jsonl (with `--long_form`)."""

    metrics: dict
    rows: list[dict]
    model: object = None
    long_form_rows: list[dict] = field(default_factory=list)


def decoding_settings(model) -> dict:
    settings = model.generation_config
    return {"language": settings.language, "task": settings.task, "num_beams": settings.num_beams or 1,
            "max_length": settings.max_length, "encoder_window": saved_encoder_window(model)[0],
            **{name: value for name, value in describe(settings).items() if value}}


def summary_metrics(name: str, split: str, result: EvalResult, report: SplitReport, model,
                    accelerator: Accelerator) -> dict:
    """What metrics.json says about one model: the rates, the rows skipped by preparation and why, the rows it kept
    but flagged as implausible, the decoding."""
    return {
        "model": name,
        "split": split,
        **{key: result.metrics[key] for key in METRIC_KEYS if key in result.metrics},
        "num_read": report.read,
        "num_skipped": sum(report.skips.counts.values()),
        "skipped": dict(report.skips.counts),
        "skip_messages": report.skips.messages,
        "num_implausible": report.implausible,
        "implausible_messages": report.implausible_messages,
        "seconds": result.seconds,
        "decoding": decoding_settings(model),
        "mixed_precision": accelerator.mixed_precision,
        "num_processes": accelerator.num_processes,
    }


def same_preparation(processor, other) -> bool:
    """Whether prepared rows fit both models: the same window and sampling rate (the audio limits) and the same
    label tokens. The mel bins need not agree: features are computed per model from the prepared audio."""
    fe, other_fe = processor.feature_extractor, other.feature_extractor
    return ((fe.chunk_length, fe.sampling_rate) == (other_fe.chunk_length, other_fe.sampling_rate)
            and processor.tokenizer.prefix_tokens == other.tokenizer.prefix_tokens
            and processor.tokenizer.backend_tokenizer.to_str() == other.tokenizer.backend_tokenizer.to_str())


def rows_like(table: datasets.Dataset, reference: datasets.Dataset) -> datasets.Dataset:
    """`table`'s rows for the utterances of `reference`, in its order; every one must be there."""
    position = {utterance: i for i, utterance in enumerate(table["id"])}
    missing = [utterance for utterance in reference["id"] if utterance not in position]
    if missing:
        raise DataError(
            f"--compare: {len(missing)} of the {len(reference)} utterances the first model was evaluated on cannot "
            f"be prepared for the second one (e.g. {missing[0]}; its audio window or label length may be shorter): "
            "swap the two models or lower --data.max_duration_s"
        )
    return table.select([position[utterance] for utterance in reference["id"]])


@dataclass
class PreparedSplit:
    """The prepared rows one model was evaluated on, their report, and the processor that prepared them."""

    table: datasets.Dataset
    report: SplitReport
    processor: object


def prepare_split(config: RunConfig, model, processor, accelerator: Accelerator,
                  same_as: PreparedSplit | None = None) -> PreparedSplit:
    """`config.data.eval_split` prepared for `model`. With `same_as` (another model's split) the same utterances:
    its very table when the preparation fits this model too, else the same ids prepared again for this one."""
    if same_as is not None and same_preparation(same_as.processor, processor):
        return PreparedSplit(same_as.table, same_as.report, processor)
    with accelerator.main_process_first():  # the main process fills the data cache, the others read it
        table, report = build_eval_split(config, processor, model.config.max_target_positions)
    if same_as is not None:
        table = rows_like(table, same_as.table)
    if len(table) == 0:
        raise DataError(f"no usable utterances to evaluate: {report.summary()}")
    return PreparedSplit(table, report, processor)


def evaluate_saved_model(config: RunConfig, name: str, decode: DecodeOverrides, accelerator: Accelerator,
                         batch_size: int, same_as: PreparedSplit | None = None,
                         timestamps: bool = False, assistant: str = "",
                         option: str = "--model") -> tuple[ModelEvaluation, PreparedSplit]:
    """Loads `name` (a model folder, a checkpoint or a Hub id: `loop.run.model_folder`) as saved (plus `decode`)
    and decodes every row of the split once over all processes with
    `loop.eval.evaluation.evaluate` (on `same_as`'s utterances if given); with `timestamps`, the main process decodes
    them with timestamps too (`loop.eval.timestamps`, metrics.json's "timestamps"); with `assistant` (a model folder
    or Hub id), by speculative decoding with it as the assistant model."""
    settings = {key: value for key, value in asdict(decode).items() if key != "options"}
    model, processor = load_inference_model(
        name, **settings, fallback_language=config.model.language,
        attn_implementation=config.model.attn_implementation, option=option,
    )
    override_decoding_options(model.generation_config, decode.options)
    split = prepare_split(config, model, processor, accelerator, same_as)
    loader = accelerator.prepare(eval_dataloader(split.table, batch_size, model.config.decoder_start_token_id))
    prepared = accelerator.prepare_model(model, evaluation_mode=True)
    log_mel = LogMel(processor.feature_extractor).to(accelerator.device)
    assistant_model = assistant and load_companion(
        assistant, model, processor.tokenizer, "eval.assistant_model", encoder_window=saved_encoder_window(model)[0],
        attn_implementation=config.model.attn_implementation, device=accelerator.device)
    result = evaluate(prepared, loader, accelerator, processor.tokenizer, split.table["text"],
                      model.generation_config.language, log_mel=log_mel, description=f"evaluate {name}",
                      assistant_model=assistant_model or None)
    metrics = summary_metrics(name, config.data.eval_split, result, split.report, model, accelerator)
    if assistant:
        metrics["decoding"]["assistant_model"] = assistant
        metrics["speculative"] = result.metrics["speculative"]
    if timestamps and accelerator.is_main_process:
        metrics["timestamps"] = evaluate_timestamps(model, processor.tokenizer, split.table, log_mel,
                                                    batch_size=batch_size, language=model.generation_config.language)
    rows = utterance_rows(result.predictions, split.table)
    metrics["worst_hallucinations"] = worst_hallucinations(rows, WORST_HALLUCINATIONS)
    return ModelEvaluation(metrics, rows, model), split


def run_evaluation(config: RunConfig, model_name: str, *, compare: str | None = None,
                   decode: DecodeOverrides | None = None, batch_size: int | None = None,
                   mixed_precision: str | None = None, html: bool = False,
                   html_audio_mb: float = DEFAULT_HTML_AUDIO_MB, long_form: LongFormOptions | None = None,
                   timestamps: bool = False) -> dict:
    """Evaluates `model_name` (and `compare`, on the same utterances) and, on the main process, writes
    metrics.json, predictions.jsonl, report.md (and report.html) to `config.output_dir`. With `long_form`, the
    first model also transcribes long recordings joined from the split's clips (`loop.eval.long_form`, on the main
    process), under the `long_form` key of its metrics, with long_form_predictions.jsonl. Returns the metrics."""
    decode = decode or DecodeOverrides()
    batch_size = batch_size or config.eval.per_device_eval_batch_size
    inside_run = refuse_inside_running_run(config.output_dir)  # that run owns its folder until it ends
    if inside_run:
        raise ConfigError([inside_run])
    accelerator = build_accelerator(resolve_mixed_precision(mixed_precision, "--mixed_precision"))
    first, split = evaluate_saved_model(config, model_name, decode, accelerator, batch_size, timestamps=timestamps,
                                        assistant=config.eval.assistant_model)
    second = None
    if compare:
        second, _ = evaluate_saved_model(config, compare, decode, accelerator, batch_size, same_as=split,
                                         timestamps=timestamps, option="--compare")
        first.metrics["compare"] = second.metrics
    # Planned on every process, so a split too short for one recording stops them all; decoded on the main one.
    plan = plan_recordings(split.table, split.processor, long_form, config.data.eval_split) if long_form else None
    if plan is not None and accelerator.is_main_process:
        with accelerator.autocast():
            first.metrics["long_form"], first.long_form_rows = evaluate_long_form(
                first.model, split.processor, split.table, long_form, config.data.eval_split,
                first.model.generation_config.language, batch_size, clip_predictions=first.rows, built=plan)
    if accelerator.is_main_process:
        write_outputs(Path(config.output_dir), first, second, html, html_audio_mb)
    accelerator.wait_for_everyone()
    return first.metrics


def write_outputs(output_dir: Path, first: ModelEvaluation, second: ModelEvaluation | None, html: bool,
                  html_audio_mb: float = DEFAULT_HTML_AUDIO_MB) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "metrics.json"]
    write_json_atomic(written[0], first.metrics)
    written.append(write_predictions_jsonl(output_dir / "predictions.jsonl", first.rows))
    compare_rows = second.rows if second is not None else None
    if second is not None:
        written.append(write_predictions_jsonl(output_dir / "compare_predictions.jsonl", second.rows))
    if first.long_form_rows:
        written.append(write_predictions_jsonl(output_dir / "long_form_predictions.jsonl", first.long_form_rows))
    written.append(write_report_md(output_dir / "report.md", first.metrics, first.rows, compare_rows))
    if html:
        written.append(write_report_html(output_dir / "report.html", first.metrics, first.rows, compare_rows,
                                         max_audio_mb=html_audio_mb))
    return written


def summary_line(metrics: dict) -> str:
    skipped = f", {metrics['num_skipped']} skipped" if metrics.get("num_skipped") else ""
    skipped += f", {metrics['num_implausible']} flagged as implausible" if metrics.get("num_implausible") else ""
    return (f"{metrics['model']} on {metrics['split']} ({metrics['num_utterances']} utterances{skipped}): "
            f"WER {metrics['wer']:.2f}  CER {metrics['cer']:.2f}  normalized WER {metrics['normalized_wer']:.2f}  "
            f"normalized CER {metrics['normalized_cer']:.2f}  ({metrics['seconds']:.1f} s)"
            + speculative_line(metrics.get("speculative"))
            + "".join(f"\n  timestamps, {kind} rows: {timestamp_line(scores)}"
                      for kind, scores in metrics.get("timestamps", {}).items()))


def speculative_line(counts: dict | None) -> str:
    if not counts:
        return ""
    return (f"\n  speculative decoding: {counts['tokens_per_model_pass']:.2f} tokens per pass of the model, "
            f"{100 * counts['draft_acceptance']:.1f}% of the assistant's {counts['drafted']} draft tokens kept")


def timestamp_line(scores: dict) -> str:
    error = scores["boundary_error_s"]
    return (f"{scores['rows']} rows, {scores['well_formed_percent']:.1f}% well formed, boundary error "
            + (f"{error:.3f} s" if error is not None else "- (no segments)") + f", WER {scores['wer']:.2f}")
