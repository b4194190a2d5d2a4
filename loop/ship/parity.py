"""The parity gate every export passes: the exported model in its own runtime and the transformers model transcribe
the same clips, decoded once into the same 16 kHz float waveforms (the prepared cache's audio, as
`scripts/evaluate.py` decodes it), with the same greedy settings; `parity.json` records the outcome, and a
failing export also gets a `FAILED` file beside it, so that a folder left behind by a failed gate says so.

A format supplies only a `Runtime`: "transcribe these waveforms" (`loop.ship.runtimes`: faster-whisper for
CTranslate2, whisper.cpp for GGML, onnxruntime for ONNX). The gate computes, for both sides, WER and CER
(`loop.eval.metrics`) and the hallucination figures (`loop.eval.hallucination`), counts identical transcripts, and
decides (`parity_failures`):
- float32 weights in a runtime fed the same features: every transcript identical to the transformers model's;
- quantized weights (float16 included: its rounding moves argmax decisions), or a runtime whose front end computes
  its own features (`Runtime.front_end` says how they differ): a WER at most `wer_tolerance` points above the
  transformers model's (int8 rounds each weight row to 256 levels, which moves some argmax decisions, so
  transcripts differ while WER barely moves).

"The same settings" is greedy decoding (beam 1, temperature 0 and no fallback, no thresholds, no previous-text
prompt, no VAD, without timestamps), the model's language, task, suppress and begin-suppress tokens, and one length
cap: min(the saved max_length, 220 new tokens), the most every runtime can honour (faster-whisper 224, as
CTranslate2 generates at most half of its 448-token limit; whisper.cpp 220, as it stops a window after
n_text_ctx / 2 - 4 tokens). Each runtime's module says how it is held to these.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from loop.config import RunConfig
from loop.data.audio import dequantize
from loop.data.sources import DataError
from loop.data.splits import build_eval_split
from loop.eval.hallucination import hallucination_metrics
from loop.eval.metrics import compute_metrics
from loop.files import write_json_atomic, write_text_atomic
from loop.languages import language_code
from loop.model.decoding import transcribe
from loop.model.features import LogMel, pad_waveforms
from loop.model.loading import load_for_inference

PARITY_FILE = "parity.json"
FAILED_FILE = "FAILED"  # written beside parity.json when the gate fails, removed when it passes
DEFAULT_CLIPS = 30  # the shipped test split; each clip costs one transformers decode and one or two exported ones
# WER points a quantized export may lose. Measured on whisper-base fine-tuned on the shipped corpus (docs/evaluate-and-ship.md): int8 changed 17 of the 30 test transcripts and moved WER by 3 points (down, by chance; the
# split has 198 words, so one word is 0.5 points). The tolerance must exceed that noise in either direction on a
# few dozen clips, while a broken quantization (tens of points) still fails.
DEFAULT_WER_TOLERANCE = 5.0
RUNTIME_MAX_LENGTH = 448  # faster-whisper's cap on prompt + new tokens (WhisperModel.max_length); CTranslate2 halves it
MAX_NEW_TOKENS = RUNTIME_MAX_LENGTH // 2 - 4  # 220: whisper.cpp's own cap per window (n_text_ctx / 2 - 4), the lowest
EXACT_QUANTIZATIONS = ("float32",)  # weights a runtime must reproduce transcript for transcript


@dataclass
class Clip:
    """One utterance of the split: its id, reference text and 16 kHz mono float32 waveform."""

    id: str
    reference: str
    waveform: np.ndarray


@dataclass
class ParitySettings:
    """How both sides decode, as parity.json records it (a runtime adds its own under `Runtime.settings`)."""

    language: str
    task: str
    max_new_tokens: int
    suppress_tokens: list[int]
    begin_suppress_tokens: list[int]
    prompt_tokens: list[int]
    end_token: int
    window_samples: int
    device: str
    threads: int = 1
    num_beams: int = 1
    temperature: float = 0.0
    without_timestamps: bool = True
    vad_filter: bool = False


@dataclass
class Runtime:
    """An exported model in the runtime that runs it: all a format gives the gate."""

    name: str
    """Its key in parity.json (faster_whisper, whisper_cpp, onnxruntime)."""
    transcribe: Callable[[list[np.ndarray]], list[str]]
    """16-kHz float waveforms -> one transcript each, decoded with the gate's settings."""
    settings: dict = field(default_factory=dict)
    """What the runtime was told beyond `ParitySettings` (compute type, thread count, its length cap)."""
    front_end: str = ""
    """Empty when the runtime is fed the model's own features; otherwise how its features differ, the reason its
    float32 transcripts are held to the WER tolerance instead of to identity."""
    reported: dict[str, Callable[[list[np.ndarray]], list[str]]] = field(default_factory=dict)
    """Other ways of running it, reported beside it but not checked (faster-whisper on unpadded clips)."""


