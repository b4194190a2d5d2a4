"""Feature parity: the log-mel paths the loop takes equal the feature extractor's NumPy path (the reference the
blog's recipe runs where torch is absent, benchmarks/reference_recipe.py) to 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from benchmarks.reference_recipe import numpy_path_feature_extractor
from loop.data.audio import SAMPLE_RATE, decode_audio, dequantize, quantize
from loop.model.features import LogMel, pad_waveforms
from tests.helpers import corpus_rows
from tests.reference import log_mel_features


@pytest.fixture(scope="module")
def waveforms():
    """Six shipped clips, plus edge cases: silence, a clip with trailing zeros, one longer than a 5-s window."""
    clips = [decode_audio(row["audio_path"]) for row in corpus_rows("train")[:6]]
    silent = np.zeros(SAMPLE_RATE, dtype=np.float32)
    padded = np.concatenate([clips[0], np.zeros(SAMPLE_RATE // 2, dtype=np.float32)])
    long = np.concatenate(clips[1:4])
    assert len(long) > 5 * SAMPLE_RATE
    return [*clips, silent, padded, long]


def numpy_path(feature_extractor, waveforms):
    """The reference: the feature extractor's NumPy STFT, one clip per call."""
    extractor = numpy_path_feature_extractor(feature_extractor)
    return np.concatenate([extractor(w, sampling_rate=SAMPLE_RATE).input_features for w in waveforms])


@pytest.mark.parametrize("chunk_length", [30, 5])
def test_batched_torch_features_match_the_numpy_path(waveforms, chunk_length):
    """The feature extractor's own batched torch STFT equals the one-clip NumPy path to 1e-4."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_length)
    expected = numpy_path(fe, waveforms)
    batched = fe(waveforms, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    assert batched.shape == expected.shape == (len(waveforms), 80, chunk_length * 100)
    np.testing.assert_allclose(batched, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_length", [30, 5])
def test_trimmed_stft_features_match_the_numpy_path(waveforms, chunk_length):
    """loop.model.features.log_mel_features (LogMel on host audio, as the loop computes it per batch) skips the
    padding's STFT and still gives the same features, batched or not."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_length)
    expected = numpy_path(fe, waveforms)
    np.testing.assert_allclose(log_mel_features(waveforms, fe), expected, atol=1e-4, rtol=0)
    one_by_one = np.concatenate([log_mel_features([w], fe) for w in waveforms])
    np.testing.assert_allclose(one_by_one, expected, atol=1e-4, rtol=0)


def window_edge_cases(waveforms, chunk_length):
    """Clips shorter than the window, exactly as long, and longer, plus silence."""
    n_samples = chunk_length * SAMPLE_RATE
    joined = np.concatenate(waveforms * (1 + n_samples // sum(len(w) for w in waveforms)))
    return [*waveforms[:6], waveforms[6], joined[:n_samples], joined[: n_samples + 1234], joined[: n_samples - 100]]


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("chunk_length", [30, 5])
def test_log_mel_on_padded_batches_matches_the_numpy_path(waveforms, n_mels, chunk_length):
    """`LogMel` on one zero-padded batch (what the collator hands the step) equals the extractor's one-clip NumPy
    path for 80 and 128 mel bins (v3 and turbo take 128), for clips shorter than, as long as and longer than the
    window; and each row alone gives its batched values."""
    fe = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_length)
    clips = window_edge_cases(waveforms, chunk_length)
    expected = numpy_path(fe, clips)
    audio, _ = pad_waveforms(clips)
    log_mel = LogMel(fe)
    batched = log_mel(audio).numpy()
    assert batched.shape == (len(clips), n_mels, chunk_length * 100)
    np.testing.assert_allclose(batched, expected, atol=1e-4, rtol=0)
    alone = np.concatenate([log_mel(pad_waveforms([clip])[0]).numpy() for clip in clips[:3]])
    np.testing.assert_allclose(alone, expected[:3], atol=1e-4, rtol=0)


def test_fewer_frames_are_the_first_frames_of_the_window(waveforms):
    """A dynamic window: features cut to a batch's longest clip are the full window's first frames, the per-clip
    peak included, even when the cut falls within a frame of the longest clip's end."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=30)
    log_mel = LogMel(fe)
    audio, lengths = pad_waveforms(waveforms[:6])
    full = log_mel(audio)
    for frames in (int(lengths.max()) // fe.hop_length + 1, 400, 1000):
        np.testing.assert_allclose(log_mel(audio, n_frames=frames).numpy(), full[..., :frames].numpy(), atol=1e-6)


def test_long_form_features_match_the_extractor_untruncated(waveforms):
    """The demo's long-form path: features of a recording longer than the window, untruncated, equal the
    extractor's `truncation=False` features."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=5)
    long = np.concatenate(waveforms[:6])
    assert len(long) > 2 * fe.n_samples
    expected = numpy_path_feature_extractor(fe)(long, sampling_rate=SAMPLE_RATE, truncation=False,
                                                padding="longest").input_features
    audio, _ = pad_waveforms([long])
    features = LogMel(fe)(audio, n_frames=len(long) // fe.hop_length, truncate=False)
    assert features.shape == expected.shape
    np.testing.assert_allclose(features.numpy(), expected, atol=1e-4, rtol=0)


def test_features_stay_float32_under_autocast(waveforms):
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=5)
    audio, _ = pad_waveforms(waveforms[:2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = LogMel(fe)(audio)
    assert features.dtype == torch.float32
    np.testing.assert_allclose(features.numpy(), LogMel(fe)(audio).numpy(), atol=1e-6)


def test_the_cached_int16_audio_gives_the_same_features(waveforms):
    """The prepared cache stores int16 samples and a per-clip scale (loop.data.audio.quantize): features from them
    differ from the float audio's only in bins near the 80-dB floor (mean 7e-5, at most 0.02 here, a tenth of a
    dB), and less than float16 storage's would (the alternative at the same size)."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=5)
    clips = [*waveforms[:5], 0.01 * waveforms[5]]  # a quiet clip too: the scale follows its peak
    restored = [dequantize(*quantize(clip)) for clip in clips]
    # half a step of the clip's own scale, plus float32 rounding
    assert all(np.abs(r - c).max() <= np.abs(c).max() * (1 / 65534 + 1e-6) for r, c in zip(restored, clips))
    reference = log_mel_features(clips, fe)
    int16 = np.abs(log_mel_features(restored, fe) - reference)
    float16 = np.abs(log_mel_features([c.astype(np.float16).astype(np.float32) for c in clips], fe) - reference)
    assert int16.mean() < 2e-4 and int16.max() < 0.05
    assert int16.mean() < float16.mean() and int16.max() < float16.max()
