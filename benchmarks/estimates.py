"""Analytic training FLOPs and memory of a Whisper model: what the measured speeds are compared against.

Nothing here runs a model: the counts follow from the config (tests/test_benchmark.py checks the FLOP count
against torch's FLOP counter and that the memory parts add up).
"""

from __future__ import annotations

import torch
import yaml
from transformers import WhisperConfig, WhisperForConditionalGeneration

from loop.config.loading import preset_path

REFERENCE_MEMORY_GB = 15.8  # what the reference recipe needs to train whisper-small, batch 16, fp16 (the figure)
H100_DENSE_TFLOPS = 989.0  # H100 SXM, bf16/fp16 dense tensor-core peak


def training_flops_per_sample(config, n_label_tokens: float) -> float:
    """Matmul FLOPs to train on one example: 3 x the forward pass (the backward computes gradients for both the
    inputs and the weights of every matmul, 2 x the forward), except the first convolution, whose input (the
    log-mel features) needs no gradient: 2 x.

    Forward, with m mel bins, F input frames, S = F/2 encoder positions, T label tokens (decoder positions),
    d = d_model, f = FFN width, V vocabulary, a multiply-add counted as 2 FLOPs:
        conv stem       2*3*m*d*F (conv1) + 2*3*d*d*S (conv2, stride 2)
        encoder layer   2*S*(4*d^2 + 2*d*f)               q, k, v, out projections and the two FFN matmuls
                        + 4*S^2*d                          Q K^T and attention x V
        decoder layer   2*T*(4*d^2 + 2*d^2 + 2*d*f)        self-attention q, k, v, out; cross-attention q, out; FFN
                        + 2*S*2*d^2                        cross-attention k, v over the encoder states
                        + 4*T^2*d + 4*T*S*d                self- and cross-attention scores and sums
        output layer    2*T*d*V
    Causal self-attention is counted in full (the PaLM convention); layer norms, softmax, GELU, the loss and the
    optimizer (a few percent) are left out.
    """
    d, m, V = config.d_model, config.num_mel_bins, config.vocab_size
    S = config.max_source_positions
    F = 2 * S
    T = n_label_tokens
    conv1, conv2 = 2 * 3 * m * d * F, 2 * 3 * d * d * S
    encoder = config.encoder_layers * (2 * S * (4 * d * d + 2 * d * config.encoder_ffn_dim) + 4 * S * S * d)
    decoder = config.decoder_layers * (
        2 * T * (6 * d * d + 2 * d * config.decoder_ffn_dim) + 2 * S * 2 * d * d + 4 * T * T * d + 4 * T * S * d
    )
    return 2.0 * conv1 + 3.0 * (conv2 + encoder + decoder + 2 * T * d * V)


def whisper_small_config() -> WhisperConfig:
    """openai/whisper-small's architecture (the Hub config, written out so it needs no network)."""
    return WhisperConfig(vocab_size=51865, num_mel_bins=80, d_model=768, encoder_layers=12, decoder_layers=12,
                         encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                         decoder_ffn_dim=3072, max_source_positions=1500, max_target_positions=448)


