"""Checkpoint integrity, with real damage to real checkpoint files: a truncated `model.safetensors` (a partial
copy), one flipped byte (a bad disk), a checkpoint saved before checksums were recorded; `--train.resume=true`
falls back to the newest intact checkpoint and the run still matches an uninterrupted one, `--train.resume=step_N`
picks one by hand, and scripts/verify_checkpoints.py reports every checkpoint of a run."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from loop.config import ConfigError
from loop.run.checkpoint_integrity import (
    SET_ASIDE_DIR,
    CheckpointError,
    choose_resume_checkpoint,
    verify_checkpoint,
)
from loop.run.checkpoints import CHECKSUMS_KEY, STATE_FILE, list_checkpoints
from loop.train import finish, fit, setup, train
from tests.helpers import (
    PROJECT,
    StopAt,
    child_env,
    reset_accelerate,
    run_config,
    script_command,
    tensorboard_scalars,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def small_run(tmp_path, fast_model, cache_dir, *overrides, name="run"):
    return run_config(
        tmp_path / name, fast_model, cache_dir,
        "--data.max_train_samples=24", "--data.selection_size=8", "--data.max_eval_samples=4",
        "--train.per_device_train_batch_size=8", "--train.learning_rate=3e-3", "--train.report_to=tensorboard",
        "--eval.per_device_eval_batch_size=8", "--eval.generation_max_length=16", "--train.max_steps=8",
        "--train.save_steps=2", "--eval.eval_steps=4", "--train.save_total_limit=3", *overrides,
    )


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, fast_model, session_cache_dir):
    """A run stopped at step 6 with checkpoints step_2, step_4 and step_6; tests work on copies of it."""
    tmp_path = tmp_path_factory.mktemp("saved-run")
    config = small_run(tmp_path, fast_model, session_cache_dir)
    run = setup(config)
    assert fit(run, StopAt(run, 6)) == "SIGTERM"
    reset_accelerate()
    assert [step for step, _ in list_checkpoints(config.output_dir)] == [2, 4, 6]
    return tmp_path / "run"


@pytest.fixture
def run_copy(saved_run, tmp_path):
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_truncated_newest_checkpoint_is_passed_over_and_the_resume_matches(tmp_path, fast_model, session_cache_dir,
                                                                            capsys):
    """step_6's model.safetensors cut short: the resume names it and the file, continues from step_4, and ends
    with the same per-step losses and weights as an uninterrupted run; step_6 is set aside, not deleted."""
    straight = train(small_run(tmp_path, fast_model, session_cache_dir, name="straight"))
    reset_accelerate()
    config = small_run(tmp_path, fast_model, session_cache_dir, name="resumed")
    run = setup(config)
    assert fit(run, StopAt(run, 6)) == "SIGTERM"
    reset_accelerate()
    weights = tmp_path / "resumed" / "checkpoints" / "step_6" / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    capsys.readouterr()
    config.train.resume = True
    run = setup(config)
    output = capsys.readouterr().out
    assert "step_6 fails verification" in output and "model.safetensors" in output and "(truncated)" in output
    assert "resuming from step_4, the newest checkpoint that passes verification" in output
    assert run.state.step == 4
    assert fit(run) == ""
    resumed = finish(run)
    assert tensorboard_scalars(tmp_path / "resumed", "train/loss") == tensorboard_scalars(tmp_path / "straight",
                                                                                          "train/loss")
    final_straight = load_file(str(tmp_path / "straight" / "checkpoints" / "step_8" / "model.safetensors"))
    final_resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_8" / "model.safetensors"))
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)
    assert resumed["test_wer"] == straight["test_wer"]
    assert (tmp_path / "resumed" / "checkpoints" / SET_ASIDE_DIR / "step_6" / "model.safetensors").is_file()
    assert verify_checkpoint(tmp_path / "resumed" / "checkpoints" / "step_6").ok  # written again by the resumed run


def test_a_flipped_byte_is_reported_by_checkpoint_and_file(run_copy):
    flip_byte(run_copy / "checkpoints" / "step_6" / "optimizer.bin", 1000)
    verification = verify_checkpoint(run_copy / "checkpoints" / "step_6")
    assert not verification.ok
    assert verification.problems == [("optimizer.bin: SHA-256 differs from the one recorded when saved (the file is "
                                      "corrupt)")]
    said = []
    assert choose_resume_checkpoint(run_copy, True, said.append) == run_copy / "checkpoints" / "step_4"
    assert any("step_6 fails verification" in line and "optimizer.bin" in line for line in said)
    assert verify_checkpoint(run_copy / "checkpoints" / "step_4").ok


def test_resume_from_a_checkpoint_chosen_by_hand(run_copy, fast_model, session_cache_dir, capsys):
    """--train.resume=step_2: that checkpoint's state and saved config (not the newest one's) are used; the newer
    checkpoints are set aside so the resumed run's rotation cannot delete its own new ones."""
    config = small_run(run_copy.parent, fast_model, session_cache_dir, "--train.resume=step_2")
    assert config.train.resume == "step_2"
    run = setup(config)
    assert run.state.step == 2
    assert [step for step, _ in list_checkpoints(run_copy)] == [2]
    assert sorted(p.name for p in (run_copy / "checkpoints" / SET_ASIDE_DIR).iterdir()) == ["step_4", "step_6"]
    reset_accelerate()
    with pytest.raises(ConfigError, match="train.seed was 42 in step_2, now 7"):
        setup(small_run(run_copy.parent, fast_model, session_cache_dir, "--train.resume=step_2", "--train.seed=7"))


