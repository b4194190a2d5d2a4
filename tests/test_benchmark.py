"""The benchmark (benchmarks/): the analytic FLOP count and memory estimate, its settings and command line, and
a `--quick` run that must complete and write its ratios (no timing is asserted anywhere). The feature-parity
tests are in tests/test_features.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from benchmarks.estimates import training_flops_per_sample, training_memory_estimate
from benchmarks.settings import BenchSettings, parse_settings, validate
from tests.helpers import PROJECT


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


def test_command_line_is_the_settings_dataclass(capsys):
    """Every option comes from a BenchSettings field, its help from the field's docstring; no abbreviations."""
    settings = parse_settings(["--shape", "test", "--repeats", "2", "--no-packing", "--learning_rate", "3e-5"])
    assert settings == BenchSettings(shape="test", repeats=2, packing=False, learning_rate=3e-5)
    with pytest.raises(SystemExit):
        parse_settings(["--repeat", "2"])
    with pytest.raises(SystemExit):
        parse_settings(["--help"])
    assert "Runs of each side, alternating loop, reference" in capsys.readouterr().out


@pytest.mark.slow  # both sides end to end in fresh processes: over 30 s on 2 cores; run by hand before a benchmark
def test_quick_benchmark_writes_its_ratios(tmp_path):
    """`--quick` runs both sides end to end and writes the JSON; the figures are not judged."""
    output = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--output", str(output)],
                          cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(output.read_text())
    for key in ("train_samples_per_second", "eval_utterances_per_second", "prep_clips_per_second",
                "train_utterances_per_second_packed", "train_samples_per_second_dynamic",
                "eval_utterances_per_second_dynamic", "cache_bytes_per_clip"):
        assert report["ratios"][key] > 0 and math.isfinite(report["ratios"][key]), key
    packed, plain = report["packed"]["train"], report["loop"]["train"]
    assert packed["utterances_per_second"] / packed["samples_per_second"] > 1  # rows that hold several utterances
    assert plain["utterances_per_second"] == plain["samples_per_second"]
    assert "training, utterances/s, packed rows" in done.stdout and "training, samples/s, dynamic window" in done.stdout
    # int16 audio against 80 x window float32 features: the clips are far shorter than the window
    assert report["ratios"]["cache_bytes_per_clip"] < 0.5
    assert report["settings"]["shape"] == "test"
    assert report["machine"]["torch_threads"] >= 1 and report["versions"]["transformers"]
    assert report["same_transcripts_fraction"] == 1.0
