"""Augmentation of a batch of waveforms on the fly, on the device the batch is on: speed perturbation, additive
noise at a signal-to-noise ratio, gain (in that order). SpecAugment is the model's own (`model.apply_spec_augment`).

Every random draw comes from the `torch.Generator` passed in, never from the global RNG: `step_generator` seeds
one from the run's seed, the optimizer step, the micro-batch and the process, so a resumed run augments step N
exactly as the uninterrupted run did. CPU and CUDA generators give different streams: a resume is bit-exact on
the same kind of device.

Speed perturbation is resampling, as sox's `speed` effect is: a row played at factor f is the row read as if it
were sampled at f x 16 kHz and resampled to 16 kHz, so 1.1 makes it 10% shorter and every frequency 10% higher.
The resampler is windowed-sinc polyphase (the Hann-windowed kernel of `torchaudio.functional.resample`, written
here in torch so that nothing more is needed): the factor is a ratio of small integers `orig:new` (1.1 is
11:10), and each frame of `orig` input samples gives `new` output samples by one matrix product. Unlike linear
interpolation it low-passes below the lower Nyquist frequency, so speeding up does not fold the top of the band
into the highest mel bins, and the ratio is exact, so a 30-s row does not drift. Which row drew which factor is
known on the device only; rather than wait for it (a host-device sync per micro-batch), every factor other than
1 resamples the whole batch and each row keeps its own: two passes for 0.9/1.0/1.1, milliseconds on a GPU.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import torch
from torch import Tensor

from loop.config import AugmentConfig, ConfigError, resolve_path
from loop.data.audio import SAMPLE_RATE, AudioError, decode_audio

SINC_ZERO_CROSSINGS = 6  # lobes of the sinc on each side of an output sample (torchaudio's lowpass_filter_width)
ROLLOFF = 0.99  # cutoff as a share of the lower Nyquist frequency: room for the window's transition band
MAX_RATIO_DENOMINATOR = 100  # a factor becomes orig:new with new <= 100 (0.937 -> 89:95), keeping kernels small
NOISE_POWER_FLOOR = 1e-10  # mean power below this (-100 dB) is silence: no scale can make it a given SNR
NOISE_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")  # what `noise_dir` is searched for


def step_generator(seed: int, step: int, micro_batch: int, process_index: int, device="cpu") -> torch.Generator:
    """A generator on `device` whose draws depend on these four numbers only. They are hashed, not added: seed 1
    at step 2 must not augment as seed 2 at step 1 does."""
    key = f"augment/{seed}/{step}/{micro_batch}/{process_index}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little"))


def speed_ratio(factor: float) -> tuple[int, int]:
    """A speed factor as `(orig, new)`, small integers with orig / new close to `factor`: 1.1 -> (11, 10)."""
    ratio = Fraction(factor).limit_denominator(MAX_RATIO_DENOMINATOR)
    return ratio.numerator, ratio.denominator


def sinc_kernel(orig: int, new: int) -> Tensor:
    """(taps, new) float64 filters; column p gives output sample p of a frame from the frame's `orig` input
    samples and `width` more on each side (taps = orig + 2 * width).

    With `orig` input and `new` output samples per unit of time, output p of frame k lies at time k + p/new and
    input m at k + m/orig. The band below `base / 2` (base = min(orig, new) x ROLLOFF cycles per unit) passes:
    h(t) = (base / orig) sinc(base t), Hann-windowed to SINC_ZERO_CROSSINGS lobes, the factor giving unit gain."""
    base = min(orig, new) * ROLLOFF
    width = math.ceil(SINC_ZERO_CROSSINGS * orig / base)
    inputs = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = (inputs[:, None] - torch.arange(new, dtype=torch.float64)[None, :] / new) * base
    t = t.clamp(-SINC_ZERO_CROSSINGS, SINC_ZERO_CROSSINGS)
    window = torch.cos(t * math.pi / SINC_ZERO_CROSSINGS / 2) ** 2
    return torch.sinc(t) * window * (base / orig)


def resample(audio: Tensor, orig: int, new: int, kernel: Tensor | None = None) -> Tensor:
    """(batch, samples) -> (batch, ceil(samples * new / orig)): each row read at `orig` and written at `new`
    samples per unit of time. Zeros after a row's end stay about zero (the filter rings a few samples into them)."""
    kernel = sinc_kernel(orig, new).to(audio) if kernel is None else kernel
    width = (kernel.shape[0] - orig) // 2
    frames = torch.nn.functional.pad(audio, (width, width + orig)).unfold(-1, kernel.shape[0], orig)
    # A matrix product rather than conv1d: cuBLAS picks the same algorithm in every process, where cuDNN under
    # `benchmark` may not, and a resumed run must see the same floats.
    out = (frames @ kernel).reshape(audio.shape[0], -1)
    return out[:, : -(-audio.shape[1] * new // orig)]


def load_noise_clips(folder: str, sampling_rate: int = SAMPLE_RATE, option: str = "augment.noise_dir") -> list[Tensor]:
    """Every audio file below `folder`, in path order, as float32 mono at `sampling_rate`; a missing or empty
    folder, or a clip that cannot be decoded, is a ConfigError naming it (as the `option` that gave it)."""
    root = resolve_path(folder)
    if not root.is_dir():
        raise ConfigError([f"{option} {folder!r} is not a folder"])
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in NOISE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError([f"{option} {folder!r} holds no audio files ({', '.join(NOISE_SUFFIXES)})"])
    clips = []
    for path in files:
        try:
            clips.append(torch.from_numpy(decode_audio(path, sampling_rate)))
        except AudioError as error:
            raise ConfigError([f"{option} {folder!r}: {error}"]) from error
    return clips


class Augmenter:
    """`augmenter(audio, lengths, generator)` on a padded batch; built once per run, before training starts, so
    that a bad `noise_dir` stops the run at once.

    `max_samples` is the model's window (the feature extractor's `n_samples`): a row that slowing would make
    longer keeps its speed instead of being cut, since cutting would drop words its transcript still holds."""

    def __init__(self, config: AugmentConfig, max_samples: int, sampling_rate: int = SAMPLE_RATE):
        self.config, self.max_samples = config, max_samples
        ratios = [speed_ratio(f) for f in config.speed_factors] if config.speed_perturbation else []
        self.speed_ratios = ratios if any(orig != new for orig, new in ratios) else []
        self.noise = config.noise_probability > 0
        self.gain = config.gain_probability > 0 and (config.gain_db_low, config.gain_db_high) != (0, 0)
        self.noise_clips = load_noise_clips(config.noise_dir, sampling_rate) if self.noise and config.noise_dir else []
        self._on_device: dict = {}  # (what, device) -> tensor: kernels and the noise bank, moved once

    @property
    def enabled(self) -> bool:
        return bool(self.speed_ratios) or self.noise or self.gain

    def describe(self) -> str:
        """One line for the run's log."""
        c, parts = self.config, []
        if self.speed_ratios:
            parts.append("speed " + "/".join(f"{f:g}" for f in c.speed_factors))
        if self.noise:
            source = f"{len(self.noise_clips)} clips from {c.noise_dir}" if self.noise_clips else "white"
            parts.append(f"noise ({source}) on {c.noise_probability:.0%} of rows at "
                         f"{c.snr_db_low:g}-{c.snr_db_high:g} dB SNR")
        if self.gain:
            parts.append(f"gain on {c.gain_probability:.0%} of rows in {c.gain_db_low:g}..{c.gain_db_high:g} dB")
        return "augmentation: " + (", ".join(parts) if parts else "off")

    def __call__(self, audio: Tensor, lengths: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """audio (batch, samples) float, zero after each row's `lengths` (batch,) int64 -> the same for the
        augmented rows, padded with zeros to the longest row that can come out (at most `max_samples` unless the
        input is wider). With every option off, the inputs themselves are returned."""
        if not self.enabled:
            return audio, lengths
        if not audio.is_floating_point() or audio.dim() != 2:
            raise TypeError(f"augmentation needs float audio of shape (batch, samples), got {audio.dtype} "
                            f"{tuple(audio.shape)}")
        with torch.autocast(audio.device.type, enabled=False):  # float32 throughout, even in a mixed-precision step
            if self.speed_ratios:
                audio, lengths = self._speed(audio, lengths, generator)
            if self.noise:
                audio = self._add_noise(audio, lengths, generator)
            if self.gain:
                audio = self._apply_gain(audio, generator)
        return audio, lengths

    def _speed(self, audio: Tensor, lengths: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        rows, samples = audio.shape
        choice = torch.randint(len(self.speed_ratios), (rows,), generator=generator, device=audio.device)
        longest = max(-(-samples * new // orig) for orig, new in self.speed_ratios)
        width = max(samples, min(self.max_samples, longest))
        out, out_lengths = torch.nn.functional.pad(audio, (0, width - samples)), lengths
        for index, (orig, new) in enumerate(self.speed_ratios):
            if orig == new:
                continue
            new_lengths = (lengths * new + orig - 1) // orig  # ceil, as `resample` counts
            take = (choice == index) & (new_lengths <= self.max_samples)
            resampled = resample(audio, orig, new, self._kernel(orig, new, audio))[:, :width]
            resampled = torch.nn.functional.pad(resampled, (0, width - resampled.shape[1]))
            out = torch.where(take[:, None], resampled, out)
            out_lengths = torch.where(take, new_lengths, out_lengths)
        # The filter rings a few samples past a row's new end: the padding must stay exactly zero.
        return torch.where(self._inside(out_lengths, width), out, 0.0), out_lengths

    def _add_noise(self, audio: Tensor, lengths: Tensor, generator: torch.Generator) -> Tensor:
        c, (rows, samples), device = self.config, audio.shape, audio.device
        noised = torch.rand(rows, generator=generator, device=device) < c.noise_probability
        snr_db = c.snr_db_low + (c.snr_db_high - c.snr_db_low) * torch.rand(rows, generator=generator, device=device)
        if self.noise_clips:
            noise = self._clip_excerpts(rows, samples, generator, device).to(audio.dtype)
        else:
            noise = torch.randn(rows, samples, generator=generator, device=device, dtype=audio.dtype)
        inside = self._inside(lengths, samples)
        noise = torch.where(inside, noise, 0.0)
        # Mean powers over each row's real length, where the noise goes: the padding is neither speech nor noise.
        count = lengths.clamp_min(1).to(audio.dtype)
        speech_power = torch.where(inside, audio, 0.0).square().sum(1) / count
        noise_power = (noise.square().sum(1) / count).clamp_min(NOISE_POWER_FLOOR)
        scale = torch.sqrt(speech_power / (noise_power * 10 ** (snr_db / 10))) * noised
        return audio + scale[:, None] * noise

    def _clip_excerpts(self, rows: int, samples: int, generator: torch.Generator, device) -> Tensor:
        """(rows, samples): for each row a random clip from a random offset, repeated from its start where it
        is shorter than the row. The clips lie end to end in one tensor on the device, so this is one gather."""
        key = ("noise", str(device))
        if key not in self._on_device:
            sizes = torch.tensor([len(clip) for clip in self.noise_clips])
            starts = torch.cumsum(sizes, 0) - sizes
            self._on_device[key] = (torch.cat(self.noise_clips).to(device), starts.to(device), sizes.to(device))
        bank, starts, sizes = self._on_device[key]
        clip = torch.randint(len(self.noise_clips), (rows,), generator=generator, device=device)
        offset = (torch.rand(rows, generator=generator, device=device, dtype=torch.float64) * sizes[clip]).long()
        position = (offset[:, None] + torch.arange(samples, device=device)) % sizes[clip, None]
        return bank[starts[clip, None] + position]

    def _apply_gain(self, audio: Tensor, generator: torch.Generator) -> Tensor:
        c, rows, device = self.config, audio.shape[0], audio.device
        changed = torch.rand(rows, generator=generator, device=device) < c.gain_probability
        gain_db = c.gain_db_low + (c.gain_db_high - c.gain_db_low) * torch.rand(rows, generator=generator,
                                                                                device=device)
        return audio * torch.where(changed, 10 ** (gain_db / 20), 1.0).to(audio.dtype)[:, None]

    def _kernel(self, orig: int, new: int, like: Tensor) -> Tensor:
        key = ((orig, new), str(like.device), like.dtype)
        if key not in self._on_device:
            self._on_device[key] = sinc_kernel(orig, new).to(like)
        return self._on_device[key]

    @staticmethod
    def _inside(lengths: Tensor, width: int) -> Tensor:
        """(batch, width) bool: True within each row's real length."""
        return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
