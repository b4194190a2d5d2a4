"""The sharded engines: the accelerate configs in accelerate_configs/ as Accelerate reads them, the loop's evaluation
and best/ on a Whisper sharded with FSDP2 over 2 CPU processes (gloo), the SLURM example, and (GPU only) a
training run under each config that saves, resumes and writes best/.

Accelerate runs FSDP and DeepSpeed on accelerators only (on CPU processes it falls back to plain data parallel),
so on a CPU the FSDP2 sharding is applied by hand (tests/fsdp_worker.py) and the rest waits for a GPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import PROJECT, child_env

CONFIGS = PROJECT / "accelerate_configs"


def cluster_config(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def test_the_fsdp_config_wraps_whisper_layers_in_bf16_with_sharded_checkpoints(tiny_model_dir):
    """What `accelerate launch --config_file accelerate_configs/fsdp.yaml` hands the processes: FSDP2, one unit per
    WhisperEncoderLayer and WhisperDecoderLayer (both classes found in the model), bf16, sharded state dicts."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import StateDictType

    from loop.model.loading import load_weights

    config = cluster_config("fsdp.yaml")
    assert (config.distributed_type, config.mixed_precision) == ("FSDP", "bf16")
    fsdp = {key.removeprefix("fsdp_"): value for key, value in config.fsdp_config.items()}
    assert fsdp["version"] == 2
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["version"], auto_wrap_policy=fsdp["auto_wrap_policy"],
        transformer_cls_names_to_wrap=fsdp["transformer_layer_cls_to_wrap"],
        reshard_after_forward=fsdp["reshard_after_forward"], state_dict_type=fsdp["state_dict_type"],
        cpu_offload=fsdp["offload_params"], mixed_precision_policy=config.mixed_precision)
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT and plugin.reshard_after_forward is True
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    model = load_weights(str(tiny_model_dir))
    plugin.set_auto_wrap_policy(model)  # raises for a class name the model does not have
    wrapped = {type(module).__name__ for module in model.modules() if plugin.auto_wrap_policy(module, False, 0)}
    assert wrapped == {"WhisperEncoderLayer", "WhisperDecoderLayer"}


@pytest.mark.parametrize("stage", [2, 3])
def test_the_deepspeed_configs_leave_the_run_settings_to_the_loop(stage):
    """The ZeRO-2/3 configs point at their JSON, whose batch, accumulation, clipping and precision are "auto" (filled
    by Accelerate from the run), never beside a mixed_precision Accelerate would refuse; ZeRO-3 gathers 16-bit
    weights on save (best/). DeepSpeed itself is not installed here: structure only."""
    config = cluster_config(f"deepspeed_zero{stage}.yaml")
    assert config.distributed_type == "DEEPSPEED" and config.mixed_precision in (None, "no")
    settings_file = PROJECT / config.deepspeed_config["deepspeed_config_file"]
    assert set(config.deepspeed_config) == {"deepspeed_config_file", "zero3_init_flag"}
    settings = json.loads(settings_file.read_text())
    assert settings["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert settings[key] == "auto", key
    assert settings["bf16"]["enabled"] == settings["fp16"]["enabled"] == "auto"
    assert "optimizer" not in settings and "scheduler" not in settings  # the loop's AdamW and schedule
    if stage == 3:
        assert settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("decoding_checkpoint", ["v3"], indirect=True)
def test_fsdp2_evaluation_and_best_on_two_cpu_processes(tmp_path, decoding_checkpoint, corpus_dir, session_cache_dir):
    """2 gloo processes, the model sharded with FSDP2 as fsdp.yaml wraps it: the loop's evaluation (first thing
    after sharding, processes decoding different lengths) gives the unsharded model's hypotheses and loss, leaves
    the parameters sharded, and best/ holds the full weights as an ordinary Whisper folder."""
    out = tmp_path / "out"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(PROJECT / "tests" / "fsdp_worker.py"), str(decoding_checkpoint), str(corpus_dir),
               str(session_cache_dir), str(out)]
    done = subprocess.run(command, check=False, env=child_env(), capture_output=True, text=True, timeout=600,
                          cwd=PROJECT)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "fsdp_results.json").read_text(encoding="utf-8"))
    assert results["units"] == 5  # 2 encoder layers, 2 decoder layers, the root
    assert results["sharded"] == results["plain"] and len(results["plain"]) == 6
    assert len({p["hypothesis"] for p in results["plain"]}) > 1
    assert results["sharded_loss"] == pytest.approx(results["plain_loss"], rel=1e-5)
    assert results["resharded_after_eval"] and results["whole_inside"] and results["best_equals_weights"]
    assert results["architectures"] == ["WhisperForConditionalGeneration"]
    assert results["after_step_utterances"] == 6
    # finish()'s evaluation of best/ beside the sharded model: every test utterance, the unsharded hypotheses
    assert results["best_failed"] == 0 and results["best_predictions"] == results["plain"]
    # The disk estimate counts a sharded model whole (FSDP2's DTensors all have data_ptr() 0)
    assert results["sharded_bytes"] == results["plain_bytes"] > 0
    # The timestamp evaluation ran on both processes, sharded, with the unsharded model's figures
    assert results["sharded_timestamps"] == results["plain_timestamps"] and results["plain_timestamps"]


def test_the_slurm_example_is_valid_bash():
    script = PROJECT / "examples" / "slurm" / "train.sbatch"
    assert script.is_file()
    done = subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    for needed in ("#SBATCH --requeue", "srun", "--machine_rank", "$SLURM_NODEID", "--main_process_ip",
                   "--train.resume=true"):
        assert needed in text, needed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Accelerate runs FSDP and DeepSpeed on GPUs only")
@pytest.mark.parametrize("config_file", ["fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_a_run_under_each_engine_saves_resumes_and_writes_best(tmp_path, fast_model, session_cache_dir, config_file):
    """On every GPU of the machine: 4 steps, then a resume to 8 from the step-4 checkpoint; best/ loads as a stock
    Whisper and results.json counts every test utterance once."""
    if config_file.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")
    from transformers import WhisperForConditionalGeneration

    processes = torch.cuda.device_count()
    common = ["--config", "quickstart", "--output_dir", tmp_path / "run", f"--model.name_or_path={fast_model}",
              f"--data.cache_dir={session_cache_dir}", "--data.max_train_samples=32", "--data.selection_size=8",
              "--data.max_eval_samples=8", "--train.per_device_train_batch_size=4", "--eval.eval_steps=4",
              "--train.save_steps=4", "--eval.generation_max_length=24", "--train.logging_steps=1"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config_file),
              f"--num_processes={processes}", "--mixed_precision=bf16", str(PROJECT / "scripts" / "train.py")]
    for steps, extra in ((4, []), (8, ["--train.resume=true"])):
        done = subprocess.run([*launch, *map(str, common), f"--train.max_steps={steps}", *extra], check=False,
                              env=child_env(4),
                              capture_output=True, text=True, timeout=900, cwd=PROJECT)
        assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stdout + done.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 8 and results["num_processes"] == processes and results["test_utterances"] == 8
    WhisperForConditionalGeneration.from_pretrained(tmp_path / "run" / "best")