def parameter_count(config) -> int:
    """Parameters of a WhisperForConditionalGeneration with this config (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())  # tied output layer counted once


def training_memory_estimate(config, batch_size: int = 16, n_label_tokens: int = 128, mixed_precision: str = "fp16",
                             separate_loss: bool = False) -> dict[str, float]:
    """Training memory in GB on one GPU: fp32 weights, gradients and AdamW moments, plus what autograd keeps for
    the backward pass, without gradient checkpointing and with SDPA attention (no S^2 score matrices kept).

    Bytes kept per position and layer under fp16 autocast (h = 2 bytes per half, 4 per float):
        encoder layer  4d (LN input, fp32) + 2d (its fp16 cast) + 6d (q, k, v) + 2d (attention output)
                       + 4d (LN input) + 2d (cast) + 2f (fc1 output) + 2f (GELU output)       = 20d + 4f
        decoder layer  the same with a cross-attention block (4d + 2d + 2d + 2d) added         = 30d + 4f
                       plus per encoder position: two fp16 casts of the encoder states and k, v  = 8d
    Conv stem per example: 2mF + 4dF (conv1 output and GELU) + 8dS (conv2, GELU, positions in fp32).
    Logits: 2TV (fp16) + 8TV for one loss (fp32 upcast and log-softmax); `separate_loss` adds a second fp32
    cross-entropy over the same logits (another 8TV), as when the model is given `labels` and computes a mean
    loss of its own beside the summed one (loop/model/loss.py gives it decoder inputs, so the loop pays for one loss).
    Allocator slack and the transient buffers of the backward pass come on top: read the total as a lower bound
    within about 20%. Returns GB per part, their `total`, and `parameters` (a count).
    """
    P = parameter_count(config)
    half = mixed_precision in ("fp16", "bf16")
    gb = 1e9
    parts = {
        "weights_fp32": 4 * P / gb,
        "gradients_fp32": 4 * P / gb,
        "adamw_moments_fp32": 8 * P / gb,
        "autocast_weight_copies": (2 * P if half else 0) / gb,
    }
    kept = activation_bytes(config, n_label_tokens, half, separate_loss)
    parts.update({name: batch_size * value / gb for name, value in kept.items()})
    parts["total"] = sum(parts.values())
    parts["parameters"] = P
    return parts


def activation_bytes(config, n_label_tokens: float, half: bool, separate_loss: bool = False) -> dict[str, float]:
    """Bytes autograd keeps per example, by part, as `training_memory_estimate` derives them (its docstring); `half`
    for fp16/bf16 autocast (without it every kept activation is fp32: twice the bytes)."""
    d, m, V = config.d_model, config.num_mel_bins, config.vocab_size
    S = config.max_source_positions
    F, T = 2 * S, n_label_tokens
    scale = 1.0 if half else 2.0
    return {
        "encoder_activations": scale * S * config.encoder_layers * (20 * d + 4 * config.encoder_ffn_dim),
        "conv_stem_activations": scale * (2 * m * F + 4 * d * F + 8 * d * S),
        "decoder_activations": scale * config.decoder_layers * (T * (30 * d + 4 * config.decoder_ffn_dim) + 8 * d * S),
        "logits_and_loss": T * V * (2 + 8 + (8 if separate_loss else 0)),
    }


def whisper_small_hi_memory(label_tokens: int = 128) -> dict:
    """Training memory of the whisper-small-hi preset as it is configured (its micro-batch), and of one batch of
    16, by `training_memory_estimate`, next to the reference recipe's figure (GB)."""
    train = yaml.safe_load(preset_path("whisper-small-hi").read_text(encoding="utf-8"))["train"]  # needs no data path
    micro_batch, precision = train["per_device_train_batch_size"], train["mixed_precision"]
    small = whisper_small_config()
    preset_gb = training_memory_estimate(small, micro_batch, label_tokens, precision)
    return {
        "label_tokens": label_tokens,
        "mixed_precision": precision,
        "preset_micro_batch": micro_batch,
        "preset_accumulation": train["gradient_accumulation_steps"],
        "preset_gb": preset_gb,
        "batch_16_gb": training_memory_estimate(small, 16, label_tokens, precision),
        "states_gb": preset_gb["weights_fp32"] + preset_gb["gradients_fp32"] + preset_gb["adamw_moments_fp32"],
        "reference_recipe_gb": REFERENCE_MEMORY_GB,
    }


def projected_minutes(speed: dict, *, steps: int = 4000, batch: int = 16, eval_steps: int = 1000,
                      save_steps: int = 1000, selection: int = 300, test: int = 2894, eval_on_start: bool = True,
                      windows_at_the_end: int = 2) -> dict:
    """The recipe's run time from measured rates: `steps` x `batch` samples at `samples_per_s`; an evaluation of
    `selection` utterances every `eval_steps` (and at the start), a checkpoint every `save_steps` and a best/ write
    with each evaluation (at most); at the end `finish()` decodes the `test` split (Common Voice 11 Hindi's, the
    blog's, 2,894) at `windows_at_the_end` windows (a dynamic-window run: its own and the full one)."""
    evaluations = steps // eval_steps + int(eval_on_start)
    train = steps * batch / speed["samples_per_s"]
    evaluation = evaluations * selection / speed["eval_utterances_per_s"]
    saves = (steps // save_steps) * speed["checkpoint_save_s"] + evaluations * speed["best_save_s"]
    final = windows_at_the_end * test / speed["eval_utterances_per_s"]
    return {"train_min": train / 60, "evaluation_min": evaluation / 60, "saves_min": saves / 60,
            "final_test_min": final / 60, "total_min": (train + evaluation + saves + final) / 60}
