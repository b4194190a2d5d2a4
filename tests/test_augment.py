"""Augmentation on the fly: off is the identity, every draw comes from the generator given, speed perturbation
moves length and pitch by the factor, noise lands at the SNR asked for within a row's real length, gain within its
range, noise clips come from the folder (resampled), and the options are checked with the rest of the config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch

from loop.config import FIXED_ON_RESUME, AugmentConfig, ConfigError
from loop.config.loading import from_dict, load_config
from loop.data.augment import Augmenter, resample, speed_ratio, step_generator

RATE = 16000
WINDOW = 5 * RATE  # samples: the tiny models' 5-s window


def tone_batch(lengths: list[int], frequency: float = 1000.0, width: int | None = None):
    """(audio (rows, width), lengths (rows,)): a sine at `frequency`, amplitude 0.5, 0.25, ..., zero after each
    row's length."""
    width = width or max(lengths)
    audio = torch.zeros(len(lengths), width)
    for row, length in enumerate(lengths):
        audio[row, :length] = 0.5 ** (row + 1) * torch.sin(2 * math.pi * frequency * torch.arange(length) / RATE)
    return audio, torch.tensor(lengths)


def peak_hz(row: torch.Tensor) -> float:
    spectrum = np.abs(np.fft.rfft(row.double().numpy() * np.hanning(len(row))))
    return float(np.argmax(spectrum)) * RATE / len(row)


def power(x: torch.Tensor) -> float:
    return float(x.double().square().mean())


def test_with_every_option_off_the_batch_is_returned_as_it_is():
    audio, lengths = tone_batch([8000, 4000])
    for config in (AugmentConfig(), AugmentConfig(speed_perturbation=True, speed_factors=[1.0]),
                   AugmentConfig(gain_probability=1.0, gain_db_low=0.0, gain_db_high=0.0)):
        augmenter = Augmenter(config, max_samples=WINDOW)
        out, out_lengths = augmenter(audio, lengths, step_generator(0, 0, 0, 0))
        assert out is audio and out_lengths is lengths and not augmenter.enabled
    assert Augmenter(AugmentConfig(), WINDOW).describe() == "augmentation: off"


def everything_on(**changes) -> AugmentConfig:
    return AugmentConfig(**{"speed_perturbation": True, "noise_probability": 0.5, "gain_probability": 0.5, **changes})


def test_the_generator_alone_decides():
    audio, lengths = tone_batch([16000, 12000, 9000, 16000] * 4)
    augmenter, before = Augmenter(everything_on(), max_samples=WINDOW), audio.clone()
    torch.manual_seed(1)  # the global RNG plays no part
    first = augmenter(audio, lengths, step_generator(42, 7, 0, 0))
    torch.manual_seed(2)
    again = augmenter(audio, lengths, step_generator(42, 7, 0, 0))
    other = augmenter(audio, lengths, step_generator(42, 8, 0, 0))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert first[0].shape != other[0].shape or not torch.equal(first[0], other[0])
    assert torch.equal(audio, before)  # the inputs are not changed in place


def test_step_generator_depends_on_seed_step_micro_batch_and_process_only():
    def draws(*key):
        return torch.rand(8, generator=step_generator(*key)).tolist()

    assert draws(42, 10, 1, 0) == draws(42, 10, 1, 0)
    keys = [(42, 10, 1, 0), (43, 10, 1, 0), (42, 11, 1, 0), (42, 10, 0, 0), (42, 10, 1, 1), (43, 9, 1, 0),
            (-1, 0, 0, 0)]
    assert len({tuple(draws(*key)) for key in keys}) == len(keys)
    assert step_generator(0, 0, 0, 0, torch.device("cpu")).device.type == "cpu"


@pytest.mark.parametrize("factor", [1.1, 0.9])
def test_speed_moves_length_and_pitch_by_the_factor(factor):
    audio, lengths = tone_batch([2 * RATE, RATE], width=2 * RATE + 500)
    augmenter = Augmenter(AugmentConfig(speed_perturbation=True, speed_factors=[factor]), max_samples=WINDOW)
    out, out_lengths = augmenter(audio, lengths, step_generator(0, 0, 0, 0))
    assert out_lengths.tolist() == [math.ceil(2 * RATE / factor), math.ceil(RATE / factor)]
    assert out.shape[1] == max(2 * RATE + 500, math.ceil((2 * RATE + 500) / factor))  # padded to the longest
    for row, length in enumerate(out_lengths.tolist()):
        assert abs(peak_hz(out[row, :length]) - 1000 * factor) < 2  # FFT bins are 0.5-1 Hz wide here
        assert out[row, length:].abs().max() == 0  # padding stays exactly zero
        # the tone's level survives the resampling (away from the edges, where the filter starts and stops)
        assert abs(power(out[row, 200 : length - 200]) / power(audio[row, : lengths[row]]) - 1) < 0.01