@dataclass
class Reference:
    """The transformers side: settings and transcripts, computed once and compared with every runtime."""

    model_dir: str
    settings: ParitySettings
    texts: list[str]
    seconds: float


def read_clips(config: RunConfig, processor, max_label_length: int, count: int) -> list[Clip]:
    """The first `count` usable utterances of `config.data.eval_split`, prepared as `scripts/evaluate.py` prepares
    them (decoded, resampled, checked, cached as int16), as float waveforms. No usable utterance is a DataError."""
    data = dataclasses.replace(config.data, max_eval_samples=min(count, config.data.max_eval_samples or count))
    config = dataclasses.replace(config, data=data)  # the caller's config keeps its own limit
    table, report = build_eval_split(config, processor, max_label_length)
    if len(table) == 0:
        where = config.data.path or config.data.dataset_name
        raise DataError(f"the parity check has no clips: split {config.data.eval_split!r} of {where} gave no usable "
                        f"utterances ({report.summary()}); pick another --data.eval_split or --data.path, or pass "
                        "--no_parity")
    rows = table.with_format("numpy", columns=["id", "text", "audio", "audio_scale"])
    return [Clip(str(row["id"]), str(row["text"]), dequantize(row["audio"], float(row["audio_scale"]))) for row in rows]


def decoding_settings(model, processor, device: str) -> ParitySettings:
    """The model's saved greedy settings and the length cap every runtime can honour (module docstring)."""
    settings = model.generation_config
    prefix = list(processor.tokenizer.prefix_tokens)  # <|startoftranscript|>, language, task, <|notimestamps|>
    saved_new_tokens = min(settings.max_length, model.config.max_target_positions - len(prefix))
    return ParitySettings(
        language=language_code(settings.language), task=settings.task,
        max_new_tokens=min(saved_new_tokens, MAX_NEW_TOKENS),
        suppress_tokens=[int(t) for t in settings.suppress_tokens or []],
        begin_suppress_tokens=[int(t) for t in settings.begin_suppress_tokens or []],
        prompt_tokens=[int(t) for t in prefix], end_token=int(processor.tokenizer.eos_token_id),
        window_samples=processor.feature_extractor.n_samples, device=device, threads=torch.get_num_threads(),
    )


def transformers_transcripts(model, processor, clips: list[Clip], batch_size: int, device: str) -> list[str]:
    """Transcripts through `loop.model.decoding.transcribe`, the loop's own decoding, `batch_size` clips at a time."""
    log_mel = LogMel(processor.feature_extractor).to(device)
    texts = []
    for start in range(0, len(clips), batch_size):
        audio, _ = pad_waveforms([clip.waveform for clip in clips[start:start + batch_size]])
        texts += transcribe(model, log_mel(audio.to(device)), processor.tokenizer)
    return texts


def reference_side(model_dir: str | Path, clips: list[Clip], device: str = "cpu", batch_size: int = 8) -> Reference:
    """The transformers model's settings and transcripts of `clips`, decoded as every export is (a 30-s window,
    greedy, the shared length cap)."""
    # Every runtime decodes a 30-s window, so the transformers side does too, whatever window it trained with.
    model, processor = load_for_inference(str(model_dir), num_beams=1, encoder_window="full")
    settings = decoding_settings(model, processor, device)
    model.generation_config.max_length = settings.max_new_tokens  # transformers counts it in new tokens
    model.to(device)
    texts, seconds = timed(transformers_transcripts, model, processor, clips, batch_size, device)
    return Reference(str(model_dir), settings, texts, seconds)


