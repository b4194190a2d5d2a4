"""Analytic training memory of every Whisper size under full fine-tuning, 8-bit AdamW, LoRA and QLoRA, with and
without gradient checkpointing: the memory table of docs/speed-and-memory.md. Nothing here needs a GPU; every
figure is an estimate.

    python -m benchmarks.memory                      # the table (markdown), batch 16, 30-s window, 448 label tokens
    python -m benchmarks.memory --label_tokens 128   # a typical Common Voice batch instead of the longest possible
    python -m benchmarks.memory --calibrate          # the estimate against a measured CPU peak (tiny and base shapes)

The parts, in GB (1e9 bytes), P parameters, A adapter parameters:
    full             fp32 weights 4P, fp32 gradients 4P, AdamW moments 8P, the fp16/bf16 copies autocast makes 2P
    full_adamw_8bit  the same with bitsandbytes' 8-bit moments: 2P (and a float32 scale per 2048-value block)
    lora             the frozen base 4P and its autocast copies 2P, the adapters 4A + gradients 4A + moments 8A + 2A
    qlora            NF4 base linears 0.5 bytes + 0.127 bits of double-quantized scales each, the rest of the base
                     (embeddings, conv stem, layer norms) in fp32, the adapters as for lora
Activations follow `benchmarks.estimates.activation_bytes` (per layer and position under autocast, SDPA attention, no
S^2 score matrices kept). Under LoRA a frozen linear layer keeps no input (its weight needs no gradient) and each
adapter keeps its own (its input in fp16 and the dropout mask, 3 bytes a feature, and its r-wide middle, 2r):
`layer_activation_bytes`; the frozen conv stem keeps nothing. Gradient checkpointing (per layer, as transformers
does it) keeps each layer's fp32 input, 4d bytes per position, plus one layer's activations while that layer is
recomputed, plus the conv stem and the logits. Left out: the CUDA context and kernels' workspaces (0.3-1 GB),
allocator fragmentation, evaluation's generation cache. At 448 label tokens the logits and their fp32 loss
(16 x 448 x 51865 x 10 bytes = 3.7 GB) are the largest single part once checkpointing is on.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from benchmarks.estimates import activation_bytes


class WhisperShape(NamedTuple):
    d_model: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    ffn: int
    mels: int
    vocab: int


# The published architectures: config.json of openai/whisper-tiny, -base, -small, -medium, -large-v3 and
# -large-v3-turbo on the Hugging Face Hub (d_model, layers, heads, FFN width, mel bins, vocabulary); all have 1500
# encoder positions (30 s) and 448 decoder positions.
WHISPER_SHAPES = {  # d_model, encoder layers, decoder layers, heads, FFN width, mel bins, vocabulary
    "tiny": WhisperShape(384, 4, 4, 6, 1536, 80, 51865),
    "base": WhisperShape(512, 6, 6, 8, 2048, 80, 51865),
    "small": WhisperShape(768, 12, 12, 12, 3072, 80, 51865),
    "medium": WhisperShape(1024, 24, 24, 16, 4096, 80, 51865),
    "large-v3": WhisperShape(1280, 32, 32, 20, 5120, 128, 51866),
    "large-v3-turbo": WhisperShape(1280, 32, 4, 20, 5120, 128, 51866),
}
METHODS = ("full", "full_adamw_8bit", "lora", "qlora")
RECIPE_BATCH = 16  # the reference recipe's batch (per optimizer step, one micro-batch here)
MAX_LABEL_TOKENS = 448  # Whisper's decoder positions: the longest label a batch can hold
DEFAULT_RANK = 32  # loop.config.ModelConfig.lora_rank
DEFAULT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")  # loop.config.ModelConfig.lora_target_modules
DEFAULT_DROPOUT = 0.05  # loop.config.ModelConfig.lora_dropout
NF4_BYTES = 0.5 + 0.127 / 8  # 4 bits, plus QLoRA's double-quantized block scales (Dettmers et al. 2023, 0.127 bit)
ADAMW_8BIT_BYTES = 2 + 8 / 2048  # two 1-byte moments and a float32 scale per block of 2048 values each
GB = 1e9


def whisper_config(name: str) -> WhisperConfig:
    s = WHISPER_SHAPES[name]
    return WhisperConfig(vocab_size=s.vocab, num_mel_bins=s.mels, d_model=s.d_model, encoder_layers=s.encoder_layers,
                         decoder_layers=s.decoder_layers, encoder_attention_heads=s.heads,
                         decoder_attention_heads=s.heads, encoder_ffn_dim=s.ffn, decoder_ffn_dim=s.ffn,
                         max_source_positions=1500, max_target_positions=448)


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    """Every parameter (the output layer is tied to the token embedding: counted once)."""
    layer_linear: int
    """Weights and biases of the transformer layers' linear layers: what bitsandbytes quantizes."""


def parameter_counts(config) -> ParameterCounts:
    """Built on the meta device: no memory, the exact counts of `WhisperForConditionalGeneration(config)`."""
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    linear = sum(p.numel() for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                 and ".layers." in name for p in module.parameters())
    return ParameterCounts(sum(p.numel() for p in model.parameters()), linear)


