"""The optimizer of a run (`train.optimizer`): torch's fused AdamW, or bitsandbytes' 8-bit AdamW on CUDA."""

from __future__ import annotations

import torch

from loop.lora import check_cuda_for


def build_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad (all of them, the decoder's with a frozen encoder, the adapters'
    with LoRA), as `config` (a `TrainConfig`) says."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw_8bit":
        check_cuda_for("train.optimizer", config.optimizer)  # config validation said so already; a clear stop anyway
        import bitsandbytes

        # Moments stored in 8 bits with a per-block scale (2 bytes a parameter instead of 8); the update is computed
        # in float32, so the weights keep their precision.
        return bitsandbytes.optim.AdamW8bit(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        fused=True,  # one kernel over all parameters, on CUDA and on the CPU (torch's default there is a Python loop)
    )
