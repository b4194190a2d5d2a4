"""The benchmark: feature parity of the fast extraction paths, the analytic FLOP count, and a `--quick` run that
must complete and write its ratios (no timing is asserted anywhere)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from loop.audio import SAMPLE_RATE, decode_audio
from loop.benchmark import (
    BenchSettings,
    numpy_path_feature_extractor,
    training_flops_per_sample,
    training_memory_estimate,
    validate,
)
from loop.features import log_mel_features
from tests.helpers import PROJECT, corpus_rows


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
    """What loop.data.prepare computes (one batched call, torch STFT) equals the one-clip NumPy path to 1e-4."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_length)
    expected = numpy_path(fe, waveforms)
    batched = fe(waveforms, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    assert batched.shape == expected.shape == (len(waveforms), 80, chunk_length * 100)
    np.testing.assert_allclose(batched, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk_length", [30, 5])
def test_trimmed_stft_features_match_the_numpy_path(waveforms, chunk_length):
    """loop.features.log_mel_features skips the padding's STFT and still gives the same features, batched or not."""
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_length)
    expected = numpy_path(fe, waveforms)
    np.testing.assert_allclose(log_mel_features(waveforms, fe), expected, atol=1e-4, rtol=0)
    one_by_one = np.concatenate([log_mel_features([w], fe) for w in waveforms])
    np.testing.assert_allclose(one_by_one, expected, atol=1e-4, rtol=0)


def test_training_flops_match_torch_flop_counter():
    """The analytic count is within 3% of what torch counts for a forward and backward pass (eager attention, so
    the attention matmuls are visible to the counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = WhisperConfig(vocab_size=600, num_mel_bins=80, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=256,
                           decoder_ffn_dim=256, max_source_positions=250, max_target_positions=64,
                           pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=1)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    batch, tokens = 2, 20
    features = torch.randn(batch, 80, 500)
    labels = torch.randint(0, 600, (batch, tokens))
    with FlopCounterMode(display=False) as counter:
        model(input_features=features, labels=labels).loss.backward()
    counted = counter.get_total_flops() / batch
    assert math.isclose(training_flops_per_sample(config, tokens), counted, rel_tol=0.03), counted


def test_memory_estimate_adds_up():
    small = WhisperConfig(vocab_size=51865, d_model=768, encoder_layers=12, decoder_layers=12,
                          encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                          decoder_ffn_dim=3072)
    parts = training_memory_estimate(small, batch_size=16, n_label_tokens=128)
    states = parts["weights_fp32"] + parts["gradients_fp32"] + parts["adamw_moments_fp32"]
    assert states == pytest.approx(16 * parts["parameters"] / 1e9)
    summed = sum(v for k, v in parts.items() if k not in ("total", "parameters"))
    assert parts["total"] == pytest.approx(summed)
    assert training_memory_estimate(small, 16, 128, separate_loss=True)["total"] > parts["total"]


def test_settings_problems_are_listed_together():
    settings = BenchSettings(shape="test", train_clips=2, repeats=0).resolved()
    problems = validate(settings)
    assert any("--train_clips" in p for p in problems) and any("--repeats" in p for p in problems)


def test_quick_benchmark_writes_its_ratios(tmp_path):
    """`--quick` runs both sides end to end and writes the JSON; the figures are not judged."""
    output = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(PROJECT / "scripts" / "benchmark.py"), "--quick", "--output", str(output)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(output.read_text())
    for key in ("train_samples_per_second", "eval_utterances_per_second", "prep_clips_per_second",
                "train_utterances_per_second_packed"):
        assert report["ratios"][key] > 0 and math.isfinite(report["ratios"][key]), key
    packed, plain = report["packed"]["train"], report["loop"]["train"]
    assert packed["utterances_per_second"] / packed["samples_per_second"] > 1  # rows that hold several utterances
    assert plain["utterances_per_second"] == plain["samples_per_second"]
    assert "training, utterances/s, packed rows" in done.stdout
    assert report["settings"]["shape"] == "test"
    assert report["machine"]["torch_threads"] >= 1 and report["versions"]["transformers"]
    assert report["same_transcripts_fraction"] == 1.0
