"""LoRA (peft) in the loop, on the fast tiny Whisper: only the adapter trains, checkpoints hold only the adapter and
resume bit-exactly, best/ is the merged model (the same logits and transcripts as the adapter on its base),
gradient checkpointing and a frozen encoder combine with it, and 8-bit/4-bit options stop with a clear error where
bitsandbytes cannot run (no CUDA)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from loop.config import ConfigError
from loop.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from loop.run.checkpoints import list_checkpoints
from loop.train import finish, fit, setup, train
from tests.helpers import reset_accelerate, run_config, tensorboard_scalars

pytestmark = pytest.mark.usefixtures("single_thread")

LORA = ("--model.lora=true", "--train.learning_rate=1e-2", "--model.dropout=0", "--model.apply_spec_augment=false")


def lora_run(tmp_path, fast_model, cache_dir, *overrides, name="run"):
    return run_config(
        tmp_path / name, fast_model, cache_dir,
        "--data.max_train_samples=48", "--data.selection_size=12", "--data.max_eval_samples=8",
        "--train.per_device_train_batch_size=8", "--train.report_to=tensorboard",
        "--eval.per_device_eval_batch_size=16", "--eval.generation_max_length=24", *LORA, *overrides,
    )


def base_weights(model) -> dict[str, torch.Tensor]:
    """The frozen base's tensors of a PeftModel, by name (the adapters' left out), copied."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_lora_trains_only_the_adapter_and_saves_it_alone(tmp_path, fast_model, session_cache_dir):
    """The loss falls; every base weight is bitwise unchanged and every adapter matrix B (zero at the start) moved;
    checkpoints hold adapter_model.safetensors and no model.safetensors, far smaller than a full checkpoint; best/
    is a plain Whisper folder (no adapter tensors in it) with the adapter in best/adapter/."""
    config = lora_run(tmp_path, fast_model, session_cache_dir, "--train.max_steps=16", "--eval.eval_steps=16",
                      "--train.save_steps=8")
    run = setup(config)
    base_before, adapter_before = base_weights(run.model), adapter_weights(run.model)
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_before) and trainable
    # q, k, v, out of 2 encoder self-attention and 2 decoder self- and cross-attention blocks, an A and a B each
    assert len(trainable) == (2 * 4 + 2 * 8) * 2
    assert fit(run) == ""
    results = finish(run)
    losses = tensorboard_scalars(tmp_path / "run", "train/loss")
    # Adapters on a random base (the fast model) move its loss less than full training does: 7.69 -> 7.39 here
    assert all(math.isfinite(v) for v in losses.values()) and losses[16] < losses[1] - 0.2, losses
    assert sum(losses[s] for s in range(9, 17)) < sum(losses[s] for s in range(1, 9)), losses
    after = base_weights(run.model)
    assert after.keys() == base_before.keys()
    assert all(torch.equal(base_before[name], after[name]) for name in after)
    moved = adapter_weights(run.model)
    assert all(not torch.equal(adapter_before[name], moved[name]) for name in moved if "lora_B" in name)

    checkpoint = list_checkpoints(tmp_path / "run")[-1][1]
    assert (checkpoint / ADAPTER_WEIGHTS).is_file() and (checkpoint / ADAPTER_CONFIG).is_file()
    assert not (checkpoint / "model.safetensors").exists()
    saved = load_file(str(checkpoint / ADAPTER_WEIGHTS))
    assert len(saved) == len(trainable) and all("lora_" in key for key in saved)
    best = tmp_path / "run" / "best"
    full_model_bytes = (best / "model.safetensors").stat().st_size
    assert (checkpoint / ADAPTER_WEIGHTS).stat().st_size < full_model_bytes / 4
    merged = load_file(str(best / "model.safetensors"))
    assert not [key for key in merged if "lora_" in key or "base_layer" in key]
    assert (best / "adapter" / ADAPTER_WEIGHTS).is_file() and (best / "adapter" / ADAPTER_CONFIG).is_file()
    assert results["test_utterances"] == 8 and math.isfinite(results["test_wer"])


