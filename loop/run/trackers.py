"""The experiment trackers of `train.report_to`, through Accelerate: every tracker gets the same scalars
(`accelerator.log`), the flat config as hyperparameters, the evaluation examples as a table where it has one
(TensorBoard: a text table; wandb: a `wandb.Table`; MLflow: a JSON table artifact per evaluation) and at the end
`results.json` (wandb: the run summary; MLflow: an artifact; TensorBoard: text).

The trackers are built here rather than by name in Accelerate, for two reasons: Accelerate silently drops a tracker
whose package is missing (the run would log nothing and say nothing), and it passes one name to every tracker,
while TensorBoard's folder (`<output_dir>/tensorboard`) and the wandb project / MLflow experiment want different
ones. Offline use needs nothing from us: `WANDB_MODE=offline` keeps wandb's files under `<output_dir>/wandb`, and
`MLFLOW_TRACKING_URI` may name a folder (`file:/path/mlruns`) or an SQLite store (`sqlite:///mlflow.db`).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from loop.config import ConfigError, RunConfig, flat_hparams
from loop.run.output_dir import TENSORBOARD_DIR

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim", "comet_ml": "comet_ml",
            "clearml": "clearml", "dvclive": "dvclive", "trackio": "trackio", "swanlab": "swanlab"}
EXAMPLE_COLUMNS = ["reference", "prediction"]


def chosen(config: RunConfig) -> list[str]:
    return [name for name in config.train.report_to if name != "none"]


def build_trackers(config: RunConfig, extra: tuple = ()) -> list | None:
    """Accelerate tracker objects for `train.report_to` and the `extra` ones (None: logging off), for
    `Accelerator(log_with=...)`. A tracker whose package is not installed stops the run here with one line naming
    the extra to install."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    names = chosen(config)
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise ConfigError([f"train.report_to={name} needs the {PACKAGES[name]} package: pip install -e '.[trackers]'"
                           + ("" if name in ("wandb", "mlflow") else f" (or pip install {PACKAGES[name]})")
                           for name in missing])
    output_dir, run_name = Path(config.output_dir), Path(config.output_dir).resolve().name
    trackers = []
    for name in names:
        tracker_class = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            trackers.append(tracker_class(TENSORBOARD_DIR, output_dir))
        elif name == "wandb":
            trackers.append(tracker_class(config.train.tracker_project, name=run_name, dir=str(output_dir)))
        elif name == "mlflow":
            trackers.append(tracker_class(experiment_name=config.train.tracker_project, run_name=run_name))
        elif tracker_class.requires_logging_directory:  # aim: its repository in the run's folder
            trackers.append(tracker_class(config.train.tracker_project, str(output_dir)))
        else:
            trackers.append(tracker_class(config.train.tracker_project))
    return [*trackers, *extra] or None


def start_trackers(accelerator, config: RunConfig) -> None:
    """Starts the trackers and logs the config as hyperparameters (main process only; a no-op without trackers)."""
    if accelerator.log_with:
        accelerator.init_trackers(TENSORBOARD_DIR, config=flat_hparams(config))


def log_examples(accelerator, predictions: list[dict], step: int) -> None:
    """Reference/prediction pairs of one evaluation, as a table in each tracker that has tables."""
    if not accelerator.is_main_process or not predictions:
        return
    rows = [[p["reference"], p["hypothesis"]] for p in predictions]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            table = "| reference | prediction |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
            tracker.tracker.add_text("eval/examples", table, step)
        elif tracker.name == "wandb":
            tracker.log_table("eval/examples", columns=EXAMPLE_COLUMNS, data=rows, step=step)
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_table({column: [row[i] for row in rows] for i, column in enumerate(EXAMPLE_COLUMNS)},
                             artifact_file=f"eval/examples_step_{step}.json")


def report_results(accelerator, results: dict) -> None:
    """`results.json` of the finished run (best/'s test figures and how it was chosen) in each tracker."""
    if not accelerator.is_main_process:
        return
    scalars = {key: value for key, value in results.items() if isinstance(value, (int, float)) and
               not isinstance(value, bool)}
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            text = json.dumps(results, indent=2, ensure_ascii=False, default=str)
            tracker.tracker.add_text("results", f"```\n{text}\n```", 0)
        elif tracker.name == "wandb":
            tracker.tracker.summary.update({f"results/{key}": value for key, value in scalars.items()})
        elif tracker.name == "mlflow":
            import mlflow

            mlflow.log_dict(results, "results.json")


def end_open_runs() -> None:
    """Ends the wandb and MLflow runs that a run stopped by an exception (a pruned sweep trial) left open, so that
    the next run in this process starts its own instead of logging into them."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=1)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status="KILLED")
