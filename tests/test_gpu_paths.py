"""The GPU code paths a CPU can run (issue 21's findings): fp16's GradScaler driving the loop's own step, half
weights without autocast, the cross-entropy kernel, the process-group timeout, the disk estimate of DTensors,
LoRA under a sharded engine, compile after wrapping.

fp16 on the CPU: Accelerate gives a CPU run no GradScaler (it has no fp16 autocast there), so `fp16_as_on_a_gpu`
puts on the run's Accelerator what `Accelerator.__init__` and `prepare()` give a CUDA fp16 run (a GradScaler, the
optimizer wrapped with it, `native_amp`, the mixed precision "fp16"), with torch's CPU GradScaler. Everything after
it is Accelerate's and the loop's own code: `accelerator.backward` scales, `clip_grad_norm_` unscales,
`loop.train.optimizer_step` decides."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from loop.eval.evaluation import evaluate
from loop.model.loss import IGNORE_INDEX, token_losses
from loop.train import endless_batches, optimizer_step, setup
from tests.helpers import PROJECT, run_config
from tests.test_faults import spoil_training_logits

pytestmark = pytest.mark.usefixtures("single_thread")


def small_config(tmp_path, fast_model, cache_dir, *extra):
    return run_config(tmp_path / "run", fast_model, cache_dir, "--data.max_train_samples=16",
                      "--data.max_eval_samples=4", "--data.selection_size=4", "--train.per_device_train_batch_size=4",
                      "--eval.generation_max_length=16", "--train.report_to=none", "--train.mixed_precision=no",
                      *extra)


def fp16_as_on_a_gpu(run, init_scale: float):
    """The run with what Accelerate sets up for fp16 on a GPU (see the module docstring); returns (run, scaler)."""
    from accelerate.optimizer import AcceleratedOptimizer

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    accelerator = run.accelerator
    accelerator.scaler, accelerator.native_amp = scaler, True
    accelerator.state._mixed_precision = "fp16"
    inner = run.optimizer.optimizer
    optimizer = AcceleratedOptimizer(inner, device_placement=False, scaler=scaler)
    accelerator._optimizers = [optimizer]
    return dataclasses.replace(run, optimizer=optimizer), scaler


def spoil_gradients(parameter, spoiled):
    """Multiplies `parameter`'s gradient by inf in the n-th backward pass (from 1) when `spoiled(n)`: the loss stays
    finite, the gradients overflow, as fp16's do."""
    passes = itertools.count(1)
    return parameter.register_hook(lambda grad: grad * math.inf if spoiled(next(passes)) else grad)


def test_fp16_a_nan_step_is_skipped_by_the_scaler_and_the_next_step_trains(tmp_path, fast_model, session_cache_dir):
    """Finding 1: a non-finite loss under fp16 is the scaler's to skip. Skipping `optimizer.step()` by hand left the
    scaler unscaled, and the next step raised "unscale_() has already been called"."""
    run, scaler = fp16_as_on_a_gpu(setup(small_config(tmp_path, fast_model, session_cache_dir)), init_scale=2.0**10)
    spoil_training_logits(run.model, lambda n: n == 2, float("nan"))  # one micro-batch a step: step 2
    batches = endless_batches(run)
    losses = [optimizer_step(run, batches).loss_sum for _ in range(3)]
    assert math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isfinite(losses[2])
    assert run.state.nonfinite_steps == 1 and run.state.consecutive_nonfinite == 0
    assert scaler.get_scale() == 2.0**9  # lowered once, by the overflow
    assert run.scheduler.scheduler.last_epoch == 2  # the schedule advanced on the two steps taken
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_fp16_fused_adamw_overflow_is_counted_and_holds_the_schedule(tmp_path, fast_model, session_cache_dir):
    """Finding 2: fused AdamW (the loop's) is always called by the scaler, so Accelerate's
    `optimizer_step_was_skipped` stays False; the loop reads the scale instead. Gradients overflow on step 1 with
    a finite loss."""
    run, scaler = fp16_as_on_a_gpu(setup(small_config(tmp_path, fast_model, session_cache_dir)), init_scale=2.0**10)
    assert run.optimizer.optimizer.defaults["fused"]
    conv = run.model.get_encoder().conv1.weight
    spoil_gradients(conv, lambda n: n == 1)
    before = conv.detach().clone()
    batches = endless_batches(run)
    first = optimizer_step(run, batches)
    assert math.isfinite(first.loss_sum) and torch.equal(conv.detach(), before)  # not updated
    assert run.state.nonfinite_steps == 1 and run.scheduler.scheduler.last_epoch == 0
    optimizer_step(run, batches)
    optimizer_step(run, batches)
    assert run.state.nonfinite_steps == 1 and run.scheduler.scheduler.last_epoch == 2
    assert scaler.get_scale() == 2.0**9 and not torch.equal(conv.detach(), before)


