"""Whisper log-mel features from a batch of waveforms, on whatever device the waveforms are: the one feature
function of training, in-loop evaluation, `scripts/evaluate.py` and the demo.

`WhisperFeatureExtractor` pads each clip with zeros to `chunk_length` seconds (30 s) and runs the STFT over the
whole window, although a frame whose window holds only padding has zero power: its value is the floor
log10(1e-10) = -10 before the clamp to (clip maximum - 8). For a 3-s clip that is 90% of the work. Here the same
torch STFT runs over the batch's audio plus one window of padding, and the remaining frames get the floor, so the
result equals the feature extractor's (tests/test_features.py checks it against its NumPy path to 1e-4, at 80 and
128 mel bins, for clips shorter than, as long as and longer than the window).

Frame t covers samples [t*hop - n_fft/2, t*hop + n_fft/2) (centred, reflect-padded STFT). With `width` samples
computed, frames up to `computed` lie inside them, and every later frame starts at or after the audio's end: it
sees zeros only. A batch's audio comes padded with zeros to its longest row, so its width bounds every row's audio
without reading the lengths back from the device (no host-device sync).
"""

from __future__ import annotations

import numpy as np
import torch

LOG_POWER_FLOOR = -10.0  # log10 of the 1e-10 power floor of the feature extractor, the value of a silent frame


class LogMel(torch.nn.Module):
    """(batch, samples) float waveforms at the extractor's rate -> (batch, n_mels, n_frames) float32 log-mel
    features, the values of `feature_extractor(..., return_tensors="np").input_features` for each row.

    Move it to the accelerator with `.to(device)` (its mel filters and window are buffers); it always computes in
    float32, also under autocast.
    """

    def __init__(self, feature_extractor):
        super().__init__()
        fe = feature_extractor
        if fe.dither != 0.0:  # dither puts noise into the padding too: no frame is silent, nothing to skip
            raise ValueError(f"feature extractor dither={fe.dither}: only dither 0 (Whisper's) is supported")
        self.n_fft, self.hop_length = fe.n_fft, fe.hop_length
        self.window_frames = fe.nb_max_frames  # 3000 frames in a 30-s window
        self.n_mels, self.sampling_rate = fe.feature_size, fe.sampling_rate
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)).T,
                             persistent=False)  # (n_mels, n_fft // 2 + 1)
        self.register_buffer("window", torch.hann_window(fe.n_fft), persistent=False)

    def forward(self, audio: torch.Tensor, n_frames: int | None = None, truncate: bool = True) -> torch.Tensor:
        """`audio` (batch, samples), each row zero-padded after its clip -> (batch, n_mels, n_frames).

        `n_frames` defaults to the model's window. Fewer (a dynamic window cut to the batch's longest clip) gives
        the first `n_frames` frames of the full window's features, the per-clip peak included. As the extractor,
        audio past the window is cut, unless `truncate=False` (long-form audio: then `n_frames` should be
        samples // hop, the extractor's `truncation=False` frames)."""
        n_frames = n_frames or self.window_frames
        if truncate:
            window_samples = self.window_frames * self.hop_length
            audio = audio[:, :window_samples]
            audible = audio.shape[1]
            width = min(window_samples, audible + self.n_fft + self.hop_length)
            computed = self.window_frames if width == window_samples else (width - self.n_fft // 2) // self.hop_length + 1
        else:
            audible = width = audio.shape[1]
            computed = min(n_frames, width // self.hop_length + 1)
        audio = torch.nn.functional.pad(audio.float(), (0, width - audible))
        batch, frames = audio.shape[0], max(n_frames, computed)
        with torch.autocast(audio.device.type, enabled=False):
            stft = torch.stft(audio, self.n_fft, self.hop_length, window=self.window, return_complex=True)
            mel = self.mel_filters @ (stft[..., :computed].abs() ** 2)  # (batch, n_mels, computed)
            log_spec = torch.full((batch, self.n_mels, frames), LOG_POWER_FLOOR, dtype=torch.float32,
                                  device=audio.device)
            log_spec[..., :computed] = torch.clamp(mel, min=1e-10).log10()
            # Per clip over every computed frame, as the extractor's batched path does, before any cut.
            peak = log_spec.amax(dim=(1, 2), keepdim=True)
            return ((torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0)[..., :n_frames]


def pad_waveforms(waveforms: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mono waveforms -> (batch, longest) float32 zero-padded, and their lengths (batch,) in samples."""
    lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.long)
    audio = torch.zeros((len(waveforms), int(lengths.max()) if len(waveforms) else 0), dtype=torch.float32)
    for row, waveform in enumerate(waveforms):
        audio[row, : len(waveform)] = torch.from_numpy(np.asarray(waveform, dtype=np.float32).reshape(-1))
    return audio, lengths
