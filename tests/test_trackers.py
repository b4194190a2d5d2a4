"""`train.report_to`: one small run logging to TensorBoard, MLflow (a file store) and wandb (offline) at once, read back
through each library's own API: the same scalars at the same steps, the config as hyperparameters, the evaluation
examples as tables and best/'s results at the end. Nothing needs a network."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from loop.config import ConfigError
from loop.config.loading import load_config
from loop.run.trackers import build_trackers
from loop.train import train
from tests.helpers import run_config, tensorboard_scalars

pytestmark = pytest.mark.usefixtures("single_thread")
SCALARS = ("train/loss", "train/learning_rate", "train/grad_norm", "eval/wer", "eval/loss", "test/wer")
WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32-KiB blocks of records, each with a 7-byte header
WANDB_HEADER = 7  # the file's own header (":W&B", a magic number, a version) and each record's (crc, length, type)


def wandb_records(path: Path):
    """The protobuf records (`wandb_internal_pb2.Record`) of an offline run's .wandb file. wandb 0.2x+ ships no
    reader of its own, so this follows its log format: records split over blocks (FULL=1, FIRST=2, MIDDLE=3,
    LAST=4), a block's tail under 7 bytes padded with zeros."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = path.read_bytes(), WANDB_HEADER, b""
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    while position + WANDB_HEADER <= len(data):
        left_in_block = WANDB_BLOCK - position % WANDB_BLOCK
        if left_in_block < WANDB_HEADER:
            position += left_in_block
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + WANDB_HEADER:position + WANDB_HEADER + length]
        position += WANDB_HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def wandb_run(output_dir: Path) -> dict:
    """history (tag -> {step: value}), config and summary (key -> value) of the one offline run under output_dir."""
    (path,) = Path(output_dir, "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, dict[int, float]] = {}
    config, summary = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                history.setdefault(item_key(item), {})[record.history.step.num] = json.loads(item.value_json)
        elif kind == "config":
            config.update({item_key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({item_key(item): json.loads(item.value_json) for item in record.summary.update})
    return {"history": history, "config": config, "summary": summary}


def test_tensorboard_mlflow_and_wandb_get_the_same_scalars(tmp_path, fast_model, session_cache_dir, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    config = run_config(out, fast_model, session_cache_dir, "--data.max_train_samples=24", "--data.selection_size=8",
                        "--data.max_eval_samples=4", "--train.per_device_train_batch_size=8",
                        "--train.learning_rate=3e-3", "--eval.per_device_eval_batch_size=8",
                        "--eval.generation_max_length=8", "--train.max_steps=4", "--train.save_steps=4",
                        "--eval.eval_steps=2", "--eval.num_logged_examples=3",
                        "--train.report_to=tensorboard,wandb,mlflow", "--train.tracker_project=tracker-test")
    results = train(config)

    board = {tag: tensorboard_scalars(out, tag) for tag in SCALARS}
    assert sorted(board["train/loss"]) == [1, 2, 3, 4] and sorted(board["eval/wer"]) == [2, 4]

    client = MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tracker-test"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "run" and mlflow_run.info.status == "FINISHED"
    for tag in SCALARS:
        logged = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, tag)}
        assert logged == pytest.approx(board[tag], rel=1e-6), tag  # TensorBoard keeps float32
    assert mlflow_run.data.params["train.learning_rate"] == "0.003"
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert "results.json" in artifacts and "eval" in artifacts
    saved = json.loads(Path(client.download_artifacts(mlflow_run.info.run_id, "results.json", str(tmp_path))).read_text())
    assert saved["test_wer"] == results["test_wer"]
    table = json.loads(Path(client.download_artifacts(mlflow_run.info.run_id, "eval/examples_step_4.json",
                                                      str(tmp_path))).read_text())
    assert table["columns"] == ["reference", "prediction"] and len(table["data"]) == 3

    wandb = wandb_run(out)
    for tag in SCALARS:
        assert wandb["history"][tag] == pytest.approx(board[tag], rel=1e-6), tag
    assert wandb["config"]["train.learning_rate"] == 0.003
    assert wandb["summary"]["results/test_wer"] == results["test_wer"]
    # A wandb.Table is logged as a reference to its file: nested keys under the table's name.
    assert wandb["history"]["eval/examples._type"][4] == "table-file"
    assert wandb["history"]["eval/examples.nrows"] == {2: 3, 4: 3}


def test_a_tracker_without_its_package_is_named_with_the_extra(tmp_path):
    missing = next((name for name in ("aim", "comet_ml", "clearml", "dvclive", "swanlab")
                    if importlib.util.find_spec(name) is None), None)
    if missing is None:
        pytest.skip("every optional tracker is installed here")
    config = load_config("quickstart", [f"--train.report_to=tensorboard,{missing}"], str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=rf"train.report_to={missing} needs the {missing} package: "
                                          r"pip install -e '\.\[trackers\]'"):
        build_trackers(config)


def test_unknown_trackers_and_none_with_others_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.report_to: neptune is not one of none, tensorboard, wandb"):
        load_config("quickstart", ["--train.report_to=tensorboard,neptune"], str(tmp_path))
    with pytest.raises(ConfigError, match="`none` cannot go with other trackers"):
        load_config("quickstart", ["--train.report_to=none,wandb"], str(tmp_path))
    assert build_trackers(load_config("quickstart", ["--train.report_to=none"], str(tmp_path))) is None