def test_a_row_that_slowing_would_push_past_the_window_keeps_its_speed():
    audio, lengths = tone_batch([WINDOW - 1000, RATE])
    out, out_lengths = Augmenter(AugmentConfig(speed_perturbation=True, speed_factors=[0.9]), WINDOW)(
        audio, lengths, step_generator(0, 0, 0, 0))
    assert out.shape[1] == WINDOW and out_lengths.tolist() == [WINDOW - 1000, math.ceil(RATE / 0.9)]
    assert torch.equal(out[0, : WINDOW - 1000], audio[0]) and out[0, WINDOW - 1000 :].abs().max() == 0


def test_factors_are_drawn_per_row_and_resampling_is_exact():
    assert [speed_ratio(f) for f in (1.1, 0.9, 1.0, 0.937)] == [(11, 10), (9, 10), (1, 1), (89, 95)]
    audio, lengths = tone_batch([RATE] * 32)
    augmenter = Augmenter(AugmentConfig(speed_perturbation=True), WINDOW)  # 0.9, 1.0, 1.1
    _, out_lengths = augmenter(audio, lengths, step_generator(3, 0, 0, 0))
    assert set(out_lengths.tolist()) == {RATE, math.ceil(RATE / 0.9), math.ceil(RATE / 1.1)}
    # 11:10 there and 10:11 back returns the band below the cutoff: the tone comes back, not a copy of it
    there = resample(audio[:1], 11, 10)
    back = resample(there, 10, 11)[:, :RATE]
    assert there.shape[1] == math.ceil(RATE * 10 / 11)
    assert power((back - audio[:1])[:, 300:-300]) < 1e-5 * power(audio[:1])


def test_noise_lands_within_the_snr_range_inside_each_row_only():
    lengths = [16000, 9000, 4000, 12000] * 4
    audio, lengths_ = tone_batch(lengths, width=17000)
    augmenter = Augmenter(AugmentConfig(noise_probability=1.0, snr_db_low=10.0, snr_db_high=20.0), WINDOW)
    out, out_lengths = augmenter(audio, lengths_, step_generator(5, 0, 0, 0))
    assert out_lengths is lengths_
    snrs = []
    for row, length in enumerate(lengths):
        noise = out[row, :length] - audio[row, :length]
        snrs.append(10 * math.log10(power(audio[row, :length]) / power(noise)))
        assert out[row, length:].abs().max() == 0
    assert all(10 - 0.01 <= snr <= 20 + 0.01 for snr in snrs) and max(snrs) - min(snrs) > 2, snrs
    # a share of rows: the others are untouched
    half = Augmenter(AugmentConfig(noise_probability=0.5), WINDOW)
    many, many_lengths = tone_batch([4000] * 64)
    noisy = (half(many, many_lengths, step_generator(5, 0, 0, 0))[0] != many).any(dim=1).sum()
    assert 16 <= noisy <= 48


def test_gain_stays_within_its_range():
    audio, lengths = tone_batch([8000, 6000, 3000] * 8, width=9000)
    augmenter = Augmenter(AugmentConfig(gain_probability=1.0, gain_db_low=-6.0, gain_db_high=3.0), WINDOW)
    out, _ = augmenter(audio, lengths, step_generator(1, 0, 0, 0))
    gains = [10 * math.log10(power(out[row]) / power(audio[row])) for row in range(len(out))]
    assert all(-6 - 1e-3 <= g <= 3 + 1e-3 for g in gains) and max(gains) - min(gains) > 3, gains
    assert all(out[row, length:].abs().max() == 0 for row, length in enumerate(lengths.tolist()))