def test_half_weights_without_autocast_get_half_features_in_step_loss_and_evaluation(tmp_path, fast_model,
                                                                                    session_cache_dir):
    """Finding 3: under DeepSpeed Accelerate runs no autocast and the engine's weights are bf16/fp16; the float32
    log-mel then failed at the first convolution (in the evaluation each batch failed and was left out)."""
    run = setup(small_config(tmp_path, fast_model, session_cache_dir))
    run.model.to(torch.bfloat16)  # in place: the optimizer keeps the same parameters
    assert not torch.is_autocast_enabled("cpu")
    figures = optimizer_step(run, endless_batches(run))
    assert math.isfinite(figures.loss_sum) and run.state.nonfinite_steps == 0
    result = evaluate(run.model, run.selection_loader, run.accelerator, run.processor.tokenizer,
                      run.data.selection["text"], run.config.model.language, log_mel=run.log_mel)
    assert result.metrics["num_failed"] == 0 and result.metrics["num_utterances"] == len(run.data.selection)
    assert math.isfinite(result.metrics["loss"])


def test_the_token_loss_uses_the_flat_kernel_and_gives_the_same_values():
    """Finding 7: cross-entropy over (batch, vocabulary, length) is torch's nll_loss2d, which has no deterministic
    CUDA kernel (`train.deterministic` raised at the first step); over (batch x length, vocabulary) it is nll_loss,
    which has one. The same values within float32 rounding (closer to float64's than before)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    class Logits(torch.nn.Module):  # stands in for Whisper: token_losses reads .config and .logits
        config = type("Config", (), {"pad_token_id": 0, "decoder_start_token_id": 1})()

        def forward(self, input_features, decoder_input_ids, **kwargs):
            generator = torch.Generator().manual_seed(0)
            logits = torch.randn(*decoder_input_ids.shape, 51865, generator=generator) * 4
            return type("Output", (), {"logits": logits})()

    labels = torch.randint(0, 51865, (3, 7), generator=torch.Generator().manual_seed(1))
    labels[0, 5:] = IGNORE_INDEX
    batch = {"labels": labels, "input_features": torch.zeros(3, 80, 10)}
    with Ops() as ops:
        losses = token_losses(Logits(), batch)
    assert not any("nll_loss2d" in name for name in ops.names) and any("nll_loss" in n for n in ops.names)
    logits = Logits()(None, labels).logits
    over_classes = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    exact = F.cross_entropy(logits.double().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    assert losses.shape == labels.shape and (losses[0, 5:] == 0).all()
    # Not bit for bit: the log-softmax sums the vocabulary in another order. The flat layout's is the closer one.
    assert (losses - exact).abs().max() <= (over_classes - exact).abs().max()
    torch.testing.assert_close(losses.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("environ, engine", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/deepspeed_zero3.json"},
     "DeepSpeed ZeRO-3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/deepspeed_zero2.json"},
     ""),
    ({}, ""),
], ids=["fsdp", "zero3-stage", "zero3-file", "zero2-file", "plain"])
def test_lora_under_a_sharding_engine_is_refused_before_loading(monkeypatch, tiny_model_dir, environ, engine):
    """Finding 6: LoRA's adapter checkpoints and its merge into best/ read whole parameters on the main process;
    under FSDP or ZeRO-3 (what `accelerate launch` puts in the environment) the run is refused with the ways out.
    ZeRO-2 and plain data parallel keep parameters whole: allowed."""
    from loop.config import ConfigError
    from loop.config.loading import load_config

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                 "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(PROJECT)  # accelerate launch gives the JSON file's path as the config file has it
    overrides = [f"--model.name_or_path={tiny_model_dir}", "--train.mixed_precision=no"]
    load_config("quickstart", overrides)  # without LoRA every engine is fine
    if not engine:
        load_config("quickstart", [*overrides, "--model.lora=true"])
        return
    with pytest.raises(ConfigError) as caught:
        load_config("quickstart", [*overrides, "--model.lora=true"])
    (problem,) = [p for p in caught.value.problems if "model.lora" in p]
    assert f"under {engine} is not supported" in problem and "--multi_gpu" in problem and "zero2" in problem


def test_the_process_group_timeout_is_the_configured_one(tmp_path, fast_model, session_cache_dir):
    """Finding 8: the loop's Accelerator sets the process group's timeout (NCCL's default is 10 minutes)."""
    from datetime import timedelta

    from loop.config.sections import TrainConfig

    assert TrainConfig().ddp_timeout_minutes == 60
    run = setup(small_config(tmp_path, fast_model, session_cache_dir, "--train.ddp_timeout_minutes=90"))
    assert run.accelerator.init_handler.timeout == timedelta(minutes=90)


def test_the_accelerate_floor_has_the_fsdp2_optimizer_resume_fix():
    """Finding 11: accelerate before 1.15 loads an FSDP2 sharded optimizer state with `dist_cp.load` and no
    planner, and a resume fails with "Missing key in checkpoint state_dict: optimizer.state.0.step"
    (accelerate#3971); 1.15 passes `DefaultLoadPlanner` (and can load per rank). Both dependency lists require it,
    and the installed one has it."""
    import inspect
    import re

    from accelerate.utils import fsdp_utils

    for name in ("pyproject.toml", "requirements.txt"):
        (floor,) = re.findall(r'accelerate>=([\d.]+)', (PROJECT / name).read_text())
        assert tuple(int(part) for part in floor.split(".")) >= (1, 15), name
    assert "DefaultLoadPlanner" in inspect.getsource(fsdp_utils.load_fsdp_optimizer)


def test_synced_generation_and_stops_stay_in_step_on_two_processes(tmp_path, decoding_checkpoint):
    """Finding 5 (ZeRO-3): with `generate(synced_gpus=True)` a process whose rows need no fallback must still sample
    as often as one whose rows do, or that one waits in generation's all-reduce forever. 2 gloo processes, real
    synced generation; rank 0's rows loop at every temperature."""
    import json
    import subprocess
    import sys

    from tests.helpers import child_env

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(PROJECT / "tests" / "synced_worker.py"), str(decoding_checkpoint), str(tmp_path)]
    done = subprocess.run(command, check=False, env=child_env(), capture_output=True, text=True, timeout=300,
                          cwd=PROJECT)
    assert done.returncode == 0, done.stderr[-4000:]
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["samples"] == [[0, 1]] * 5 and not first["unchanged"]  # every temperature, both rows
    assert second["samples"] == [[0]] * 5 and second["unchanged"]  # in step, its own ids kept
    # Finding 9: a stop signalled on rank 1 is agreed by both at the same step, every 10 steps (not every step)
    assert first["stops"] == second["stops"] == [10, 20]