def test_a_checkpoint_asked_for_by_hand_must_exist_and_pass(run_copy):
    with pytest.raises(CheckpointError, match=r"no such checkpoint .* \(complete ones: step_2, step_4, step_6\)"):
        choose_resume_checkpoint(run_copy, "step_5")
    (run_copy / "checkpoints" / "step_4" / "scheduler.bin").unlink()
    with pytest.raises(CheckpointError, match="step_4 fails verification: scheduler.bin: missing"):
        choose_resume_checkpoint(run_copy, "step_4")


def test_no_intact_checkpoint_is_an_error_naming_each(run_copy):
    for step in (2, 4, 6):
        flip_byte(run_copy / "checkpoints" / f"step_{step}" / "model.safetensors", 200)
    with pytest.raises(CheckpointError, match="no checkpoint in .* passes verification: step_6: model.safetensors"):
        choose_resume_checkpoint(run_copy, True, lambda line: None)


def test_a_checkpoint_without_checksums_still_loads_with_a_note(run_copy, fast_model, session_cache_dir, capsys):
    """A checkpoint written by an earlier version (no `files` in loop_state.json) resumes, unverified."""
    state_file = run_copy / "checkpoints" / "step_6" / STATE_FILE
    values = json.loads(state_file.read_text())
    del values[CHECKSUMS_KEY]
    state_file.write_text(json.dumps(values))
    config = small_run(run_copy.parent, fast_model, session_cache_dir, "--train.resume=true")
    run = setup(config)
    assert run.state.step == 6
    assert "has no checksums (saved by an earlier version): loading it unverified" in capsys.readouterr().out


def verify_script(run_dir):
    return subprocess.run(script_command("verify_checkpoints", run_dir), env=child_env(), cwd=PROJECT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_verify_script_on_a_good_and_a_damaged_run(run_copy):
    good = verify_script(run_copy)
    assert good.returncode == 0, good.stdout + good.stderr
    best_files = sum(1 for path in (run_copy / "best").rglob("*") if path.is_file()) - 1  # checksums.json itself
    assert good.stdout.splitlines() == ["ok      step_2: 5 files intact", "ok      step_4: 5 files intact",
                                        "ok      step_6: 5 files intact", f"ok      best: {best_files} files intact",
                                        "all 4 intact (loop_state.json checksums)"]
    flip_byte(run_copy / "checkpoints" / "step_4" / "model.safetensors", 5000)
    (run_copy / "best" / "tokenizer_config.json").write_text("{}")
    bad = verify_script(run_copy)
    assert bad.returncode == 1
    assert "FAILED  step_4: model.safetensors: SHA-256 differs" in bad.stdout
    assert "FAILED  best: tokenizer_config.json: " in bad.stdout
    assert "2 of 4 failed: step_4, best; --train.resume=true uses step_6, the newest that passes" in bad.stdout
    assert verify_script(run_copy.parent / "nothing-here").returncode == 1
