"""`train.ema_decay`: the average after 3 steps equals one computed by hand from the checkpoints' weights, the
model trains on its own weights while evaluation and best/ use the average, and a resumed run's average is
bitwise the uninterrupted one's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loop.config import ConfigError
from loop.run.ema import EMA_FILE
from loop.train import fit, setup
from tests.helpers import StopAt, load_script, reset_accelerate, run_config

pytestmark = pytest.mark.usefixtures("single_thread")
DECAY = 0.5  # far from 1, so three steps move the average well away from the starting weights
SMALL = ("--data.max_train_samples=24", "--data.selection_size=8", "--data.max_eval_samples=4",
         "--train.per_device_train_batch_size=8", "--train.learning_rate=3e-3", "--train.report_to=none",
         "--eval.per_device_eval_batch_size=8", "--eval.generation_max_length=8", "--model.dropout=0",
         f"--train.ema_decay={DECAY}")


@pytest.fixture
def determinism_restored():
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


def checkpoint_file(run_dir, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{step}" / name))


def test_the_average_after_three_steps_is_the_hand_computed_one(tmp_path, fast_model, session_cache_dir):
    config = run_config(tmp_path / "run", fast_model, session_cache_dir, *SMALL, "--train.max_steps=3",
                        "--train.save_steps=1", "--train.save_total_limit=3", "--eval.eval_steps=3")
    run = setup(config)
    assert fit(run) == ""
    start = load_file(str(fast_model / "model.safetensors"))
    steps = [checkpoint_file(tmp_path / "run", step, "model.safetensors") for step in (1, 2, 3)]
    ema = checkpoint_file(tmp_path / "run", 3, EMA_FILE)
    assert ema.keys() == {name for name, p in run.model.named_parameters() if p.requires_grad}
    for name, average in ema.items():
        expected = start[name].double()
        for weights in steps:
            expected = DECAY * expected + (1 - DECAY) * weights[name].double()
        torch.testing.assert_close(average.double(), expected, rtol=0, atol=1e-6)
    # The checkpoints hold the trained weights, not the average (the swap for the evaluation at step 3 was undone),
    # and they moved: the average is not any of them.
    moved = [name for name in ema if not torch.allclose(ema[name], steps[-1][name], atol=1e-5)]
    assert len(moved) > len(ema) // 2
    # Step 3's evaluation chose best/: it holds the average; so does the folder of step 3's EMA.
    best = load_file(str(tmp_path / "run" / "best" / "model.safetensors"))
    assert all(torch.equal(best[name], ema[name]) for name in ema)
    reset_accelerate()
    code = load_script("average_checkpoints").main([str(tmp_path / "run"), "--last", "1", "--ema", "--no_eval"])
    assert code == 0
    final_ema = load_file(str(tmp_path / "run" / "average-ema-last-1" / "model.safetensors"))
    assert all(torch.equal(final_ema[name], ema[name]) for name in ema)


@pytest.mark.usefixtures("determinism_restored")
def test_a_resumed_average_is_bitwise_the_uninterrupted_one(tmp_path, fast_model, session_cache_dir):
    common = (*SMALL, "--train.max_steps=4", "--train.save_steps=2", "--eval.eval_steps=2",
              "--train.deterministic=true", "--train.ema_on_cpu=true")
    run = setup(run_config(tmp_path / "straight", fast_model, session_cache_dir, *common))
    assert fit(run) == ""
    reset_accelerate()
    config = run_config(tmp_path / "resumed", fast_model, session_cache_dir, *common)
    run = setup(config)
    assert fit(run, StopAt(run, 2)) == "SIGTERM"
    reset_accelerate()
    config.train.resume = True
    run = setup(config)
    assert run.state.step == 2
    assert fit(run) == ""
    for name in (EMA_FILE, "model.safetensors"):
        straight = checkpoint_file(tmp_path / "straight", 4, name)
        resumed = checkpoint_file(tmp_path / "resumed", 4, name)
        assert straight.keys() == resumed.keys()
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), name


def test_resuming_with_a_different_decay_is_refused(tmp_path, fast_model, session_cache_dir):
    config = run_config(tmp_path / "run", fast_model, session_cache_dir, *SMALL, "--train.max_steps=1",
                        "--eval.eval_steps=1")
    assert fit(setup(config)) == ""
    reset_accelerate()
    changed = run_config(tmp_path / "run", fast_model, session_cache_dir, *SMALL, "--train.max_steps=2",
                         "--eval.eval_steps=1", "--train.resume=true", "--train.ema_decay=0.9")
    with pytest.raises(ConfigError, match="train.ema_decay"):
        setup(changed)


def test_with_lora_the_average_is_of_the_adapters_and_resumes(tmp_path, fast_model, session_cache_dir):
    """LoRA: only the adapters train, so only they are averaged; the checkpoint holds them beside the adapter, a
    resumed run reads them back, and the model trains on its own adapters after each evaluation."""
    common = (*SMALL, "--model.lora=true", "--train.learning_rate=1e-2", "--train.save_steps=2", "--eval.eval_steps=2")
    config = run_config(tmp_path / "run", fast_model, session_cache_dir, *common, "--train.max_steps=2")
    run = setup(config)
    assert fit(run) == ""
    ema = checkpoint_file(tmp_path / "run", 2, EMA_FILE)
    trainable = {name: p.detach().clone() for name, p in run.model.named_parameters() if p.requires_grad}
    assert ema.keys() == trainable.keys() and all("lora_" in name for name in ema)
    assert any(not torch.equal(ema[name], trainable[name]) for name in ema)  # the model kept its own adapters
    reset_accelerate()
    resumed = setup(run_config(tmp_path / "run", fast_model, session_cache_dir, *common, "--train.max_steps=4",
                               "--train.resume=true"))
    assert all(torch.equal(resumed.ema.shadow[name].cpu(), ema[name]) for name in ema)