def adapted_modules(config, modules=DEFAULT_MODULES) -> list[tuple[str, int]]:
    """(side, input features) of each adapted linear layer of one encoder layer and one decoder layer: `encoder`
    and `decoder` read the side's own positions, `cross` (the decoder's cross-attention keys and values) the
    encoder's 1500 positions."""
    d, f = config.d_model, config.encoder_ffn_dim
    width = {"q_proj": d, "k_proj": d, "v_proj": d, "out_proj": d, "fc1": d, "fc2": f}
    found = []
    for name in modules:
        found.append(("encoder", width[name]))
        found.append(("decoder", width[name]))  # self-attention or FFN
        if name in width and name not in ("fc1", "fc2"):  # cross-attention: k and v read the encoder states
            found.append(("cross" if name in ("k_proj", "v_proj") else "decoder", width[name]))
    return found


def adapter_parameters(config, rank: int = DEFAULT_RANK, modules=DEFAULT_MODULES) -> int:
    """A (rank x in) and B (out x rank) of every adapted linear layer; Whisper's are square but fc1 and fc2."""
    d, f = config.d_model, config.encoder_ffn_dim
    shape = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d), "fc1": (d, f), "fc2": (f, d)}
    per_encoder = sum(rank * sum(shape[name]) for name in modules)
    per_decoder = sum(rank * sum(shape[name]) * (1 if name in ("fc1", "fc2") else 2) for name in modules)
    return config.encoder_layers * per_encoder + config.decoder_layers * per_decoder


def layer_activation_bytes(config, label_tokens: int, half: bool, lora: tuple[int, tuple, float] | None = None
                           ) -> tuple[float, float]:
    """Bytes one encoder layer and one decoder layer keep per example. Full fine-tuning: as
    `benchmarks.estimates.activation_bytes` counts them. With `lora` = (rank, modules, dropout): a frozen linear
    layer keeps no input (its weight needs no gradient), so the linear inputs the full count holds go (per position:
    the encoder's q/k/v input, out_proj input, fc1 input (2d each) and fc2 input (2f); the decoder's five d-wide
    ones and fc2's; the two casts of the encoder states per encoder position for cross-attention), and each adapter
    keeps its own: its input in fp16 (2 bytes a feature, plus the 1-byte dropout mask with dropout) and its r-wide
    middle (2r)."""
    kept = activation_bytes(config, label_tokens, half)
    encoder = kept["encoder_activations"] / config.encoder_layers
    decoder = kept["decoder_activations"] / config.decoder_layers
    if lora is None:
        return encoder, decoder
    rank, modules, dropout = lora
    d, f, S, T = config.d_model, config.encoder_ffn_dim, config.max_source_positions, label_tokens
    scale = 1.0 if half else 2.0
    encoder -= scale * S * (6 * d + 2 * f)
    decoder -= scale * (T * (10 * d + 2 * f) + S * 4 * d)
    positions = {"encoder": S, "decoder": T, "cross": S}
    for side, width in adapted_modules(config, modules):
        added = scale * positions[side] * ((2 + (1 if dropout > 0 else 0)) * width + 2 * rank)
        if side == "encoder":
            encoder += added
        else:
            decoder += added
    return encoder, decoder


