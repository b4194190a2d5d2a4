"""One writer per output folder, with real processes: a run holds `<output_dir>/run.lock`; a second run on the
same folder (with or without --train.resume) refuses before writing anything, naming the running process; the
evaluation script refuses to write inside a running run's folder; the lock of a process killed with -9 is free
and taken over with a note; the demo only reads the run's folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from loop.run import lock as run_lock
from loop.run.lock import LOCK_FILE, FolderInUseError
from loop.train import setup
from tests.helpers import PROJECT, child_env, run_config, run_evaluate_script, script_command

HOLD_LOCK = ("import sys, time; from loop.run.lock import acquire; acquire(sys.argv[1], 'a test holder'); "
             "print('held', flush=True); time.sleep(600)")


def snapshot(folder):
    """Every path below `folder` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture
def lock_holder(tmp_path):
    """A real second process (a small Python one, no training) holding the lock of `<tmp>/run`."""
    folder = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], env=child_env(), cwd=PROJECT,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield folder, process
    if process.poll() is None:
        process.kill()
        process.wait()


def test_a_run_refuses_a_folder_another_process_holds(lock_holder, fast_model, session_cache_dir):
    folder, process = lock_holder
    before = snapshot(folder)
    for resume in ("false", "true"):
        config = run_config(folder, fast_model, session_cache_dir, f"--train.resume={resume}")
        with pytest.raises(FolderInUseError) as error:
            setup(config)
        message = str(error.value)
        assert f"output_dir {folder} is in use by another run: PID {process.pid} on {socket.gethostname()}, " \
               "started 20" in message and ": a test holder." in message
    assert snapshot(folder) == before  # nothing written: no checkpoints/, no tensorboard/, the lock file as it was


def test_the_evaluation_script_refuses_to_write_inside_a_running_run(lock_holder, decoding_checkpoint, corpus_root,
                                                                     capsys):
    folder, process = lock_holder
    before = snapshot(folder)
    code = run_evaluate_script("--model", decoding_checkpoint, "--config", "quickstart", f"--data.path={corpus_root}",
                               "--output_dir", folder / "eval")
    assert code == 2
    err = capsys.readouterr().err
    assert f"--output_dir {folder / 'eval'} is inside {folder}, the folder of a training run that is running now " \
           f"(PID {process.pid}" in err
    assert snapshot(folder) == before


def test_the_lock_of_a_killed_process_is_taken_over_with_a_note(lock_holder):
    folder, process = lock_holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == process.pid  # the dead run's record is still there
    note = run_lock.acquire(folder)
    try:
        assert note.startswith(f"note: took over the lock of {folder} left by PID {process.pid} on ")
        assert "no longer running" in note
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert run_lock.holder_of(folder).pid == os.getpid()
    finally:
        run_lock.release(folder)
    assert run_lock.holder_of(folder) is None and (folder / LOCK_FILE).read_text() == ""


def test_the_lock_is_not_inherited_by_forked_children(tmp_path):
    """Why POSIX record locks (lockf) and not flock: the data preparation's worker pool is forked after the lock
    is taken, and its workers can outlive a killed run; a child must not keep the folder locked."""
    folder = tmp_path / "run"
    run_lock.acquire(folder)
    try:
        pid = os.fork()
        if pid == 0:  # the child: sleeps holding every descriptor its parent had
            time.sleep(30)
            os._exit(0)
        run_lock.release(folder)  # the parent ends its run; the child lives on
        assert run_lock.holder_of(folder) is None
        assert run_lock.acquire(folder) == ""
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        run_lock.release(folder)


def test_the_demo_only_reads_the_run_folder(tmp_path, decoding_checkpoint, corpus_dir):
    """The demo loads best/ and transcribes; gradio keeps uploads in its own temporary folder: the run's folder
    is unchanged."""
    from loop.ship.demo import Transcriber

    best = tmp_path / "run" / "best"
    shutil.copytree(decoding_checkpoint, best)
    before = snapshot(tmp_path / "run")
    transcriber = Transcriber(best)
    clip = next((corpus_dir / "clips").iterdir())
    text, _ = transcriber.handle(str(clip), transcriber.language, transcriber.task)
    assert text
    assert snapshot(tmp_path / "run") == before


def command(output_dir, fast_model, cache_dir, *extra):
    return script_command(
        "train", "--config", "quickstart", "--output_dir", output_dir, f"--model.name_or_path={fast_model}",
        f"--data.cache_dir={cache_dir}", "--data.num_proc=1", "--data.max_train_samples=16",
        "--data.max_eval_samples=4", "--train.per_device_train_batch_size=4", "--eval.generation_max_length=16",
        "--train.warmup_steps=0", "--train.logging_steps=1", "--eval.eval_on_start=false", "--train.max_steps=400",
        "--eval.eval_steps=400", "--train.save_steps=400", *extra,
    )


@pytest.mark.slow  # three training processes, about a minute on 2 cores
def test_two_training_processes_on_one_folder(tmp_path, fast_model, session_cache_dir):
    """The issue's case: `scripts/train.py` running, a second one started on the same folder (with and without
    --train.resume=true) refuses, naming the first; every TensorBoard event file is the first one's."""
    out = tmp_path / "run"
    first = subprocess.Popen(command(out, fast_model, session_cache_dir), env=child_env(PYTHONUNBUFFERED="1"),
                             cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not (line := first.stdout.readline()).startswith("step 2/"):
            lines.append(line)
            assert line or first.poll() is None, "".join(lines)
        for extra in ((), ("--train.resume=true",)):
            second = subprocess.run(command(out, fast_model, session_cache_dir, *extra), env=child_env(),
                                    cwd=PROJECT, capture_output=True, text=True, timeout=300, check=False)
            assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
            assert f"error: output_dir {out} is in use by another run: PID {first.pid} on " in second.stderr
        events = list((out / "tensorboard").rglob("events.out.tfevents.*"))  # ...tfevents.<time>.<host>.<pid>.<n>
        assert events and {path.name.split(".")[-2] for path in events} == {str(first.pid)}
        assert not (out / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 0
