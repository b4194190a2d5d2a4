"""scripts/sweep.py: three trials of the real loop on the tiny model, one of them pruned by the median pruner on its
selection WER, the summary and the best trial's preset; a sweep killed with kill -9 continues from its storage
without running its finished trials again.

Pruning is made certain, not left to chance: a random tiny model cannot learn to transcribe in a few steps (its
WER stays at 100 whatever the learning rate), so the space is one that changes WER for sure: the decoding
checkpoint (tests/helpers.py) says random words until the length limit, so a limit of 4 tokens (the prompt) gives
empty hypotheses, WER 100, and 48 gives WER about 400. The trials are enqueued (`--enqueue`) as 4, 48, 4: the median pruner with one startup
trial stops the second at its first evaluation, and the third, equal to the first, is not worse than the median.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from loop.config.loading import load_config
from tests.helpers import PROJECT, child_env, load_script, script_command

optuna = pytest.importorskip("optuna")
pytestmark = pytest.mark.usefixtures("single_thread")
GOOD, BAD = 4, 48  # eval.generation_max_length: empty hypotheses, or random words to the limit
OPTION = "eval.generation_max_length"
SPACE = f"{OPTION}: {{type: categorical, choices: [{GOOD}, {BAD}]}}\n"


def sweep_args(tmp_path, model, cache_dir, sweep_dir, *extra) -> list[str]:
    (tmp_path / "space.yaml").write_text(SPACE)
    return [
        "--config", "quickstart", "--space", str(tmp_path / "space.yaml"), "--trials", "3", "--output_dir",
        str(sweep_dir), "--prune_startup_trials", "1",
        *[f"--enqueue={json.dumps({OPTION: length})}" for length in (GOOD, BAD, GOOD)],
        f"--model.name_or_path={model}", f"--data.cache_dir={cache_dir}", "--data.num_proc=1",
        "--data.max_train_samples=16", "--data.selection_size=8", "--data.max_eval_samples=4",
        "--eval.guard_sets=[]", "--eval.eval_on_start=false", "--train.warmup_steps=0",
        "--train.learning_rate=1e-7", "--train.per_device_train_batch_size=8", "--train.max_steps=4",
        "--eval.eval_steps=2", "--train.save_steps=4", "--train.logging_steps=2", "--train.report_to=none",
        "--eval.per_device_eval_batch_size=8", *extra,
    ]


def trials_by_state(sweep_dir) -> dict[str, list]:
    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'study.db'}")
    states: dict[str, list] = {}
    for trial in study.trials:
        states.setdefault(trial.state.name, []).append(trial)
    return states


def test_three_trials_one_pruned_summary_and_best_preset(tmp_path, decoding_checkpoint, session_cache_dir, capsys,
                                                         monkeypatch):
    """Logging to MLflow too: the pruned trial's MLflow run is ended, so the next trial gets its own."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    sweep_dir = tmp_path / "sweep"
    code = load_script("sweep").main(sweep_args(tmp_path, decoding_checkpoint, session_cache_dir, sweep_dir,
                                                "--train.report_to=mlflow", "--train.tracker_project=sweep-test"))
    assert code == 0, capsys.readouterr().err[-2000:]
    states = trials_by_state(sweep_dir)
    assert [t.params[OPTION] for t in states["COMPLETE"]] == [GOOD, GOOD]
    assert [t.value for t in states["COMPLETE"]] == [100.0, 100.0]
    (pruned,) = states["PRUNED"]
    assert pruned.params[OPTION] == BAD and list(pruned.intermediate_values) == [2]  # stopped at its first evaluation
    assert pruned.intermediate_values[2] > 200
    for trial in states["COMPLETE"]:  # each trial an ordinary run folder
        assert json.loads((sweep_dir / f"trial_{trial.number:03d}" / "results.json").read_text())["best_wer"] == trial.value
    assert not (sweep_dir / f"trial_{pruned.number:03d}" / "results.json").exists()
    table = (sweep_dir / "summary.md").read_text()
    assert "| 1 | pruned |" in table and table.count("| complete |") == 2
    client = MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "sweep-test"]
    runs = {run.info.run_name: run.info.status for run in client.search_runs([experiment.experiment_id])}
    assert runs == {"trial_000": "FINISHED", "trial_001": "KILLED", "trial_002": "FINISHED"}
    best = load_config(str(sweep_dir / "best.yaml"), [])
    assert best.eval.generation_max_length == GOOD and best.train.max_steps == 4 and best.output_dir.endswith("best-run")


def has_completed(sweep_dir) -> bool:
    """A trial of the child's sweep has completed; the SQLite file exists a moment before the study is recorded in
    it, and reading it then raises KeyError."""
    try:
        return bool(trials_by_state(sweep_dir).get("COMPLETE"))
    except KeyError:
        return False


@pytest.mark.slow  # three trials in a child process, killed and continued: about a minute on 2 busy cores
def test_a_sweep_killed_with_kill_9_continues_from_its_storage(tmp_path, decoding_checkpoint, session_cache_dir):
    sweep_dir = tmp_path / "sweep"
    command = script_command("sweep", *sweep_args(tmp_path, decoding_checkpoint, session_cache_dir, sweep_dir,
                                                   "--heartbeat_s", "1"))
    env = child_env()
    process = subprocess.Popen(command, env=env, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if (sweep_dir / "study.db").exists() and has_completed(sweep_dir):
            break
        time.sleep(0.2)
    process.kill()
    process.wait()
    before = trials_by_state(sweep_dir)
    assert len(before["COMPLETE"]) == 1 and "PRUNED" not in before, "killed too late"
    first = before["COMPLETE"][0]
    time.sleep(3)  # past the grace period (2 heartbeats) of the killed trial's last heartbeat
    resumed = subprocess.run(command, env=env, cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ": 0 trials so far" not in resumed.stdout and "trials so far" in resumed.stdout
    after = trials_by_state(sweep_dir)
    assert after["COMPLETE"][0].number == first.number
    assert after["COMPLETE"][0].datetime_complete == first.datetime_complete  # not run again
    assert len(after["COMPLETE"]) + len(after["PRUNED"]) == 3
    assert [t.params[OPTION] for t in after["PRUNED"]] == [BAD]
    assert len(after.get("FAIL", [])) == len(before.get("RUNNING", []))  # the killed trial, failed and run again