def test_the_encoder_compiles_once_per_mode_for_every_dynamic_window(decoding_checkpoint):
    """Finding 10: at a dynamic window the encoder is compiled with dynamic shapes, so 4 window lengths x 2 batch
    sizes x train/eval give one graph per mode and branch (short, full window): 4, where torch's default (static
    first, then automatic dynamic shapes) compiled 7. A counting backend stands in for inductor (the CPU has
    minutes, not hours); outputs equal the uncompiled encoder's."""
    from loop.model.encoder_window import compile_encoder, full_window_frames
    from loop.model.loading import load_for_inference

    model, _ = load_for_inference(str(decoding_checkpoint), encoder_window="dynamic")
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    full = full_window_frames(model)
    encoder = model.get_encoder()
    inputs = [torch.randn(batch, model.config.num_mel_bins, frames - frames % 2, generator=torch.Generator().manual_seed(0))
              for batch in (4, 3) for frames in (full // 5, full // 3, full // 2, full)]
    torch.manual_seed(0)
    with torch.no_grad():
        expected = [encoder(features).last_hidden_state for features in inputs]
    compile_encoder(model, backend=counting)
    torch._dynamo.reset()
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            outputs = [encoder(features).last_hidden_state for features in inputs]
        if mode == "eval":
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs, expected))
    assert len(graphs) == 4
