"""benchmarks/gpu_probe.py: its --dry-run (the same code as on a GPU, tiny shapes, on the CPU) runs every part and
reports what each part checks; its wheel installer picks only what a machine lacks, never torch. No timing is
asserted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import PROJECT, child_env


@pytest.mark.slow  # every part of the probe on the CPU, about a minute: run by hand before a lent GPU's session
def test_the_dry_run_runs_every_part_and_the_checks_pass(tmp_path):
    output = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(PROJECT / "benchmarks" / "gpu_probe.py"), "--dry-run", "--output",
                           str(output), "--workdir", str(tmp_path / "work")],
                          env=child_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    figures = json.loads(output.read_text())
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {name for line in lines for name in line} >= {"workspace", "gemm", "nonfinite", "lora", "fsdp", "resume"}
    assert figures["workspace"]["vocab_size"] == 51865
    for label in ("fp16_full", "fp16_dynamic", "bf16_full", "bf16_dynamic"):
        speed = figures[f"speed_{label}"]
        assert speed["samples_per_s"] > 0 and 0 < speed["mfu"] and 0 <= speed["data_wait_share"] < 1, speed
    assert figures["speed_fp16_dynamic"]["mean_window_s"] < figures["speed_fp16_full"]["mean_window_s"] == 5.0
    assert figures["speed_fp16_full"]["eval_failed"] == 0 and figures["speed_fp16_full"]["best_save_s"] > 0
    assert figures["nonfinite"]["passed"] and figures["nonfinite"]["nonfinite_steps"] == 2
    assert figures["lora"]["adapter_round_trip_equal"] and figures["lora"]["best_loads"] == "WhisperForConditionalGeneration"
    assert figures["fsdp"]["passed"] and figures["fsdp"]["test_utterances"] == 4
    assert figures["resume"]["resumed_from"] == 2 and figures["resume"]["bitwise_equal"]
    for recipe in ("whisper-small-hi", "whisper-small-hi-fast"):
        parts = figures["projection"][recipe]
        assert abs(parts["total_min"] - sum(v for k, v in parts.items() if k != "total_min")) < 1e-6


def test_the_installer_takes_only_what_is_lacking_and_never_torch(tmp_path):
    """Wheel files are named NAME-VERSION-...: a newer accelerate than the one here is lacking, an older or equal
    one is not, a package not installed is, torch and NVIDIA's libraries never are."""
    import accelerate

    sys.path.insert(0, str(PROJECT / "benchmarks"))
    try:
        from gpu_probe import lacking_wheels
    finally:
        sys.path.remove(str(PROJECT / "benchmarks"))
    names = [f"accelerate-{accelerate.__version__}-py3-none-any.whl", "accelerate-999.0-py3-none-any.whl",
             "accelerate-0.1.0-py3-none-any.whl", "not_installed_here-1.0-py3-none-any.whl",
             "torch-99.0-cp312-cp312-manylinux_2_28_x86_64.whl", "nvidia_cublas-99.0-py3-none-manylinux_2_28_x86_64.whl"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert [wheel.name for wheel in lacking_wheels(tmp_path)] == [names[1], names[3]]