def side_report(references: list[str], texts: list[str], language: str, seconds: float,
                baseline: list[str] | None = None) -> dict:
    """One side's rates (percent, corpus-level), hallucination figures, decode time and, against `baseline`,
    identical transcripts and the WER and CER of its transcripts taking the baseline's as references."""
    report = {**compute_metrics(references, texts, language), "seconds": round(seconds, 3),
              "seconds_per_clip": round(seconds / max(len(texts), 1), 4),
              "hallucination": hallucination_metrics(references, texts)}
    if baseline is not None:
        same = sum(a == b for a, b in zip(texts, baseline))
        # The transformers transcripts as reference: how far the export's words are from the model's own.
        agreement = compute_metrics(baseline, texts, language)
        report.update(identical=same, identical_share=same / max(len(texts), 1),
                      agreement_wer=agreement["wer"], agreement_cer=agreement["cer"])
    return report


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def judge(reference: Reference, runtime: Runtime, export_dir: str | Path, export_format: str, quantization: str,
          clips: list[Clip], *, split: str = "", wer_tolerance: float = DEFAULT_WER_TOLERANCE) -> dict:
    """Transcribes `clips` with `runtime`, compares with `reference`, writes `<export_dir>/parity.json` (and
    `FAILED` when the gate fails, removing a stale one when it passes) and returns the report; `failures` in it
    lists what the gate found wrong and `passed` is whether it found nothing."""
    waveforms = [clip.waveform for clip in clips]
    references, language = [clip.reference for clip in clips], reference.settings.language
    texts, seconds = timed(runtime.transcribe, waveforms)
    sides = {"transformers": side_report(references, reference.texts, language, reference.seconds),
             runtime.name: side_report(references, texts, language, seconds, reference.texts)}
    others = {}
    for name, other in runtime.reported.items():
        others[name], other_seconds = timed(other, waveforms)
        sides[name] = side_report(references, others[name], language, other_seconds, reference.texts)
    exact = quantization in EXACT_QUANTIZATIONS and not runtime.front_end
    report = {
        "model": reference.model_dir, "export": str(export_dir), "format": export_format, "runtime": runtime.name,
        "quantization": quantization, "exact": exact, "front_end": runtime.front_end or "the model's own features",
        "split": split, "num_clips": len(clips),
        "audio_seconds": round(sum(len(w) for w in waveforms) / 16000, 2), **sides,
        "wer_difference": sides[runtime.name]["wer"] - sides["transformers"]["wer"],
        "cer_difference": sides[runtime.name]["cer"] - sides["transformers"]["cer"],
        "wer_tolerance": wer_tolerance, "settings": {**asdict(reference.settings), **runtime.settings},
        "clips": [{"id": c.id, "reference": c.reference, "transformers": a, runtime.name: b,
                   **{name: others[name][i] for name in others}}
                  for i, (c, a, b) in enumerate(zip(clips, reference.texts, texts))],
    }
    report["failures"] = parity_failures(report)
    report["passed"] = not report["failures"]
    mark(Path(export_dir), report)
    return report


def mark(export_dir: Path, report: dict) -> None:
    """parity.json, and FAILED (the failures, one a line) when the gate failed; a passing gate removes FAILED."""
    write_json_atomic(export_dir / PARITY_FILE, report)
    failed = export_dir / FAILED_FILE
    if report["failures"]:
        write_text_atomic(failed, "\n".join(["the parity gate failed (details in parity.json):",
                                             *report["failures"], ""]))
    else:
        failed.unlink(missing_ok=True)


def parity_failures(report: dict) -> list[str]:
    """What parity.json shows wrong: for an exact check (float32 weights, the model's own features) any
    transcript that differs from the transformers model's; otherwise a WER more than `wer_tolerance` points above
    it."""
    name, n = report["runtime"], report["num_clips"]
    side, what = report[name], f"the {report['quantization']} {report['format']} export"
    if report["exact"]:
        if side["identical"] == n:
            return []
        first = next(c for c in report["clips"] if c["transformers"] != c[name])
        return [f"{what} transcribes {n - side['identical']} of {n} clips differently from the transformers "
                f"model in {name} (e.g. {first['id']}: {first[name]!r} instead of {first['transformers']!r})"]
    if report["wer_difference"] > report["wer_tolerance"]:
        return [f"{what}'s WER in {name} is {side['wer']:.2f}, {report['wer_difference']:.2f} points above the "
                f"transformers model's {report['transformers']['wer']:.2f} (tolerance {report['wer_tolerance']:g}); "
                "export with lighter quantization (float32 where the format offers it), or raise --wer_tolerance"]
    return []


def summary_line(report: dict) -> str:
    name, n = report["runtime"], report["num_clips"]
    t, side = report["transformers"], report[name]
    line = (f"parity of the {report['format']} export ({report['quantization']}, {name}) on {n} clips of "
            f"{report['split']}: {side['identical']}/{n} transcripts identical; WER transformers {t['wer']:.2f}, "
            f"{name} {side['wer']:.2f} ({report['wer_difference']:+.2f}); decode {t['seconds']:.1f} s vs "
            f"{side['seconds']:.1f} s")
    if report["exact"]:
        return line
    why = report["front_end"] if report["quantization"] in EXACT_QUANTIZATIONS else f"{report['quantization']} weights"
    return line + f"; held to the WER tolerance of {report['wer_tolerance']:g} points ({why})"