def test_noise_clips_come_from_the_folder_resampled_and_repeated(tmp_path):
    rng = np.random.default_rng(0)
    clips = {"a_16k.wav": (rng.normal(0, 0.1, 1500), 16000), "b_8k.wav": (rng.normal(0, 0.1, 1000), 8000)}
    for name, (samples, rate) in clips.items():
        soundfile.write(tmp_path / name, samples.astype(np.float32), rate)
    (tmp_path / "notes.txt").write_text("not audio")
    augmenter = Augmenter(AugmentConfig(noise_probability=1.0, noise_dir=str(tmp_path)), WINDOW)
    assert [len(c) for c in augmenter.noise_clips] == [1500, 2000]  # the 8-kHz clip at 16 kHz
    assert "2 clips from" in augmenter.describe()
    audio, lengths = tone_batch([6000] * 16)
    out, _ = augmenter(audio, lengths, step_generator(0, 0, 0, 0))
    used = set()
    for row in range(len(out)):
        added = (out[row] - audio[row]).double().numpy()
        added /= np.sqrt(np.mean(added**2))  # rows differ in level (tone_batch halves it row by row)
        # an excerpt shorter than the row repeats: the added noise has the period of the clip it came from
        (clip,) = [c for c, n in enumerate((1500, 2000)) if np.allclose(added[n:], added[:-n], atol=1e-3)]
        source = augmenter.noise_clips[clip].double().numpy()
        period = added[: len(source)]  # one period holds every sample of the clip once, scaled
        scale = np.sqrt(np.mean(period**2) / np.mean(source**2))
        assert np.allclose(np.sort(period / scale), np.sort(source), atol=1e-3 * source.std())
        used.add(clip)
    assert used == {0, 1}


def test_a_bad_noise_folder_is_named_when_the_augmenter_is_built(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no clips here")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "hum.wav").write_bytes(b"RIFF not really a wav")
    for folder, says in ((tmp_path / "missing", "is not a folder"), (tmp_path / "empty", "holds no audio files"),
                         (tmp_path / "broken", "hum.wav: cannot decode")):
        with pytest.raises(ConfigError) as caught:
            Augmenter(AugmentConfig(noise_probability=0.3, noise_dir=str(folder)), WINDOW)
        assert f"augment.noise_dir {str(folder)!r}" in str(caught.value) and says in str(caught.value)


def test_augment_options_are_parsed_and_checked_with_the_rest():
    config = load_config("quickstart", ["--augment.speed_perturbation", "--augment.speed_factors=0.95,1,1.05",
                                        "--augment.noise_probability=1"])
    assert config.augment.speed_factors == [0.95, 1.0, 1.05] and config.augment.noise_probability == 1.0
    assert from_dict({"augment": {"speed_factors": [0.9, 1.1]}}).augment.speed_factors == [0.9, 1.1]
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["--augment.speed_factors=0.9,fast,3", "--augment.snr_db_low=40",
                                   "--augment.gain_db_high=-9", "--augment.noise_dir=/no/such/noise"])
    assert sorted(caught.value.problems) == [
        "augment.gain_db_low (-6) must not be above augment.gain_db_high (-9)",
        "augment.noise_dir '/no/such/noise' is not a folder",
        "augment.snr_db_low (40) must not be above augment.snr_db_high (30)",
        "command line: augment.speed_factors[1]: expected a number, got 'fast'",
    ]
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["--augment.speed_factors=0.9,3", "--augment.speed_perturbation",
                                   "--augment.noise_probability=1.5"])
    assert sorted(caught.value.problems) == ["augment.noise_probability must be in [0, 1], got 1.5",
                                             "augment.speed_factors must be in [0.5, 2], got 3.0"]
    assert {"augment.speed_factors", "augment.noise_dir"} <= FIXED_ON_RESUME  # a resume augments as before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_it_stays_there_repeats_itself_and_resamples_as_on_the_cpu():
    audio, lengths = tone_batch([16000, 12000, 9000, 16000] * 4)
    augmenter = Augmenter(everything_on(), WINDOW)
    first = augmenter(audio.cuda(), lengths.cuda(), step_generator(42, 7, 0, 0, "cuda"))
    again = augmenter(audio.cuda(), lengths.cuda(), step_generator(42, 7, 0, 0, "cuda"))
    assert first[0].device.type == "cuda" and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    on_cpu, on_gpu = resample(audio, 11, 10), resample(audio.cuda(), 11, 10).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-5)
