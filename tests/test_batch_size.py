"""scripts/find_batch_size.py, `train.per_device_train_batch_size=auto` and loop/run/batch_size.py: the search finds
the exact boundary of a device that runs out of memory above a size (a stand-in device; the steps themselves are the
loop's real ones, on CPU), suggests the accumulation that keeps the preset's effective batch, trains with it (and a
resumed run with the same), and on a machine without a GPU explains and stops."""

from __future__ import annotations

import json

import pytest
import torch

from loop.config import ConfigError
from loop.config.loading import load_config
from loop.run.batch_size import MemoryCap, largest_batch, suggestion
from loop.train import train
from tests.helpers import load_script, reset_accelerate

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("fits", "limit", "expected"), [(37, 512, 37), (1, 64, 1), (0, 64, 0), (1000, 100, 100),
                                                         (64, 64, 64), (100, 100, 100), (99, 100, 99)])
def test_the_search_finds_the_boundary(fits, limit, expected):
    device, stepped = MemoryCap(fits), []
    assert largest_batch(device, stepped.append, limit, log=lambda line: None) == expected
    assert stepped == [size for size in device.tried if size <= fits]  # a step ran for every size that fitted
    assert len(device.tried) <= 2 * limit.bit_length() + 1  # doubling then bisecting, not one size at a time


def test_the_suggestion_keeps_the_effective_batch():
    assert suggestion(37, 0.1, 64) == (32, 2)  # 33 allowed: 2 x 32 = 64
    assert suggestion(100, 0.1, 64) == (64, 1)
    assert suggestion(5, 0.0, 16) == (4, 4)
    assert suggestion(1, 0.5, 16) == (1, 16)


def test_the_script_runs_real_steps_up_to_the_boundary(fast_model, session_cache_dir, capsys):
    device = MemoryCap(6)
    code = load_script("find_batch_size").main(
        ["--config", "quickstart", f"--model.name_or_path={fast_model}", f"--data.cache_dir={session_cache_dir}",
         "--data.num_proc=1", "--data.max_train_samples=24", "--data.selection_size=8", "--data.max_eval_samples=4",
         "--train.mixed_precision=no", "--max_batch_size=16"], device=device)
    out = capsys.readouterr().out
    assert code == 0, out
    assert device.tried == [1, 2, 4, 8, 6, 7]
    assert "largest batch that fits: 6" in out
    # quickstart: 16 x 1 per process; 6 less 10% -> at most 5 a step -> 4 x 4
    assert "--train.per_device_train_batch_size=4 --train.gradient_accumulation_steps=4" in out
    assert "full window" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_on_cpu_the_script_explains_and_stops(capsys):
    assert load_script("find_batch_size").main(["--config", "quickstart"]) == 2
    assert "needs an accelerator (a CUDA GPU)" in capsys.readouterr().err


def auto_options(fast_model, cache_dir, *more: str) -> list[str]:
    return [f"--model.name_or_path={fast_model}", f"--data.cache_dir={cache_dir}", "--data.num_proc=1",
            "--data.max_train_samples=80", "--data.selection_size=8", "--data.max_eval_samples=4",
            "--train.mixed_precision=no", "--train.per_device_train_batch_size=auto", "--eval.eval_steps=100",
            "--train.report_to=none", *more]


def loop_state(run_dir, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step}" / "loop_state.json").read_text())


def test_auto_trains_with_the_batch_the_search_chose_and_a_resume_keeps_it(fast_model, session_cache_dir, tmp_path,
                                                                           capsys):
    run_dir = tmp_path / "run"
    config = load_config("quickstart", auto_options(fast_model, session_cache_dir, "--train.max_steps=2",
                                                    "--train.save_steps=2"), str(run_dir))
    assert config.train.auto_effective_batch == 16  # quickstart's 16 x 1, which `auto` replaced
    device = MemoryCap(6)
    results = train(config, device=device)
    out = capsys.readouterr().out
    assert device.tried == [1, 2, 4, 8, 6, 7]  # the script's search: real steps up to the boundary
    # 6 less 10% -> at most 5 rows -> 4 micro-batches of 4 keep the 16 utterances a step
    assert ("per_device_train_batch_size=auto: batches of 6 rows fit; training with "
            "--train.per_device_train_batch_size=4 --train.gradient_accumulation_steps=4") in out
    saved = json.loads((run_dir / "config.json").read_text())["train"]
    assert (saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"]) == (4, 4)
    assert results["effective_batch_size"] == 16 and results["steps"] == 2
    # The loader really gave micro-batches of 4: 2 steps took 8 of them (16 x 1 would have taken 2).
    assert loop_state(run_dir, 2)["batches_in_epoch"] == 8 and loop_state(run_dir, 2)["epoch"] == 0
    reset_accelerate()

    # Resumed, the run keeps its choice without searching, even on a device where another one would come out
    # (1 x 16), which the resume would refuse as a change of batch.
    resumed = load_config("quickstart", auto_options(fast_model, session_cache_dir, "--train.max_steps=4",
                                                     "--train.save_steps=2", "--train.resume=true"), str(run_dir))
    smaller = MemoryCap(2)
    results = train(resumed, device=smaller)
    assert smaller.tried is None
    assert "resuming with the batch this run chose, 4 x 4 accumulation" in capsys.readouterr().out
    assert results["steps"] == 4 and loop_state(run_dir, 4)["batches_in_epoch"] == 16


def test_auto_keeps_the_presets_effective_batch_and_is_typed(capsys):
    config = load_config("whisper-small-hi", ["--data.path=assets/cv-corpus-17.0-synthetic",
                                              "--train.per_device_train_batch_size=auto"])
    assert (config.train.per_device_train_batch_size, config.train.auto_effective_batch) == ("auto", 16)  # 8 x 2
    assert load_config("quickstart", ["--train.per_device_train_batch_size=auto",
                                      "--train.auto_effective_batch=64"]).train.auto_effective_batch == 64
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", ["--train.per_device_train_batch_size=many"])
    assert caught.value.problems == [
        "command line: train.per_device_train_batch_size: expected an integer or auto, got 'many'"]
    with pytest.raises(SystemExit):
        load_script("train").main(["--help"])
    assert "--train.per_device_train_batch_size=16 (>= 1 or auto)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_on_cpu_auto_explains_and_stops_in_one_line(tmp_path, capsys):
    code = load_script("train").main(["--config", "quickstart", "--output_dir", str(tmp_path / "run"),
                                      "--train.per_device_train_batch_size=auto"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: train.per_device_train_batch_size=auto needs an accelerator (a CUDA GPU)")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # stopped before anything was prepared or written
