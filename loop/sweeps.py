"""Hyperparameter sweeps over the real loop with Optuna (`scripts/sweep.py`): TPE sampling, median pruning on the
selection WER that each evaluation reports, trials kept in an Optuna storage.

Each trial is an ordinary run (`train()`, in this process) in `<sweep_dir>/trial_<N>/`, with the preset, the
command line's options and the trial's values as its config; its objective is the run's best selection WER (the
test split never chooses). The pruner sees `eval/wer` through a tracker (`PruningTracker`) the loop logs to like any
other, and stops a trial by raising `optuna.TrialPruned` from it.

The storage (SQLite by default, any SQLAlchemy URL for several machines working on one study) records every trial
as it ends, so a sweep killed with kill -9 continues where it was: finished trials are kept, the one that was
running is marked failed once its heartbeat is older than the grace period, and run again with the same values
(`RetryHeartbeatStaleTrialCallback`). `--trials N` counts finished trials (complete or pruned) of the whole study.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from accelerate.tracking import GeneralTracker

from loop.config import ConfigError, option_names, to_dict
from loop.config.loading import load_config
from loop.files import write_text_atomic
from loop.run.accelerator import reset_state
from loop.run.trackers import end_open_runs

SELECTION_WER = "eval/wer"  # what each in-loop evaluation logs for the selection split
KINDS = ("float", "int", "categorical")


class MissingPackage(RuntimeError):
    """Optuna is not installed."""


@dataclass
class Dimension:
    """One option of the search space: `float`/`int` between `low` and `high` (`log`: on a log scale), or one of
    `choices`."""

    option: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: list | None = None


def load_space(path: str | Path) -> list[Dimension]:
    """A search space YAML: `section.key: {type: float, low: 1e-5, high: 1e-3, log: true}`, `{type: int, low, high}`
    or `{type: categorical, choices: [...]}` per option. Raises ConfigError listing every problem."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError([f"--space {path}: cannot read it ({' '.join(str(error).split())})"]) from error
    if not isinstance(values, dict) or not values:
        raise ConfigError([f"--space {path}: expected a mapping of options, e.g. train.learning_rate: "
                           "{type: float, low: 1.0e-5, high: 1.0e-3, log: true}"])
    known, problems, space = set(option_names()), [], []
    for option, spec in values.items():
        where = f"{path}: {option}"
        if option not in known:
            problems.append(f"{where}: no such option (options look like train.learning_rate)")
            continue
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            problems.append(f"{where}: expected a mapping whose type is one of {', '.join(KINDS)}, got {spec!r}")
            continue
        dimension = Dimension(option, spec["type"], spec.get("low"), spec.get("high"), bool(spec.get("log", False)),
                              spec.get("choices"))
        problems += _dimension_problems(dimension, where)
        space.append(dimension)
    if problems:
        raise ConfigError(problems)
    return space


def _dimension_problems(d: Dimension, where: str) -> list[str]:
    if d.kind == "categorical":
        ok = isinstance(d.choices, list) and d.choices and all(isinstance(c, (str, int, float, bool)) for c in d.choices)
        return [] if ok else [f"{where}: categorical needs `choices`, a list of numbers, strings or booleans"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (d.low, d.high)):
        return [f"{where}: {d.kind} needs numbers `low` and `high`"]
    if d.low >= d.high or (d.log and d.low <= 0):
        return [f"{where}: needs low < high (and low > 0 with log: true), got {d.low} and {d.high}"]
    return []


def option_value(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def suggest(trial, space: list[Dimension]) -> list[str]:
    """The trial's values as command-line overrides."""
    overrides = []
    for d in space:
        if d.kind == "float":
            value = trial.suggest_float(d.option, d.low, d.high, log=d.log)
        elif d.kind == "int":
            value = trial.suggest_int(d.option, int(d.low), int(d.high), log=d.log)
        else:
            value = trial.suggest_categorical(d.option, d.choices)
        overrides.append(f"--{d.option}={option_value(value)}")
    return overrides


class PruningTracker(GeneralTracker):
    """An Accelerate tracker that reports each selection WER to the trial and stops the run when the pruner says
    so. One process only: the exception is raised on the main process."""

    name = "optuna"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, trial):
        super().__init__()
        self.trial = trial

    @property
    def tracker(self):
        return self.trial

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        import optuna

        if SELECTION_WER in values and step is not None:
            self.trial.report(float(values[SELECTION_WER]), step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"selection WER {values[SELECTION_WER]:.2f} at step {step}: pruned")


