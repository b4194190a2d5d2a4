"""Audio decoding: formats, resampling to 16 kHz, downmixing, and the reasons bad clips are refused with."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from loop.data.audio import SAMPLE_RATE, AudioError, decode_audio, to_mono_16k
from tests.reference import duration_seconds


def tone(seconds: float, rate: int, frequency: float = 1000.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def peak_hz(waveform: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.argmax(spectrum) * rate / len(waveform))


@pytest.mark.parametrize("rate", [48000, 44100, 8000])
def test_resampling_keeps_a_1khz_tone_at_1khz_and_its_duration(tmp_path, rate):
    path = tmp_path / f"tone-{rate}.wav"
    soundfile.write(path, tone(2.0, rate), rate, subtype="FLOAT")
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(duration_seconds(audio) - 2.0) <= 0.001
    assert abs(peak_hz(audio) - 1000.0) <= 0.5  # FFT bins are 0.5 Hz wide for 2 s
    # the level survives too: no clipping, no halving (RMS of a 0.5 sine is 0.354)
    assert abs(np.sqrt(np.mean(audio[1000:-1000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01


def test_stereo_is_downmixed_by_averaging_the_channels(tmp_path):
    left = tone(1.0, 16000, frequency=1000.0)
    right = tone(1.0, 16000, frequency=3000.0)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    audio = decode_audio(tmp_path / "stereo.wav")
    assert audio.shape == (16000,)
    np.testing.assert_allclose(audio, (left + right) / 2, atol=1e-6)  # both channels, half each
    # the same through the in-memory path that Hub datasets use
    np.testing.assert_allclose(to_mono_16k(np.stack([left, right], axis=1), 16000), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("suffix", ["wav", "flac", "ogg", "mp3"])
def test_mp3_wav_flac_and_ogg_decode(tmp_path, suffix):
    path = tmp_path / f"tone.{suffix}"
    soundfile.write(path, tone(1.0, 48000), 48000)
    audio = decode_audio(path)
    # MP3 encoders pad the start and end; the others give exactly 1 s
    assert abs(len(audio) - SAMPLE_RATE) <= (0.05 * SAMPLE_RATE if suffix == "mp3" else 1)
    assert abs(peak_hz(audio) - 1000.0) <= 1.0
    assert 0.3 < np.sqrt(np.mean(audio**2)) < 0.4
    np.testing.assert_array_equal(decode_audio(path.read_bytes()), audio)  # encoded bytes decode the same


def test_a_shipped_clip_decodes_to_its_listed_duration(corpus_dir):
    listed = dict(line.split("\t") for line in (corpus_dir / "clip_durations.tsv").read_text().splitlines()[1:])
    clip = "common_voice_hi_10102615.mp3"
    audio = decode_audio(corpus_dir / "clips" / clip)
    assert abs(duration_seconds(audio) * 1000 - int(listed[clip])) <= 1


def test_bad_clips_are_refused_with_a_reason_and_the_file_name(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "garbage.mp3").write_bytes(np.random.default_rng(0).bytes(4000))
    soundfile.write(tmp_path / "one-sample.wav", np.zeros(1, dtype=np.float32), 48000)  # 0 samples at 16 kHz
    soundfile.write(tmp_path / "nan.wav", np.full(800, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    cases = {
        tmp_path / "nowhere.wav": ("missing_clip", "nowhere.wav: audio file not found"),
        tmp_path: ("missing_clip", "audio file not found"),  # a folder is not a clip
        tmp_path / "empty.wav": ("empty_audio", "empty.wav: file is empty (0 bytes)"),
        tmp_path / "garbage.mp3": ("unreadable_audio", "garbage.mp3: cannot decode audio (corrupt, or not a format"),
        tmp_path / "one-sample.wav": ("empty_audio", "one-sample.wav: audio has no samples at 16000 Hz"),
        tmp_path / "nan.wav": ("unreadable_audio", "nan.wav: audio contains NaN or infinite samples"),
        b"": ("empty_audio", "audio bytes are empty"),
        b"not audio at all": ("unreadable_audio", "<bytes>: cannot decode audio"),
    }
    for source, (reason, message) in cases.items():
        with pytest.raises(AudioError) as caught:
            decode_audio(source)
        assert (caught.value.reason, message in str(caught.value)) == (reason, True), (source, str(caught.value))


def test_a_truncated_mp3_decodes_to_a_shorter_clip(tmp_path, corpus_dir):
    """libsndfile (mpg123) decodes the MP3 frames that are complete and stops: a cut-off download is not an error,
    it is a shorter clip. Only a file too short to hold one frame is unreadable."""
    encoded = (corpus_dir / "clips" / "common_voice_hi_10102615.mp3").read_bytes()
    full = decode_audio(encoded)
    (tmp_path / "half.mp3").write_bytes(encoded[: len(encoded) // 2])
    half = decode_audio(tmp_path / "half.mp3")
    assert 0.4 * len(full) < len(half) < 0.6 * len(full)
    np.testing.assert_allclose(half[: len(half) // 2], full[: len(half) // 2], atol=1e-4)  # the same audio, cut
    (tmp_path / "stub.mp3").write_bytes(encoded[:40])
    with pytest.raises(AudioError) as caught:
        decode_audio(tmp_path / "stub.mp3")
    assert caught.value.reason == "unreadable_audio"
