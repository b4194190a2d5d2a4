"""Faults during training, all of them real: SIGTERM and kill -9 sent to training processes (SIGTERM saves and
exits, kill -9 at any moment leaves only complete checkpoints, and --train.resume continues from the newest one),
and non-finite losses, a failing evaluation batch and CUDA out-of-memory raised inside the model's own forward
pass by torch hooks the test registers on it (no function of the loop is replaced)."""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import time

import pytest
import torch

from loop.run.checkpoints import STATE_FILE, list_checkpoints
from loop.train import finish, fit, setup
from tests.helpers import PROJECT, child_env, run_config, script_command


def command(output_dir, fast_model, cache_dir, *extra):
    return script_command(
        "train", "--config", "quickstart", "--output_dir", output_dir,
        f"--model.name_or_path={fast_model}", f"--data.cache_dir={cache_dir}", "--data.num_proc=1",
        "--data.max_train_samples=32", "--data.max_eval_samples=4", "--train.per_device_train_batch_size=4",
        "--eval.generation_max_length=24", "--train.warmup_steps=0", "--train.report_to=none",
        "--eval.eval_on_start=false", *extra,
    )


def start(cmd):
    return subprocess.Popen(cmd, env=child_env(PYTHONUNBUFFERED="1"), cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_sigterm_saves_and_resume_finishes(tmp_path, fast_model, session_cache_dir):
    out = tmp_path / "run"
    cmd = command(out, fast_model, session_cache_dir, "--train.max_steps=400", "--eval.eval_steps=400",
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

    resumed = subprocess.run([*cmd, "--train.resume=true"], env=child_env(), cwd=PROJECT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resumed from {folder} at step {step}" in resumed.stdout
    assert json.loads((out / "results.json").read_text())["steps"] == 400


def test_kill_9_never_leaves_a_broken_checkpoint(tmp_path, fast_model, session_cache_dir):
    """Saves at every step, kill -9 at a random moment (often mid-save): every listed checkpoint is complete and
    the run resumes from the newest."""
    out = tmp_path / "run"
    cmd = command(out, fast_model, session_cache_dir, "--train.max_steps=60", "--eval.eval_steps=60",
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
    resumed = subprocess.run([*cmd, "--train.resume=true"], env=child_env(), cwd=PROJECT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"at step {newest}" in resumed.stdout
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert len(list_checkpoints(out)) <= 3 + 1


def in_process_config(tmp_path, fast_model, cache_dir, *extra):
    return run_config(tmp_path / "run", fast_model, cache_dir, "--data.max_train_samples=16", "--data.max_eval_samples=4",
                      "--train.per_device_train_batch_size=4", "--eval.generation_max_length=16",
                      "--train.report_to=none", *extra)


def training_pass() -> bool:
    """Whether a forward pass is a training one: it records a graph (evaluation runs under torch.no_grad()).
    Not `module.training`: the loop trains the model in the mode from_pretrained leaves it in, eval."""
    return torch.is_grad_enabled()


def spoil_training_logits(model, spoiled, factor: float):
    """Multiplies the logits of the n-th training forward pass (counting from 1; evaluation passes are left
    alone) by `factor` (nan, inf) when `spoiled(n)`, through a forward hook on the model's output layer: the loss,
    the gradients and the loop's finiteness checks then see a real non-finite step. Returns the hook's handle."""
    passes = itertools.count(1)

    def hook(module, inputs, logits):
        if training_pass() and spoiled(next(passes)):
            return logits * factor

    return model.get_output_embeddings().register_forward_hook(hook)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, fast_model, session_cache_dir):
    config = in_process_config(tmp_path, fast_model, session_cache_dir, "--train.max_steps=6", "--eval.eval_steps=6",
                               "--train.save_steps=6")
    run = setup(config)
    spoil_training_logits(run.model, lambda n: n in (3, 4), float("nan"))  # one micro-batch a step: steps 3 and 4
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    assert fit(run) == ""
    assert run.state.nonfinite_steps == 2 and run.state.consecutive_nonfinite == 0
    after = run.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_too_many_nonfinite_steps_save_and_stop(tmp_path, fast_model, session_cache_dir):
    config = in_process_config(tmp_path, fast_model, session_cache_dir, "--train.max_steps=20", "--eval.eval_steps=20",
                               "--train.save_steps=20", "--train.max_consecutive_nonfinite=3")
    run = setup(config)
    spoil_training_logits(run.model, lambda n: n > 2, float("inf"))  # diverges after 2 good steps
    with pytest.raises(FloatingPointError, match="3 optimizer steps in a row") as error:
        fit(run)
    assert "saved a checkpoint" in str(error.value)
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [5]


def test_a_failing_evaluation_batch_costs_only_its_rows(tmp_path, fast_model, session_cache_dir):
    """The encoder raises on the first evaluation batch (a forward pre-hook, not in training passes); train() is
    setup() -> fit() -> finish(), driven here so the hook goes on the run's model."""
    config = in_process_config(tmp_path, fast_model, session_cache_dir, "--train.max_steps=2", "--eval.eval_steps=2",
                               "--train.save_steps=2", "--eval.per_device_eval_batch_size=2",
                               "--eval.eval_on_start=true")
    run = setup(config)
    evaluation_batches = itertools.count(1)

    def first_batch_fails(encoder, inputs):
        if not training_pass() and next(evaluation_batches) == 1:
            raise RuntimeError("simulated failure in the first evaluation batch")

    run.model.get_encoder().register_forward_pre_hook(first_batch_fails)
    assert fit(run) == ""
    results = finish(run)
    first, last = results["evaluations"][0], results["evaluations"][-1]
    assert first["num_failed"] == 2 and first["num_utterances"] == 2
    assert last["num_failed"] == 0 and last["num_utterances"] == 4
    assert results["steps"] == 2 and (tmp_path / "run" / "best" / "model.safetensors").is_file()


def test_out_of_memory_names_the_batch_and_the_fix(tmp_path, fast_model, session_cache_dir):
    config = in_process_config(tmp_path, fast_model, session_cache_dir, "--train.max_steps=2", "--eval.eval_steps=2",
                               "--train.per_device_train_batch_size=16", "--train.gradient_accumulation_steps=2")
    run = setup(config)

    def out_of_memory(model, inputs):
        if training_pass():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    run.model.register_forward_pre_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as error:
        fit(run)
    message = str(error.value)
    assert "per_device_train_batch_size=16" in message
    assert "--train.per_device_train_batch_size=8 --train.gradient_accumulation_steps=4" in message
