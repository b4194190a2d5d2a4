"""A full disk, for real: the run's output folder on a small tmpfs (needs root and mount; skipped otherwise), and a
file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) that makes writes fail as a full disk does, for any user. The
training run is a real `scripts/train.py` process: it warns before the first save, stops at the failing save
with one message (which save, the folder, the space needed and free, the resume command), keeps every complete
checkpoint, and a resume after space is freed continues."""

from __future__ import annotations

import resource
import shutil
import signal
import subprocess
import uuid

import pytest

from loop.run.checkpoint_integrity import verify_checkpoint
from loop.run.checkpoints import list_checkpoints
from loop.train import setup
from tests.helpers import PROJECT, child_env, reset_accelerate, run_config, script_command

DATA = ("--data.max_train_samples=16", "--data.max_eval_samples=4", "--data.selection_size=8")


def command(output_dir, fast_model, cache_dir, *extra):
    return script_command(
        "train", "--config", "quickstart", "--output_dir", output_dir, f"--model.name_or_path={fast_model}",
        f"--data.cache_dir={cache_dir}", "--data.num_proc=1", *DATA, "--train.per_device_train_batch_size=4",
        "--eval.generation_max_length=16", "--eval.per_device_eval_batch_size=4", "--train.warmup_steps=0",
        "--train.report_to=none", "--train.logging_steps=1", "--eval.guard_sets=[]", *extra,
    )


def run(cmd, **kwargs):
    return subprocess.run(cmd, env=child_env(), cwd=PROJECT, capture_output=True, text=True, timeout=600, check=False,
                          **kwargs)


@pytest.fixture
def prepared_cache(tmp_path, fast_model, session_cache_dir):
    """The data the runs below use, prepared into the session cache beforehand (in this process), so that the
    limited runs write nothing but their own outputs."""
    setup(run_config(tmp_path / "prepare-only", fast_model, session_cache_dir, *DATA))
    reset_accelerate()
    return session_cache_dir


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 12-MB tmpfs (a checkpoint of the fast model is about 5 MB); grow it with `remount(size_mb)`."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", f"whisper-loop-{uuid.uuid4().hex[:8]}",
                              str(mount_point)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {mounted.stderr.strip()}; "
                    "test_a_file_size_limit_fails_a_save_with_one_message covers the failing save without it")

    def remount(size_mb: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(mount_point)], check=True)

    yield mount_point, remount
    subprocess.run(["umount", str(mount_point)], check=False)


@pytest.mark.slow  # two training processes, about a minute on 2 cores
def test_a_full_disk_stops_at_a_save_with_one_message_and_the_resume_continues(small_tmpfs, fast_model,
                                                                               prepared_cache):
    mount_point, remount = small_tmpfs
    out = mount_point / "run"
    cmd = command(out, fast_model, prepared_cache, "--train.max_steps=8", "--train.save_steps=1",
                  "--train.save_total_limit=5", "--eval.eval_steps=8", "--eval.eval_on_start=false")
    full = run(cmd)
    assert full.returncode == 1, full.stdout[-3000:] + full.stderr[-3000:]
    assert "warning: " in full.stdout and "MB free, but 5 checkpoints (train.save_total_limit)" in full.stdout
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    (error,) = errors
    saved = [step for step, _ in list_checkpoints(out)]
    assert saved and saved == list(range(1, len(saved) + 1))
    failed = saved[-1] + 1
    assert f"error: could not save checkpoint step_{failed} in {out}/checkpoints: the disk is full. It needs about" in error
    assert "MB is free there. The partial save was removed; every complete checkpoint is kept." in error
    assert error.endswith("--train.resume=true") and "Free some space, then resume with: python " in error
    assert all(verify_checkpoint(folder).ok for _, folder in list_checkpoints(out))
    assert not list((out / "checkpoints").glob(".tmp-*"))

    remount(64)  # space freed
    resumed = run(cmd + ["--train.resume=true"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out}/checkpoints/step_{saved[-1]} at step {saved[-1]}" in resumed.stdout
    assert (out / "results.json").is_file() and (out / "best" / "model.safetensors").is_file()
    assert [step for step, _ in list_checkpoints(out)][-1] == 8


def limited_to(megabytes: float):
    """A child's pre-exec hook: files it writes stop growing at `megabytes` (write() fails with EFBIG, as on a full
    disk, once SIGXFSZ no longer kills it)."""
    limit = int(megabytes * 1e6)

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize(("megabytes", "what", "first_save"), [
    (3.0, "checkpoint step_2", "checkpoints"),  # the weights (1.7 MB) fit, torch.save's optimizer.bin (3.4 MB) not
    pytest.param(1.0, "best/ (the best model so far)", "best",  # the weights do not fit in best/ (step-0 eval)
                 marks=pytest.mark.slow),
], ids=["checkpoint", "best"])
def test_a_file_size_limit_fails_a_save_with_one_message(tmp_path, fast_model, prepared_cache, megabytes, what,
                                                        first_save):
    out = tmp_path / "run"
    cmd = command(out, fast_model, prepared_cache, "--train.max_steps=4", "--train.save_steps=2",
                  "--eval.eval_steps=4", "--eval.eval_on_start=true")
    limited = run(cmd, preexec_fn=limited_to(megabytes))
    assert limited.returncode == 1, limited.stdout[-3000:] + limited.stderr[-3000:]
    errors = [line for line in limited.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in limited.stderr, limited.stderr[-3000:]
    folder = out / first_save if first_save == "best" else out / "checkpoints"
    assert errors[0].startswith(f"error: could not save {what} in {folder}: "), errors[0]
    assert "It needs about" in errors[0] and errors[0].endswith("--train.resume=true")
    assert not list(out.rglob(".tmp-*")), list(out.rglob(".tmp-*"))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
