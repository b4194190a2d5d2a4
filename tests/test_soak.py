"""Soak: a long run of the tiny model with frequent evaluation and checkpoints (marked slow: run by hand with
`python -m pytest -m slow tests/test_soak.py -s`). Resident memory must not grow after warm-up, the checkpoint
folder stays at its limit, and a kill -9 at a random moment resumes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest

from loop.run.checkpoints import list_checkpoints
from tests.helpers import PROJECT, child_env, script_command, tensorboard_scalars

pytestmark = pytest.mark.slow

STEPS = int(os.environ.get("SOAK_STEPS", "3000"))


def test_long_run_memory_checkpoints_and_kill(tmp_path, fast_model, session_cache_dir):
    out = tmp_path / "run"
    cmd = script_command(
        "train", "--config", "quickstart", "--output_dir", out, f"--model.name_or_path={fast_model}",
        f"--data.cache_dir={session_cache_dir}", "--data.max_eval_samples=8", "--train.per_device_train_batch_size=8",
        f"--train.max_steps={STEPS}", "--eval.eval_steps=100", "--train.save_steps=50", "--train.save_total_limit=2",
        "--train.logging_steps=25", "--eval.generation_max_length=32", "--train.warmup_steps=50",
    )
    env = child_env(threads=2)
    process = subprocess.Popen(cmd, env=env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 3600
    most_checkpoints = 0  # the folder count seen while the run writes a checkpoint every 50 steps
    while time.time() < deadline and not any(step >= STEPS // 2 for step, _ in list_checkpoints(out)):
        most_checkpoints = max(most_checkpoints, len(list_checkpoints(out)))
        time.sleep(1)
    time.sleep(random.uniform(0, 5))
    process.kill()
    process.wait()
    killed_at = list_checkpoints(out)[-1][0]
    resumed = subprocess.run([*cmd, "--train.resume=true"], env=env, cwd=PROJECT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {killed_at}" in resumed.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == STEPS
    assert len(list_checkpoints(out)) <= 3  # the limit, plus the best when it is older
    assert most_checkpoints <= 3
    rss = tensorboard_scalars(out, "memory/rss_mb")
    speed = tensorboard_scalars(out, "train/samples_per_second")  # 8 rows a step: steps/s is this over 8
    figures = {"steps": STEPS, "killed_at": killed_at, "most_checkpoints_while_running": most_checkpoints,
               "checkpoints_at_end": [step for step, _ in list_checkpoints(out)],
               "verify": subprocess.run(script_command("verify_checkpoints", out), env=env, cwd=PROJECT,
                                        capture_output=True, text=True).stdout.splitlines()[-1]}
    # Each process is measured on its own: after its warm-up (500 steps) against its last logged steps.
    first = {s: v for s, v in rss.items() if s <= killed_at}
    second = {s: v for s, v in rss.items() if s > killed_at}
    for name, segment, start in (("first process", first, 0), ("resumed process", second, killed_at)):
        steps = sorted(segment)
        warm = [segment[s] for s in steps if start + 500 <= s < start + 1000] or [segment[steps[len(steps) // 4]]]
        last = [segment[s] for s in steps[-10:]]
        rate = [speed[s] / 8 for s in sorted(speed) if s in segment]
        figures[name] = {"steps": [steps[0], steps[-1]], "rss_after_warmup_mb": [min(warm), max(warm)],
                         "rss_at_end_mb": [min(last), max(last)], "steps_per_second_start": sum(rate[2:6]) / 4,
                         "steps_per_second_end": sum(rate[-4:]) / 4}
        print(f"\n{name}: steps {steps[0]}-{steps[-1]}, RSS after warm-up {min(warm):.0f}-{max(warm):.0f} MB, "
              f"at its end {min(last):.0f}-{max(last):.0f} MB; steps/s {figures[name]['steps_per_second_start']:.2f} "
              f"near its start, {figures[name]['steps_per_second_end']:.2f} at its end")
        assert max(last) < max(warm) * 1.10 + 50, name
    print(json.dumps(figures))
    print(f"killed at step {killed_at} (newest complete checkpoint); most folders seen while running "
          f"{most_checkpoints}; checkpoints at the end: "
          f"{[step for step, _ in list_checkpoints(out)]}; selection WER {results['initial_wer']} -> {results['best_wer']}")
