"""Faults during training, with real processes and real signals: SIGTERM saves and exits, kill -9 at any moment
leaves only complete checkpoints, and --train.resume continues from the newest one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from loop.checkpointing import STATE_FILE, list_checkpoints
from tests.helpers import PROJECT, build_fast_model


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory):
    return build_fast_model(tmp_path_factory.mktemp("fast-model"))


def command(output_dir, fast_model, cache_dir, *extra):
    return [
        sys.executable, str(PROJECT / "scripts" / "train.py"), "--config", "quickstart", "--output_dir", str(output_dir),
        f"--model.name_or_path={fast_model}", f"--data.cache_dir={cache_dir}", "--data.num_proc=1",
        "--data.max_train_samples=32", "--data.max_eval_samples=4", "--train.per_device_train_batch_size=4",
        "--eval.generation_max_length=24", "--train.warmup_steps=0", "--train.report_to=none",
        "--eval.eval_on_start=false", *extra,
    ]


def start(cmd):
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_sigterm_saves_and_resume_finishes(tmp_path, fast_model):
    out = tmp_path / "run"
    cmd = command(out, fast_model, tmp_path / "cache", "--train.max_steps=400", "--eval.eval_steps=400",
                  "--train.save_steps=400", "--train.logging_steps=1")
    process = start(cmd)
    lines = []

    def trained_a_few_steps():
        line = process.stdout.readline()
        lines.append(line)
        return line.startswith("step 3/")

    assert wait_for(trained_a_few_steps, process), "".join(lines)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGTERM received: saved step" in output and "--train.resume=true" in output
    (step, folder), = list_checkpoints(out)
    assert 3 <= step < 400 and json.loads((folder / STATE_FILE).read_text())["step"] == step

    resumed = subprocess.run([*cmd, "--train.resume=true"],
                             env={**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"},
                             cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {folder} at step {step}" in resumed.stdout
    assert json.loads((out / "results.json").read_text())["steps"] == 400


def test_kill_9_never_leaves_a_broken_checkpoint(tmp_path, fast_model):
    """Saves at every step, kill -9 at a random moment (often mid-save): every listed checkpoint is complete and
    the run resumes from the newest."""
    out = tmp_path / "run"
    cmd = command(out, fast_model, tmp_path / "cache", "--train.max_steps=60", "--eval.eval_steps=60",
                  "--train.save_steps=1", "--train.save_total_limit=3", "--train.logging_steps=10")
    process = start(cmd)
    assert wait_for(lambda: len(list_checkpoints(out)) >= 2, process), process.communicate()[0]
    time.sleep(random.uniform(0.0, 1.5))
    process.kill()
    process.communicate()
    checkpoints = list_checkpoints(out)
    assert checkpoints
    for step, folder in checkpoints:
        assert json.loads((folder / STATE_FILE).read_text())["step"] == step
        assert (folder / "model.safetensors").is_file() and (folder / "optimizer.bin").is_file()
    newest = checkpoints[-1][0]
    resumed = subprocess.run([*cmd, "--train.resume=true"], cwd=PROJECT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"at step {newest}" in resumed.stdout
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert len(list_checkpoints(out)) <= 3 + 1