def test_merged_model_and_adapter_on_base_agree(tmp_path, decoding_checkpoint):
    """best/'s merged weights and the saved adapter on its base give the same logits (float tolerance) and the same
    transcripts, and the adapter changes them (B set to random values: a fresh adapter is zero)."""
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    from loop.config import ModelConfig
    from loop.data.audio import decode_audio
    from loop.model.features import LogMel
    from loop.model.loading import load_for_inference, load_processor
    from loop.model.lora import apply_lora
    from loop.run.best_model import write_merged_and_adapter
    from tests.helpers import corpus_rows

    torch.manual_seed(0)
    base = WhisperForConditionalGeneration.from_pretrained(decoding_checkpoint)
    model = apply_lora(base, ModelConfig(lora=True, lora_target_modules=["q_proj", "v_proj", "fc1"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    folder = tmp_path / "best"
    write_merged_and_adapter(model, folder)
    load_processor(str(decoding_checkpoint)).save_pretrained(folder)

    merged, processor = load_for_inference(str(folder))
    plain, _ = load_for_inference(str(decoding_checkpoint))
    on_base = PeftModel.from_pretrained(load_for_inference(str(decoding_checkpoint))[0], str(folder / "adapter")).eval()
    log_mel = LogMel(processor.feature_extractor)
    audio = torch.nn.utils.rnn.pad_sequence(
        [torch.from_numpy(decode_audio(row["audio_path"])) for row in corpus_rows("test")[:4]], batch_first=True)
    features = log_mel(audio)
    prompt = torch.tensor([[merged.config.decoder_start_token_id]] * 4)
    with torch.no_grad():
        logits = {name: m(input_features=features, decoder_input_ids=prompt).logits
                  for name, m in (("merged", merged), ("on_base", on_base), ("plain", plain))}
        texts = {name: processor.batch_decode(m.generate(input_features=features), skip_special_tokens=True)
                 for name, m in (("merged", merged), ("on_base", on_base), ("plain", plain))}
    # float32 rounding only: the merged matmul (W + s B A) x and the adapter's W x + s B (A x) round differently,
    # through layers of weights scaled 30 times (build_decoding_checkpoint)
    scale = logits["merged"].abs().max()
    assert (logits["merged"] - logits["on_base"]).abs().max() < 1e-4 * scale
    assert (logits["merged"] - logits["plain"]).abs().max() > 0.1 * scale
    assert texts["merged"] == texts["on_base"] and all(texts["merged"]), texts
    # the training model keeps its adapters: best/ merged a copy
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_resume_with_lora_matches_an_uninterrupted_run(tmp_path, fast_model, session_cache_dir):
    """2N steps straight == N steps, stop, resume from the adapter-only checkpoint, N steps: identical per-step losses
    and identical adapters (with LoRA dropout drawing masks every step)."""
    from tests.helpers import StopAt

    common = ("--train.max_steps=8", "--train.save_steps=4", "--eval.eval_steps=8", "--model.lora_dropout=0.1")
    train(lora_run(tmp_path, fast_model, session_cache_dir, *common, name="straight"))
    reset_accelerate()
    config = lora_run(tmp_path, fast_model, session_cache_dir, *common, name="resumed")
    run = setup(config)
    assert fit(run, StopAt(run, 5)) == "SIGTERM"
    reset_accelerate()
    config.train.resume = True
    run = setup(config)
    assert run.state.step == 5
    assert fit(run) == ""
    losses_straight = tensorboard_scalars(tmp_path / "straight", "train/loss")
    losses_resumed = tensorboard_scalars(tmp_path / "resumed", "train/loss")
    assert sorted(losses_straight) == list(range(1, 9)) and losses_resumed == losses_straight
    final_straight = load_file(str(tmp_path / "straight" / "checkpoints" / "step_8" / ADAPTER_WEIGHTS))
    final_resumed = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_8" / ADAPTER_WEIGHTS))
    assert final_straight.keys() == final_resumed.keys()
    assert all(torch.equal(final_straight[k], final_resumed[k]) for k in final_straight)


FFN_DECODER_ONLY = ("--model.lora_target_modules=q_proj,v_proj,fc1,fc2", "--model.lora_layers=decoder")


@pytest.mark.parametrize("extra", [("--model.gradient_checkpointing=true",), ("--model.freeze_encoder=true",),
                                   FFN_DECODER_ONLY],
                         ids=["gradient-checkpointing", "frozen-encoder", "ffn-decoder-only"])
def test_lora_combines_with_memory_options(tmp_path, fast_model, session_cache_dir, extra):
    """Each trains (finite, falling loss) and moves every adapter it has; gradient checkpointing reaches the encoder's
    adapters (no input needs requires_grad with non-reentrant checkpointing); a frozen encoder has none."""
    config = lora_run(tmp_path, fast_model, session_cache_dir, "--train.max_steps=10", "--eval.eval_steps=10",
                      "--train.save_steps=10", *extra)
    run = setup(config)
    before = adapter_weights(run.model)
    assert fit(run) == ""
    losses = tensorboard_scalars(tmp_path / "run", "train/loss")
    assert all(math.isfinite(v) for v in losses.values()) and losses[10] < losses[1] - 0.1, losses
    after = adapter_weights(run.model)
    assert all(not torch.equal(before[name], after[name]) for name in after if "lora_B" in name)
    encoder_adapters = [name for name in after if ".encoder.layers." in name]
    if "--model.gradient_checkpointing=true" in extra:
        base = run.model.get_base_model()
        assert base.is_activation_checkpointing and encoder_adapters
    else:
        assert not encoder_adapters
    if "--model.lora_layers=decoder" in extra:
        assert any(".fc2.lora_A" in name for name in after) and not any("k_proj.lora" in name for name in after)


def test_lora_and_bitsandbytes_options_are_checked(tmp_path, tiny_model_dir, session_cache_dir):
    """Bad LoRA settings are listed together; without CUDA, 8-bit AdamW and an 8-/4-bit base stop at validation with
    the reason and what to use instead."""
    def problems(*overrides):
        with pytest.raises(ConfigError) as error:
            run_config(tmp_path, tiny_model_dir, session_cache_dir, *overrides)
        return error.value.problems

    found = problems("--model.lora=true", "--model.lora_target_modules=q_proj,gate_proj",
                     "--model.lora_layers=encoder", "--model.freeze_encoder=true")
    assert any("gate_proj is not one of" in p for p in found)
    assert any("leaves nothing to train" in p for p in found)
    assert any("needs model.lora=true" in p for p in problems("--model.quantization=8bit"))
    from loop.config.loading import config_warnings

    slow = run_config(tmp_path, tiny_model_dir, session_cache_dir, "--model.lora=true", "--train.learning_rate=1e-5")
    assert any("model.lora with train.learning_rate=1e-05" in w for w in config_warnings(slow))
    if torch.cuda.is_available():
        pytest.skip("the no-CUDA errors need a machine without CUDA")
    for option, value in (("model.quantization", "4bit"), ("model.quantization", "8bit"),
                          ("train.optimizer", "adamw_8bit")):
        (message,) = [p for p in problems("--model.lora=true", f"--{option}={value}") if option in p]
        assert "CUDA" in message and "use --" in message, message


def test_setup_refuses_bitsandbytes_without_cuda():
    """The same stop where a config skipped validation (built in code): loading and the optimizer refuse."""
    from loop.config import ModelConfig, TrainConfig
    from loop.model.lora import quantized_loading
    from loop.optimizers import build_optimizer

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU|not installed"):
        quantized_loading(ModelConfig(lora=True, quantization="4bit"))
    with pytest.raises(RuntimeError, match="train.optimizer=adamw_8bit"):
        build_optimizer(torch.nn.Linear(2, 2), TrainConfig(optimizer="adamw_8bit"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes)")
@pytest.mark.parametrize("extra", [("--model.quantization=4bit",), ("--model.quantization=8bit",),
                                   ("--train.optimizer=adamw_8bit",),
                                   ("--model.quantization=4bit", "--train.optimizer=adamw_8bit",
                                    "--model.gradient_checkpointing=true")],
                         ids=["qlora-4bit", "lora-8bit-base", "lora-adamw-8bit", "qlora-adamw-8bit-checkpointed"])
def test_bitsandbytes_options_train_resume_and_merge_on_a_gpu(tmp_path, fast_model, session_cache_dir, extra):
    """Written for a GPU, not yet run on one: each trains in bf16 (finite, falling loss), stops, resumes from the
    adapter-only checkpoint, and its best/ (a quantized base dequantized, then merged) is a float32 Whisper whose
    logits are close to the training model's. (The fast model's adapter matrices are under AdamW8bit's 4096-value
    minimum for 8-bit state, so that option's code path runs here, its 8-bit moments only on a larger model.)"""
    from loop.model.loading import load_for_inference
    from tests.helpers import StopAt

    config = lora_run(tmp_path, fast_model, session_cache_dir, "--train.mixed_precision=bf16", "--train.max_steps=8",
                      "--train.save_steps=4", "--eval.eval_steps=8", *extra)
    run = setup(config)
    assert fit(run, StopAt(run, 4)) == "SIGTERM"
    reset_accelerate()
    config.train.resume = True
    run = setup(config)
    assert run.state.step == 4
    assert fit(run) == ""
    finish(run)
    losses = tensorboard_scalars(tmp_path / "run", "train/loss")
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert losses[8] < losses[1], losses
    assert not (tmp_path / "run" / "checkpoints" / "step_8" / "model.safetensors").exists()
    merged, _ = load_for_inference(str(tmp_path / "run" / "best"))
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    batch = next(iter(run.selection_loader))
    features = run.log_mel(batch["audio"])
    prompt = torch.full((features.shape[0], 1), merged.config.decoder_start_token_id, device=features.device)
    run.model.eval()
    with torch.no_grad(), run.accelerator.autocast():
        trained = run.model(input_features=features, decoder_input_ids=prompt).logits.float()
    with torch.no_grad():
        saved = merged.to(features.device)(input_features=features, decoder_input_ids=prompt).logits
    assert (trained - saved).abs().max() < 0.05 * saved.abs().max()
