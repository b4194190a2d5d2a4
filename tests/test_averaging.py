"""scripts/average_checkpoints.py: the averaged folder holds exactly the mean of the checkpoints' weights, loads as
an ordinary Whisper like best/, and is scored on a split."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loop.model.loading import load_for_inference
from loop.train import fit, setup
from tests.helpers import load_script, reset_accelerate, run_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, fast_model, session_cache_dir):
    """A 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("averaging") / "run"
    config = run_config(run_dir, fast_model, session_cache_dir, "--data.max_train_samples=24",
                        "--data.selection_size=8", "--data.max_eval_samples=4", "--train.per_device_train_batch_size=8",
                        "--train.learning_rate=3e-3", "--train.report_to=none", "--eval.per_device_eval_batch_size=8",
                        "--eval.generation_max_length=8", "--train.max_steps=4", "--train.save_steps=2",
                        "--eval.eval_steps=2")
    assert fit(setup(config)) == ""
    reset_accelerate()
    return run_dir


def test_two_checkpoints_average_to_the_mean_of_their_weights(trained_run, tmp_path):
    output = tmp_path / "avg"
    code = load_script("average_checkpoints").main(
        [str(trained_run), "--last", "2", "--output", str(output), "--output_dir", str(tmp_path / "eval"),
         "--data.max_eval_samples=4", "--eval.generation_max_length=8"])
    assert code == 0
    first, second = (load_file(str(trained_run / "checkpoints" / f"step_{s}" / "model.safetensors")) for s in (2, 4))
    averaged = load_file(str(output / "model.safetensors"))
    assert set(first) <= set(averaged)
    assert all(torch.equal(averaged[k], (first[k] + second[k]) / 2) for k in first)
    assert sum(not torch.equal(first[k], second[k]) for k in first) > len(first) // 2  # the two really differ
    model, processor = load_for_inference(str(output))  # an ordinary model folder, like best/
    assert model.generation_config.language is not None and processor.tokenizer is not None
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_utterances"] == 4 and 0 <= metrics["wer"]
    assert (tmp_path / "eval" / "predictions.jsonl").read_text().count("\n") == 4


def test_asking_for_more_checkpoints_than_kept_says_so(trained_run, tmp_path, capsys):
    code = load_script("average_checkpoints").main([str(trained_run), "--last", "3", "--no_eval"])
    assert code == 2
    assert "holds 2 complete checkpoints, fewer than --last 3" in capsys.readouterr().err
