"""`train.deterministic`: two identical runs, and a run killed with kill -9 and resumed, end with bitwise-equal
weights, with dropout, SpecAugment and augmentation on; without it, two identical runs differ.

The setting is chosen to reach the kernel that made runs differ (`loop/run/determinism.py`): two CPU threads and a
batch whose positional-embedding gradient has more than 32,768 elements (16 rows x 30-odd label tokens x 64
channels), where PyTorch accumulates `weight[position_ids]`'s gradient with parallel atomic adds.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from loop.run.checkpoints import list_checkpoints
from loop.train import fit, setup
from tests.helpers import PROJECT, child_env, reset_accelerate, run_config, script_command

THREADS = 2  # the atomic accumulation runs in parallel only with more than one intra-op thread
RANDOM_PARTS = ("--model.dropout=0.1", "--model.apply_spec_augment=true", "--model.mask_feature_prob=0.05",
                "--augment.speed_perturbation=true", "--augment.noise_probability=0.5",
                "--augment.gain_probability=0.5")
SMALL = ("--data.max_train_samples=48", "--data.selection_size=8", "--data.max_eval_samples=4",
         "--train.per_device_train_batch_size=16", "--train.learning_rate=3e-3", "--train.report_to=none",
         "--eval.per_device_eval_batch_size=8", "--eval.generation_max_length=8", *RANDOM_PARTS)


@pytest.fixture
def threads_and_determinism_restored():
    """THREADS intra-op threads for the test; torch's process-wide settings as they were afterwards (the option
    switches deterministic kernels on for the rest of the process)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    benchmark, cublas = torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = benchmark
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / "model.safetensors"))


def differing(a: dict, b: dict) -> int:
    """How many single weights differ between two state dicts of the same model (0: bitwise equal)."""
    assert a.keys() == b.keys()
    return sum(int((a[k] != b[k]).sum()) for k in a)


def train_in_process(tmp_path, fast_model, cache_dir, name: str, *extra) -> dict[str, torch.Tensor]:
    config = run_config(tmp_path / name, fast_model, cache_dir, *SMALL, "--train.max_steps=2", "--train.save_steps=2",
                        "--eval.eval_steps=2", *extra)
    run = setup(config)
    assert fit(run) == ""
    reset_accelerate()
    return weights(tmp_path / name, 2)


@pytest.mark.usefixtures("threads_and_determinism_restored")
def test_two_identical_runs_are_bitwise_equal_only_when_deterministic(tmp_path, fast_model, session_cache_dir):
    on = [train_in_process(tmp_path, fast_model, session_cache_dir, f"on-{i}", "--train.deterministic=true")
          for i in range(2)]
    assert torch.are_deterministic_algorithms_enabled()
    assert differing(*on) == 0
    torch.use_deterministic_algorithms(False)
    off = [train_in_process(tmp_path, fast_model, session_cache_dir, f"off-{i}") for i in range(2)]
    # The control: without the option the same two runs differ (in the last bits of a fifth or so of the
    # weights), so the equality above is the option's doing and not this setting's luck.
    assert differing(*off) > 0
    assert max(float((off[0][k] - off[1][k]).abs().max()) for k in off[0]) < 1e-4


@pytest.mark.slow  # three training processes: about 90 s on 2 busy cores
def test_kill_9_and_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path, fast_model, session_cache_dir):
    """Real processes: one run straight to step 8; one killed with SIGKILL once step 4 is saved (it is then
    somewhere in steps 5-8, or evaluating), then resumed with --train.resume=true. Same weights at step 8."""
    def command(out):
        return script_command(
            "train", "--config", "quickstart", "--output_dir", out, f"--model.name_or_path={fast_model}",
            f"--data.cache_dir={session_cache_dir}", "--data.num_proc=1", "--train.warmup_steps=0",
            "--eval.eval_on_start=false", *SMALL, "--train.max_steps=8", "--train.save_steps=4",
            "--eval.eval_steps=8", "--train.deterministic=true",
        )

    env = child_env(threads=THREADS)
    straight = subprocess.run(command(tmp_path / "straight"), env=env, cwd=PROJECT, capture_output=True, text=True,
                              timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "deterministic: torch.use_deterministic_algorithms on, 2 CPU threads" in straight.stdout

    out = tmp_path / "killed"
    process = subprocess.Popen(command(out), env=env, cwd=PROJECT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list_checkpoints(out) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert [step for step, _ in list_checkpoints(out)] == [4], "killed before step 4 was saved or after step 8"
    resumed = subprocess.run([*command(out), "--train.resume=true"], env=env, cwd=PROJECT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 4" in resumed.stdout
    assert differing(weights(tmp_path / "straight", 8), weights(out, 8)) == 0