@dataclass
class SweepSettings:
    storage: str
    """An Optuna storage URL (sqlite:///path/study.db, postgresql://...)."""
    study: str
    seed: int = 0
    """TPE's seed."""
    prune_startup_trials: int = 5
    """Finished trials before the median pruner prunes."""
    prune_warmup_steps: int = 0
    """Optimizer steps of each trial before it may be pruned."""
    heartbeat_s: int = 60
    """A running trial writes a heartbeat this often; one silent for twice as long is failed and run again."""


def open_study(settings: SweepSettings):
    """The study in `settings.storage`, created or continued."""
    try:
        import optuna
        from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    except ImportError as error:
        raise MissingPackage("scripts/sweep.py needs Optuna: pip install -e '.[sweep]'") from error
    with warnings.catch_warnings():  # heartbeats are marked experimental (since Optuna 2.8): not news to a user
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(settings.storage, heartbeat_interval=settings.heartbeat_s,
                             grace_period=2 * settings.heartbeat_s,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    return optuna.create_study(
        storage=storage, study_name=settings.study, direction="minimize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=settings.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=settings.prune_startup_trials,
                                           n_warmup_steps=settings.prune_warmup_steps),
    )


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_sweep(study, preset: str | None, overrides: list[str], space: list[Dimension], sweep_dir: Path, trials: int,
              train_fn: Callable, enqueue: list[dict] = ()) -> None:
    """Runs trials until the study holds `trials` finished ones. `train_fn(config, trackers)` is the loop's
    `train`; `enqueue`: values to try first (a new study only: a continued one already holds them)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    if not study.trials:
        for values in enqueue:
            study.enqueue_trial(values)

    def objective(trial) -> float:
        folder = sweep_dir / f"trial_{trial.number:03d}"
        trial.set_user_attr("output_dir", str(folder))
        config = load_config(preset, [*overrides, *suggest(trial, space)], str(folder))
        try:
            results = train_fn(config, (PruningTracker(trial),))
        finally:
            end_open_runs()  # a pruned trial stopped before its trackers were closed
            reset_state()  # the next trial builds its own Accelerator
        if "best_wer" not in results:  # stopped by a signal: the sweep stops too
            raise KeyboardInterrupt(f"trial {trial.number} stopped by {results.get('stopped')}")
        trial.set_user_attr("test_wer", results.get("test_wer"))
        return results["best_wer"]

    left = trials - finished(study)
    if left > 0:
        study.optimize(objective, callbacks=[MaxTrialsCallback(trials, states=(TrialState.COMPLETE,
                                                                               TrialState.PRUNED))])


def summary(study) -> str:
    """A Markdown table of the study's trials: number, state, selection WER, last reported step, values."""
    names = sorted({name for trial in study.trials for name in trial.params})
    lines = ["| trial | state | best selection WER | last evaluated step | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for trial in study.trials:
        value = trial.value if trial.value is not None else (
            min(trial.intermediate_values.values()) if trial.intermediate_values else math.nan)
        last = max(trial.intermediate_values, default="")
        lines.append(f"| {trial.number} | {trial.state.name.lower()} | {value:.2f} | {last} | "
                     + " | ".join(_shown(trial.params.get(name, "")) for name in names) + " |")
    return "\n".join(lines) + "\n"


def _shown(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else option_value(value)


def write_best_preset(study, preset: str | None, overrides: list[str], path: Path, output_dir: str) -> Path:
    """The best complete trial's config (the preset, the command line and its values) as a YAML preset."""
    best = study.best_trial
    values = [f"--{name}={option_value(value)}" for name, value in best.params.items()]
    config = load_config(preset, [*overrides, *values], output_dir)
    header = (f"# The best trial ({best.number}, selection WER {best.value:.2f}) of sweep study {study.study_name!r}:\n"
              f"#   {' '.join(values)}\n"
              "# Trials were short: raise train.max_steps (and eval/save steps) for the real run.\n"
              f"#   python scripts/train.py --config {path}\n")
    write_text_atomic(path, header + yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
    return path
