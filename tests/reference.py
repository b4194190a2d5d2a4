"""Small helpers that only tests need: readings of audio, features, languages and predictions that the package
itself never takes, written here so the package holds only what a run uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loop.data.audio import SAMPLE_RATE
from loop.eval.language_id import detect_language_ids, language_token_ids
from loop.model.features import LogMel, pad_waveforms


def duration_seconds(waveform: np.ndarray, sampling_rate: int = SAMPLE_RATE) -> float:
    return len(waveform) / sampling_rate


def log_mel_features(waveforms: list[np.ndarray], feature_extractor) -> np.ndarray:
    """Waveforms (num_samples,) on the host -> (batch, n_mels, window frames) float32 NumPy features, through
    `LogMel` on the CPU; for tests that hold NumPy audio."""
    if not waveforms:
        return np.zeros((0, feature_extractor.feature_size, feature_extractor.nb_max_frames), dtype=np.float32)
    audio, _ = pad_waveforms(waveforms)
    return LogMel(feature_extractor)(audio).numpy()


def detect_languages(model, encoder_outputs) -> list[str]:
    """The language code Whisper predicts for each row of `encoder_outputs`."""
    id_to_code = {token_id: code for code, token_id in language_token_ids(model.generation_config).items()}
    return [id_to_code[token_id] for token_id in detect_language_ids(model, encoder_outputs).tolist()]


def read_predictions_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
