"""scripts/find_batch_size.py and loop/run/batch_size.py: the search finds the exact boundary of a device that runs
out of memory above a size (a stand-in device; the steps themselves are the loop's real ones, on CPU), suggests the
accumulation that keeps the preset's effective batch, and on a machine without a GPU explains and stops."""

from __future__ import annotations

import pytest
import torch

from loop.run.batch_size import MemoryCap, largest_batch, suggestion
from tests.helpers import load_script

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
