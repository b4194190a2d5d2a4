"""Feature parity: the log-mel paths the loop takes equal the feature extractor's NumPy path (the reference the
blog's recipe runs where torch is absent, benchmarks/reference_recipe.py) to 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from benchmarks.reference_recipe import numpy_path_feature_extractor
from loop.audio import SAMPLE_RATE, decode_audio
from loop.features import log_mel_features
from tests.helpers import corpus_rows


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
    """loop.features.log_mel_features (what loop.data.prepare computes) skips the padding's STFT and still gives
    the same features, batched or not."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_length)
    expected = numpy_path(fe, waveforms)
    np.testing.assert_allclose(log_mel_features(waveforms, fe), expected, atol=1e-4, rtol=0)
    one_by_one = np.concatenate([log_mel_features([w], fe) for w in waveforms])
    np.testing.assert_allclose(one_by_one, expected, atol=1e-4, rtol=0)
