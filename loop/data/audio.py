"""Audio decoding: any file soundfile reads (MP3, WAV, FLAC, OGG) -> mono float32 at 16 kHz.

soundfile's wheels carry libsndfile with MP3 support and soxr resamples, so no FFmpeg or torchcodec is needed.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile
import soxr

SAMPLE_RATE = 16000  # Hz, what every Whisper feature extractor expects


class AudioError(ValueError):
    """A clip that cannot be used; `reason` is a short key for skip counts (`missing_clip`, `empty_audio`, ...)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


def decode_audio(source: str | Path | bytes, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reads a path or encoded bytes; returns a float32 mono waveform of shape (num_samples,) at `sampling_rate`."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)):
        path = Path(source)
        if not path.is_file():
            raise AudioError("missing_clip", f"{name}: audio file not found")
        if path.stat().st_size == 0:
            raise AudioError("empty_audio", f"{name}: file is empty (0 bytes)")
    elif len(source) == 0:
        raise AudioError("empty_audio", "audio bytes are empty")
    try:
        handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        waveform, native_rate = soundfile.read(handle, dtype="float32", always_2d=True)
    except Exception as error:  # libsndfile reports corrupt data with several exception types
        # libsndfile says "File does not exist or is not a regular file" for bytes it cannot parse: say what it means.
        raise AudioError(
            "unreadable_audio", f"{name}: cannot decode audio (corrupt, or not a format libsndfile reads): {error}"
        ) from error
    if waveform.shape[0] == 0:
        raise AudioError("empty_audio", f"{name}: audio has no samples")
    try:
        waveform = to_mono_16k(waveform, native_rate, sampling_rate)
    except AudioError as error:
        raise AudioError(error.reason, f"{name}: {error}") from error
    if waveform.shape[0] == 0:  # a clip of a few samples at 48 kHz can resample to none at 16 kHz
        raise AudioError("empty_audio", f"{name}: audio has no samples at {sampling_rate} Hz")
    return waveform


def to_mono_16k(waveform: np.ndarray, native_rate: int, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(num_samples,) or (num_samples, channels) at `native_rate` -> float32 mono (num_samples',) at `sampling_rate`."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim == 2:
        waveform = waveform.mean(axis=1)
    if native_rate != sampling_rate:
        waveform = soxr.resample(waveform, native_rate, sampling_rate, quality="HQ")
    if not np.isfinite(waveform).all():
        raise AudioError("unreadable_audio", "audio contains NaN or infinite samples")
    return np.ascontiguousarray(waveform, dtype=np.float32)


INT16_FULL_SCALE = 32767  # the largest int16 value: a quantized clip's peak


def quantize(waveform: np.ndarray) -> tuple[np.ndarray, float]:
    """float32 samples -> (int16 samples, scale) with `int16 * scale` within scale / 2 of each sample.

    The prepared cache stores audio this way: 2 bytes a sample (32 kB per second at 16 kHz), half of float16's
    cost would not buy more, and float16's 11-bit mantissa is coarser than int16 for all but the quietest samples.
    The scale is the clip's own peak / 32767, so a quiet clip keeps the full 16 bits of resolution (96 dB below
    its peak, below the 80 dB range the log-mel features keep under their peak)."""
    waveform = np.asarray(waveform, dtype=np.float32).reshape(-1)
    peak = float(np.abs(waveform).max()) if len(waveform) else 0.0
    scale = (peak or 1.0) / INT16_FULL_SCALE
    return np.round(waveform / scale).astype(np.int16), scale


def dequantize(samples: np.ndarray, scale: float) -> np.ndarray:
    """`quantize`'s inverse: float32 samples."""
    return np.asarray(samples, dtype=np.float32) * np.float32(scale)


def as_cached(waveform: np.ndarray) -> np.ndarray:
    """The waveform as the prepared cache gives it back (`dequantize(*quantize(waveform))`): what the demo decodes,
    so a file gets the very features, and the transcript, that `scripts/evaluate.py` gets for it."""
    return dequantize(*quantize(waveform))