def memory_estimate(config, method: str, *, batch_size: int = RECIPE_BATCH, label_tokens: int = MAX_LABEL_TOKENS,
                    half: bool = True, checkpointing: bool = False, rank: int = DEFAULT_RANK,
                    modules=DEFAULT_MODULES, dropout: float = DEFAULT_DROPOUT) -> dict[str, float]:
    """Training memory in GB by part (`weights`, `gradients`, `optimizer`, `activations`) and `total`, for one of
    `METHODS`; `half` for fp16/bf16 autocast. See the module docstring for what each part counts."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    counts = parameter_counts(config)
    P, lora = counts.total, method in ("lora", "qlora")
    A = adapter_parameters(config, rank, modules) if lora else 0
    copies = 2 if half else 0  # autocast's fp16/bf16 copy of every weight it multiplies
    if method == "qlora":  # quantized linears are dequantized per layer, so no whole-model copies
        weights = NF4_BYTES * counts.layer_linear + (4 + copies) * (P - counts.layer_linear) + (4 + copies) * A
    else:
        weights = (4 + copies) * (P + A)
    trained = A if lora else P
    optimizer = (ADAMW_8BIT_BYTES if method == "full_adamw_8bit" else 8) * trained
    kept = activation_bytes(config, label_tokens, half)
    adapters = (rank, tuple(modules), dropout) if lora else None
    encoder, decoder = layer_activation_bytes(config, label_tokens, half, adapters)
    if checkpointing:
        # each layer's fp32 input (and the encoder's output, which every decoder layer reads) stays; in the backward
        # pass one layer at a time is recomputed, the largest setting the peak
        activations = 4 * config.d_model * (config.max_source_positions * (config.encoder_layers + 1)
                                            + label_tokens * config.decoder_layers) + max(encoder, decoder)
    else:
        activations = config.encoder_layers * encoder + config.decoder_layers * decoder
    if not lora:  # no gradient reaches a frozen conv stem: its activations are not kept under LoRA
        activations += kept["conv_stem_activations"]
    activations += kept["logits_and_loss"]
    parts = {"weights": weights / GB, "gradients": 4 * trained / GB, "optimizer": optimizer / GB,
             "activations": batch_size * activations / GB}
    parts["total"] = sum(parts.values())
    parts["parameters"] = P
    parts["trainable"] = trained
    return parts


def estimate_table(batch_size: int = RECIPE_BATCH, label_tokens: int = MAX_LABEL_TOKENS) -> list[dict]:
    """One row per model and method: parameters, trainable parameters, and the total GB without and with gradient
    checkpointing, with its parts."""
    rows = []
    for name in WHISPER_SHAPES:
        config = whisper_config(name)
        for method in METHODS:
            plain = memory_estimate(config, method, batch_size=batch_size, label_tokens=label_tokens)
            checkpointed = memory_estimate(config, method, batch_size=batch_size, label_tokens=label_tokens,
                                           checkpointing=True)
            rows.append({"model": name, "method": method, "plain": plain, "checkpointed": checkpointed})
    return rows


def markdown(rows: list[dict], batch_size: int, label_tokens: int) -> str:
    lines = [
        (f"Estimated training memory, GB (batch {batch_size}, 30-s window, {label_tokens} label tokens, bf16 autocast, "
         f"LoRA rank {DEFAULT_RANK} on {', '.join(DEFAULT_MODULES)}); estimates only, no GPU measured:"),
        "",
        ("| model | method | parameters (trained) | weights | grads + optimizer | activations | total "
         "| activations, checkpointed | total, checkpointed |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p, c = row["plain"], row["checkpointed"]
        lines.append(
            f"| {row['model']} | {row['method']} | {p['parameters'] / 1e6:.0f} M ({p['trainable'] / 1e6:.1f} M) "
            f"| {p['weights']:.2f} | {p['gradients'] + p['optimizer']:.2f} | {p['activations']:.1f} "
            f"| **{p['total']:.1f}** | {c['activations']:.1f} | **{c['total']:.1f}** |"
        )
    return "\n".join(lines)


def calibrate(shapes=("tiny", "base"), batch_size: int = 2, label_tokens: int = 64, seed: int = 0) -> list[dict]:
    """The estimate against a measured peak: one fp32 training step (forward, backward, fused AdamW) of a randomly
    initialised model of each shape on the CPU, at batch `batch_size`, the full 30-s window. Measured: the peak
    resident memory during the second step (sampled every 20 ms) above the resident memory before it less the
    optimizer state (the weights loaded, the moments made by the first step); estimated: the gradients, optimizer
    state and activations without autocast. The gradients come while activations are freed, so the estimate, which
    adds both whole, is an upper bound."""
    from benchmarks.measure import MemoryPeak, resident_mb

    results = []
    for name in shapes:
        config = whisper_config(name)
        torch.manual_seed(seed)
        model = WhisperForConditionalGeneration(config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        features = torch.randn(batch_size, config.num_mel_bins, 2 * config.max_source_positions)
        labels = torch.randint(0, config.vocab_size, (batch_size, label_tokens))
        for step in range(2):  # the first step allocates AdamW's moments; the second is the steady state measured
            if step == 1:
                before = resident_mb() - optimizer_mb(optimizer)
                peak = MemoryPeak().__enter__()
            logits = model(input_features=features, decoder_input_ids=labels).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())  # the loop's layout
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak.__exit__(None, None, None)
        estimate = memory_estimate(config, "full", batch_size=batch_size, label_tokens=label_tokens, half=False)
        step_gb = estimate["gradients"] + estimate["optimizer"] + estimate["activations"]
        measured_gb = (peak.peak_mb - before) * 2**20 / GB
        results.append({"model": name, "batch": batch_size, "label_tokens": label_tokens,
                        "estimated_gb": step_gb, "measured_gb": measured_gb, "ratio": measured_gb / step_gb})
        del model, optimizer, logits, loss
    return results


def optimizer_mb(optimizer) -> float:
    """MB of the optimizer's state tensors (AdamW's moments), already resident before the measured step."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if torch.is_tensor(t)) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--batch_size", type=int, default=RECIPE_BATCH, help="examples per micro-batch")
    parser.add_argument("--label_tokens", type=int, default=MAX_LABEL_TOKENS, help="the batch's padded label length")
    parser.add_argument("--calibrate", action="store_true", help="measure a CPU step of the tiny and base shapes")
    args = parser.parse_args(argv)
    if args.calibrate:
        for row in calibrate():
            print(f"{row['model']}: one fp32 CPU step at batch {row['batch']}, {row['label_tokens']} label tokens: "
                  f"estimated {row['estimated_gb']:.2f} GB, measured {row['measured_gb']:.2f} GB above the loaded "
                  f"model (x{row['ratio']:.2f})")
        return 0
    print(markdown(estimate_table(args.batch_size, args.label_tokens), args.batch_size, args.label_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
