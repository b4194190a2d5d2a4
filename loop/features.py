"""Whisper log-mel features without transforming the silence that pads every clip to the model's window.

`WhisperFeatureExtractor` pads each clip with zeros to `chunk_length` seconds (30 s) and runs the STFT over the
whole window, although a frame whose window holds only padding has zero power: its value is the floor
log10(1e-10) = -10 before the clamp to (clip maximum - 8). For a 3-s clip that is 90% of the work. Here the same
torch STFT runs over the audio plus one window of padding, and the remaining frames get the floor, so the result
equals the feature extractor's (tests/test_features.py checks both against its NumPy path to 1e-4).
"""

from __future__ import annotations

import numpy as np
import torch

LOG_POWER_FLOOR = -10.0  # log10 of the 1e-10 power floor of the feature extractor, the value of a silent frame


def log_mel_features(waveforms: list[np.ndarray], feature_extractor) -> np.ndarray:
    """Mono waveforms (num_samples,) at the extractor's rate -> (batch, n_mels, n_frames) float32, the same values
    as `feature_extractor(waveforms, sampling_rate=..., return_tensors="np").input_features`."""
    fe = feature_extractor
    if fe.dither != 0.0:  # dither puts noise into the padding too: no frame is silent
        return fe(waveforms, sampling_rate=fe.sampling_rate, return_tensors="np").input_features
    n_samples, hop, n_fft, n_frames = fe.n_samples, fe.hop_length, fe.n_fft, fe.nb_max_frames
    clips = [np.asarray(w, dtype=np.float32).reshape(-1)[:n_samples] for w in waveforms]  # longer ones are cut, as there
    if not clips:
        return np.zeros((0, fe.feature_size, n_frames), dtype=np.float32)
    audible = max((_length_without_trailing_zeros(c) for c in clips), default=0)
    # Frame t covers samples [t*hop - n_fft/2, t*hop + n_fft/2). With `width` samples, frames up to `computed` lie
    # inside them, and every later frame starts at or after `audible`: it sees zeros only.
    width = min(n_samples, audible + n_fft + hop)
    computed = n_frames if width == n_samples else (width - n_fft // 2) // hop + 1
    batch = np.zeros((len(clips), width), dtype=np.float32)
    for row, clip in enumerate(clips):
        batch[row, : min(len(clip), width)] = clip[:width]
    waveform = torch.from_numpy(batch)
    stft = torch.stft(waveform, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True)
    power = (stft[..., :computed].abs() ** 2).contiguous()
    mel = torch.from_numpy(fe.mel_filters).to(torch.float32).T @ power  # (batch, n_mels, computed)
    log_spec = torch.full((len(clips), mel.shape[1], n_frames), LOG_POWER_FLOOR, dtype=torch.float32)
    log_spec[..., :computed] = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)  # per clip, as the extractor's batched path does
    log_spec = (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0
    return log_spec.numpy()


def _length_without_trailing_zeros(clip: np.ndarray) -> int:
    nonzero = np.flatnonzero(clip)
    return int(nonzero[-1]) + 1 if len(nonzero) else 0
