"""The parity check of an export: the exported model in faster-whisper and the transformers model transcribe the
same clips, decoded once into the same 16 kHz float waveforms (the prepared cache's audio, as
`scripts/evaluate.py` decodes it), with the same greedy settings; `parity.json` records the outcome.

What "the same settings" takes, since faster-whisper's defaults differ from transformers' in several places:
- greedy: beam 1, one temperature (0, so no fallback), no compression-ratio, log-prob or no-speech thresholds, no
  VAD, no previous-text prompt, without timestamps, the model's language and task;
- the same suppress tokens (the generation config's; faster-whisper adds its task and start tokens, which a
  trained model never emits mid-transcript) and begin-suppress tokens (CTranslate2's `suppress_blank` applies the
  export's `suppress_ids_begin`, converted from the same list);
- the same length cap: CTranslate2 generates at most half the length faster-whisper allows (448 tokens, prompt
  included), so at most 224 new tokens, where transformers allows the generation config's `max_length` new tokens
  (225 in the loop's models). Both sides get min(max_length, 224), and faster-whisper a `max_new_tokens` that
  CTranslate2's halving brings back to it;
- the same encoder input: transformers pads each clip with silence to the 30-s window before computing features,
  while faster-whisper computes features of the clip alone and pads them with zeros, a value silence never has. So
  faster-whisper gets each clip padded to 30 s with zero samples, and the features agree to float rounding.
  It is also run on the clips as they are (`faster_whisper_unpadded`, the way `model.transcribe(clip)` is called),
  reported but not checked: that difference is faster-whisper's front end, not the export's.

With float32 weights the check requires every transcript to be identical; with quantized weights, a WER at most
`wer_tolerance` points above the transformers model's (int8 rounds each weight row to 256 levels, which moves
some argmax decisions, so transcripts differ while WER barely moves).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from loop.config import RunConfig
from loop.data.audio import dequantize
from loop.data.sources import DataError
from loop.data.splits import build_eval_split
from loop.eval.metrics import compute_metrics
from loop.extras import require
from loop.files import write_json_atomic
from loop.languages import language_code
from loop.model.decoding import transcribe
from loop.model.features import LogMel, pad_waveforms
from loop.model.loading import load_for_inference
from loop.ship.export import QUANTIZATIONS

PARITY_FILE = "parity.json"
DEFAULT_CLIPS = 30  # the shipped test split; each clip costs one transformers and two faster-whisper decodes
# WER points a quantized export may lose. Measured on whisper-base fine-tuned on the shipped corpus
# (docs/evaluate-and-ship.md): int8 changed 17 of the 30 test transcripts and moved WER by 3 points (down, by
# chance; the split has 198 words, so one word is 0.5 points). The tolerance must exceed that noise in either
# direction on a few dozen clips, while a broken quantization (tens of points) still fails.
DEFAULT_WER_TOLERANCE = 5.0
FASTER_WHISPER_MAX_LENGTH = 448  # faster-whisper's cap on prompt + new tokens (WhisperModel.max_length)


@dataclass
class Clip:
    """One utterance of the split: its id, reference text and 16 kHz mono float32 waveform."""

    id: str
    reference: str
    waveform: np.ndarray


@dataclass
class ParitySettings:
    """How both sides decode, as parity.json records it."""

    language: str
    task: str
    max_new_tokens: int
    suppress_tokens: list[int]
    begin_suppress_tokens: list[int]
    faster_whisper_max_new_tokens: int
    window_samples: int
    device: str
    compute_type: str = ""
    threads: int = 1
    num_beams: int = 1
    temperature: float = 0.0
    without_timestamps: bool = True
    vad_filter: bool = False


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
    """The model's saved greedy settings and the length cap both sides can honour (module docstring)."""
    settings = model.generation_config
    prompt = len(processor.tokenizer.prefix_tokens)  # <|startoftranscript|>, language, task, <|notimestamps|>
    saved_new_tokens = min(settings.max_length, model.config.max_target_positions - prompt)
    new_tokens = min(saved_new_tokens, FASTER_WHISPER_MAX_LENGTH // 2)
    return ParitySettings(
        language=language_code(settings.language), task=settings.task, max_new_tokens=new_tokens,
        suppress_tokens=[int(t) for t in settings.suppress_tokens or []],
        begin_suppress_tokens=[int(t) for t in settings.begin_suppress_tokens or []],
        faster_whisper_max_new_tokens=2 * new_tokens - prompt,
        window_samples=processor.feature_extractor.n_samples, device=device, threads=torch.get_num_threads(),
    )


def transformers_transcripts(model, processor, clips: list[Clip], batch_size: int, device: str) -> list[str]:
    """Transcripts through `loop.eval.evaluation.transcribe`, the loop's own decoding, `batch_size` clips at a time."""
    log_mel = LogMel(processor.feature_extractor).to(device)
    texts = []
    for start in range(0, len(clips), batch_size):
        audio, _ = pad_waveforms([clip.waveform for clip in clips[start:start + batch_size]])
        texts += transcribe(model, log_mel(audio.to(device)), processor.tokenizer)
    return texts


def faster_whisper_transcripts(whisper, clips: list[Clip], settings: ParitySettings, pad: bool) -> list[str]:
    """Transcripts of the exported model (a `faster_whisper.WhisperModel`), each clip zero-padded to the window
    when `pad`, else as it is."""
    options = {
        "language": settings.language, "task": settings.task, "beam_size": 1, "best_of": 1,
        "temperature": settings.temperature, "without_timestamps": True, "condition_on_previous_text": False,
        "compression_ratio_threshold": None, "log_prob_threshold": None, "no_speech_threshold": None,
        "vad_filter": False, "suppress_blank": True, "suppress_tokens": settings.suppress_tokens,
        "max_new_tokens": settings.faster_whisper_max_new_tokens,
    }
    texts = []
    for clip in clips:
        audio = clip.waveform
        if pad and len(audio) < settings.window_samples:
            audio = np.pad(audio, (0, settings.window_samples - len(audio)))
        segments, _ = whisper.transcribe(audio, **options)
        texts.append("".join(segment.text for segment in segments).strip())
    return texts


def side_report(references: list[str], texts: list[str], language: str, seconds: float,
                baseline: list[str] | None = None) -> dict:
    """One side's rates (percent, corpus-level), decode time and, against `baseline`, identical transcripts."""
    report = {**compute_metrics(references, texts, language), "seconds": round(seconds, 3)}
    if baseline is not None:
        same = sum(a == b for a, b in zip(texts, baseline))
        report.update(identical=same, identical_share=same / max(len(texts), 1))
    return report


def timed(function, *args):
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def run_parity(model_dir: str | Path, export_dir: str | Path, quantization: str, data: list[Clip], *,
               split: str = "", wer_tolerance: float = DEFAULT_WER_TOLERANCE, device: str = "cpu",
               batch_size: int = 8) -> dict:
    """Transcribes `data` (`read_clips` of `split`) with the model folder and with its export, writes
    `<export_dir>/parity.json` and returns its content; `failures` in it lists what the check found wrong."""
    WhisperModel = require("faster_whisper", "export", "the parity check").WhisperModel

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    # The export always decodes a 30-s window, so the transformers side does too, whatever window it trained with.
    model, processor = load_for_inference(str(model_dir), num_beams=1, encoder_window="full")
    settings = decoding_settings(model, processor, device)
    model.generation_config.max_length = settings.max_new_tokens  # transformers counts it in new tokens
    model.to(device)
    whisper = WhisperModel(str(export_dir), device=device, compute_type="default", cpu_threads=settings.threads)
    settings.compute_type = whisper.model.compute_type
    references = [clip.reference for clip in data]
    reference_texts, reference_seconds = timed(transformers_transcripts, model, processor, data, batch_size, device)
    padded, padded_seconds = timed(faster_whisper_transcripts, whisper, data, settings, True)
    unpadded, unpadded_seconds = timed(faster_whisper_transcripts, whisper, data, settings, False)
    sides = {
        "transformers": side_report(references, reference_texts, settings.language, reference_seconds),
        "faster_whisper": side_report(references, padded, settings.language, padded_seconds, reference_texts),
        "faster_whisper_unpadded": side_report(references, unpadded, settings.language, unpadded_seconds,
                                               reference_texts),
    }
    report = {
        "model": str(model_dir), "export": str(export_dir), "quantization": quantization,
        "split": split, "num_clips": len(data), "audio_seconds": round(sum(len(c.waveform) for c in data) / 16000, 2),
        **sides,
        "wer_difference": sides["faster_whisper"]["wer"] - sides["transformers"]["wer"],
        "cer_difference": sides["faster_whisper"]["cer"] - sides["transformers"]["cer"],
        "wer_tolerance": wer_tolerance, "settings": asdict(settings),
        "clips": [{"id": c.id, "reference": c.reference, "transformers": a, "faster_whisper": b,
                   "faster_whisper_unpadded": u} for c, a, b, u in zip(data, reference_texts, padded, unpadded)],
    }
    report["failures"] = parity_failures(report)
    write_json_atomic(Path(export_dir) / PARITY_FILE, report)
    return report


def parity_failures(report: dict) -> list[str]:
    """What parity.json shows wrong: with float32 weights any transcript that differs from the transformers
    model's; with quantized weights a WER more than `wer_tolerance` points above it."""
    fw, n = report["faster_whisper"], report["num_clips"]
    if report["quantization"] == "float32":
        if fw["identical"] == n:
            return []
        first = next(c for c in report["clips"] if c["transformers"] != c["faster_whisper"])
        return [f"the float32 export transcribes {n - fw['identical']} of {n} clips differently from the transformers "
                f"model (e.g. {first['id']}: {first['faster_whisper']!r} instead of {first['transformers']!r})"]
    if report["wer_difference"] > report["wer_tolerance"]:
        return [f"the {report['quantization']} export's WER is {fw['wer']:.2f}, {report['wer_difference']:.2f} points "
                f"above the transformers model's {report['transformers']['wer']:.2f} (tolerance "
                f"{report['wer_tolerance']:g}); export float32 or float16, or raise --wer_tolerance"]
    return []


def summary_line(report: dict) -> str:
    t, fw, raw = report["transformers"], report["faster_whisper"], report["faster_whisper_unpadded"]
    return (f"parity on {report['num_clips']} clips of {report['split']}: {fw['identical']}/{report['num_clips']} "
            f"transcripts identical; WER transformers {t['wer']:.2f}, faster-whisper {fw['wer']:.2f} "
            f"({report['wer_difference']:+.2f}); unpadded input {raw['wer']:.2f}; decode "
            f"{t['seconds']:.1f} s vs {fw['seconds']:.1f} s")
