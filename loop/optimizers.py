"""The optimizer and learning-rate schedule of a run: torch's fused AdamW or, on CUDA, bitsandbytes' 8-bit AdamW
(`train.optimizer`); linear warmup, then linear decay."""

from __future__ import annotations

import torch

from loop.model.lora import check_cuda_for


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


def get_lr_scheduler(optimizer, warmup_steps: int, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the peak over `warmup_steps`, then linear decay to 0 at `max_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
