"""What `scripts/serve.py` transcribes with: a saved model folder through the project's own decoding, or a
CTranslate2 export through faster-whisper; each returns a `Transcription` (text, and segments with times when
asked for).

The transformers backend gives the transcript `scripts/evaluate.py` gives: audio within the model's window goes
through `loop.model.decoding.decode_ids` (the saved language, task, length and beams; `temperature` > 0 samples),
longer audio through `loop.eval.long_form.transcribe_long`, the sequential long-form path the demo and
`scripts/evaluate.py --long_form` use. Segment times come from a second, timestamped decode of the same audio
(`generate(return_timestamps=True, return_segments=True)`), made only for verbose_json, srt and vtt: the text stays
the untimed transcript, the one the model was evaluated on. One decode runs at a time (the generation config is
switched per call and a second decode would only split the same cores).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loop.data.audio import SAMPLE_RATE, as_cached
from loop.eval.long_form import transcribe_long
from loop.extras import require
from loop.languages import language_code
from loop.model.decoding import decode_ids
from loop.model.encoder_window import batch_features
from loop.model.features import LogMel, pad_waveforms


@dataclass
class Segment:
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)


@dataclass
class Transcription:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)


def is_ct2_export(folder: str | Path) -> bool:
    """A CTranslate2 folder (model.bin, no transformers weights) rather than a save_pretrained model."""
    folder = Path(folder)
    return (folder / "model.bin").is_file() and not any(folder.glob("*.safetensors"))


class TransformersBackend:
    """A saved model folder, decoded as `scripts/evaluate.py` decodes it (module docstring)."""

    def __init__(self, model_dir: str | Path, assistant_model: str | Path | None = None):
        from loop.model.encoder_window import saved_encoder_window
        from loop.model.loading import load_companion, load_for_inference

        self.model, self.processor = load_for_inference(str(model_dir))
        # speculative decoding (loop.model.speculative) for greedy requests within the window
        self.assistant = assistant_model and load_companion(
            str(assistant_model), self.model, self.processor.tokenizer, "--assistant_model",
            encoder_window=saved_encoder_window(self.model)[0])
        self.log_mel = LogMel(self.processor.feature_extractor)
        self.lock = threading.Lock()
        self.language = self.model.generation_config.language
        self.window_s = float(self.processor.feature_extractor.chunk_length)

    def transcribe(self, waveform: np.ndarray, language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, timestamps: bool = False) -> Transcription:
        tokenizer, settings = self.processor.tokenizer, self.model.generation_config
        engine = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        if prompt:
            engine["prompt_ids"] = torch.as_tensor(tokenizer.get_prompt_ids(prompt))
        audio, _ = pad_waveforms([as_cached(waveform)])  # the samples evaluation decodes from its cache
        duration = len(waveform) / SAMPLE_RATE
        with self.lock:
            saved = settings.language
            settings.language = language_code(language) if language else saved
            try:
                if duration <= self.window_s:
                    features = batch_features(self.model, self.log_mel, audio)
                    assistant = None if engine else self.assistant or None  # greedy, without a prompt
                    ids = decode_ids(self.model, features, tokenizer, assistant_model=assistant, **engine)
                    text = tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
                else:
                    text = transcribe_long(self.model, self.log_mel, tokenizer, audio)
                segments = self.segments(audio, duration) if timestamps else []
                used = settings.language
            finally:
                settings.language = saved
        return Transcription(text, used, duration, segments)

    def segments(self, audio: torch.Tensor, duration: float) -> list[Segment]:
        """Timed segments of one recording (1, samples), short or long, from Whisper's timestamp tokens; times
        past the audio's end are cut to it."""
        settings, extra = self.model.generation_config, {}
        if duration <= self.window_s:  # one window, padded as evaluation pads it
            features = self.log_mel(audio)
        else:  # the whole recording, masked past its end, as `loop.eval.long_form.sequential_generate` feeds it
            frames = audio.shape[1] // self.log_mel.hop_length
            features = self.log_mel(audio, n_frames=frames, truncate=False)
            extra["attention_mask"] = torch.ones(1, features.shape[-1], dtype=torch.long)
        output = self.model.generate(input_features=features.to(self.model.dtype), language=settings.language,
                                     task=settings.task, return_timestamps=True, return_segments=True,
                                     condition_on_prev_tokens=False, **extra)
        decode = self.processor.tokenizer.decode
        return [Segment(min(float(s["start"]), duration), min(float(s["end"]), duration),
                        decode(s["tokens"], skip_special_tokens=True).strip(), [int(t) for t in s["tokens"]])
                for s in output["segments"][0]]


class FasterWhisperBackend:
    """A CTranslate2 export in faster-whisper, decoded greedily as the parity gate decodes it (no thresholds, no
    VAD, no previous-text conditioning); faster-whisper runs its own long-form loop past 30 s."""

    def __init__(self, export_dir: str | Path):
        import json

        WhisperModel = require("faster_whisper", "export", "serving a CTranslate2 export").WhisperModel
        self.model = WhisperModel(str(export_dir), device="cpu", compute_type="default")
        info = Path(export_dir) / "export.json"
        self.language = (json.loads(info.read_text(encoding="utf-8")).get("language") if info.is_file() else None)
        self.language = language_code(self.language) if self.language else None
        self.lock = threading.Lock()
        self.window_s = 30.0

    def transcribe(self, waveform: np.ndarray, language: str | None = None, prompt: str | None = None,
                   temperature: float = 0.0, timestamps: bool = False) -> Transcription:
        duration = len(waveform) / SAMPLE_RATE
        language = language_code(language) if language else self.language
        audio = np.pad(waveform, (0, max(0, int(self.window_s * SAMPLE_RATE) - len(waveform))))
        with self.lock:
            pieces, info = self.model.transcribe(
                audio, language=language, task="transcribe", beam_size=1, best_of=1, temperature=temperature,
                initial_prompt=prompt or None, without_timestamps=not timestamps, condition_on_previous_text=False,
                compression_ratio_threshold=None, log_prob_threshold=None, no_speech_threshold=None,
                vad_filter=False)
            pieces = list(pieces)
        segments = [Segment(min(p.start, duration), min(p.end, duration), p.text.strip(), list(p.tokens))
                    for p in pieces]
        return Transcription("".join(p.text for p in pieces).strip(), info.language, duration,
                             segments if timestamps else [])


def load_backend(model_dir: str | Path, assistant_model: str | Path | None = None):
    """The backend for `model_dir`: a CTranslate2 export, or any model folder the project loads (with
    `assistant_model`, a smaller model of the same tokenizer, for speculative decoding)."""
    if not is_ct2_export(model_dir):
        return TransformersBackend(model_dir, assistant_model)
    if assistant_model:
        raise ValueError(f"--assistant_model works with a model folder, and {model_dir} is a CTranslate2 export: "
                         "serve the model folder it was exported from")
    return FasterWhisperBackend(model_dir)


def clock(seconds: float, separator: str) -> str:
    """HH:MM:SS,mmm (SRT, separator ",") or HH:MM:SS.mmm (WebVTT, ".")."""
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitles(segments: list[Segment], kind: str) -> str:
    """The segments as an SRT or a WebVTT file."""
    if kind == "srt":
        blocks = [f"{i}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text}\n" for i, s in enumerate(segments, 1)]
        return "\n".join(blocks)
    return "WEBVTT\n\n" + "\n".join(f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text}\n" for s in segments)
