"""`train.ema_decay`: an exponential moving average of the trainable weights, updated after every optimizer step,
saved in every checkpoint (`ema.safetensors`) and restored on resume, and swapped into the model for evaluation
and `best/`.

After step k the average is `ema_k = decay * ema_(k-1) + (1 - decay) * w_k`, starting from the weights before
the first step (`ema_0 = w_0`), so it weighs the last `1 / (1 - decay)` steps or so (NeMo's and timm's EMA, without
a warm-up of the decay: a run shorter than `1 / (1 - decay)` steps keeps much of its starting point).

The average is kept in float32 whatever the weights' dtype, on the weights' device or, with `train.ema_on_cpu`, in
host memory (for a model whose weights and optimizer already fill the accelerator). It is written to and read from
the checkpoint folder by Accelerate's save/load hooks as a safetensors file, never a pickle, so a tampered
checkpoint cannot run code, and the folder's checksums (`loop_state.json`) cover it like any other file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loop.config import ConfigError

EMA_FILE = "ema.safetensors"


class EMA:
    """The moving average of `model`'s trainable parameters (by name, as the unwrapped model names them)."""

    def __init__(self, accelerator, model, decay: float, on_cpu: bool = False):
        refuse_sharded(accelerator)
        self.accelerator, self.decay = accelerator, decay
        self.device = torch.device("cpu") if on_cpu else None  # None: each weight's own device
        self.shadow = {name: p.detach().to(self.device or p.device, torch.float32, copy=True)
                       for name, p in self.parameters(model)}
        accelerator.register_save_state_pre_hook(self._save)
        accelerator.register_load_state_pre_hook(self._load)

    def parameters(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.accelerator.unwrap_model(model).named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self, model) -> None:
        """`ema = decay * ema + (1 - decay) * weights`, after an optimizer step."""
        for name, p in self.parameters(model):
            shadow = self.shadow[name]
            shadow.lerp_(p.detach().to(shadow.device, torch.float32, non_blocking=True), 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, model):
        """The model holds the averaged weights inside the block and its own, bit for bit, again after it."""
        kept = {name: p.detach().clone() for name, p in self.parameters(model)}
        try:
            for name, p in self.parameters(model):
                p.copy_(self.shadow[name])
            yield model
        finally:
            for name, p in self.parameters(model):
                p.copy_(kept[name])

    def _save(self, models, weights, output_dir: str) -> None:
        if self.accelerator.is_main_process:  # every process holds the same average (DDP: the same weights)
            save_file({name: t.contiguous().cpu() for name, t in self.shadow.items()}, str(Path(output_dir) / EMA_FILE))

    def _load(self, models, input_dir: str) -> None:
        path = Path(input_dir) / EMA_FILE
        if not path.is_file():
            raise ConfigError([f"train.ema_decay is set but {path} does not exist: the checkpoint was saved without "
                               "it; resume with --train.ema_decay=0 or start afresh"])
        saved = load_file(str(path))
        if saved.keys() != self.shadow.keys():
            raise ConfigError([f"{path}: its weights are not this model's trainable weights "
                               f"({len(saved)} saved, {len(self.shadow)} trainable)"])
        for name, tensor in saved.items():
            self.shadow[name].copy_(tensor)


def refuse_sharded(accelerator) -> None:
    """FSDP and DeepSpeed hold a shard of each weight per process; an average of the local shards would need its own
    sharded save and load, which this project cannot test on its machines, so it is refused rather than wrong."""
    kind = str(accelerator.distributed_type)
    if "FSDP" in kind or "DEEPSPEED" in kind:
        raise ConfigError([f"train.ema_decay is not supported under {kind} (sharded weights); use "
                           "scripts/average_checkpoints.py on the run's checkpoints instead, or train with DDP"])


def build_ema(accelerator, model, train_config) -> EMA | None:
    """The run's EMA, or None when `train.ema_decay` is 0. Call after `accelerator.prepare` and before the
    checkpoint is loaded (the load hook restores the saved average)."""
    if train_config.ema_decay == 0:
        return None
    return EMA(accelerator, model, train_config.ema_decay, on_cpu=train_config.ema_on_cpu)


def update_ema(ema: EMA | None, model) -> None:
    if ema is not None:
        ema.update(model)


def ema_weights(ema: EMA | None, model):
    """A context in which `model` holds the EMA weights (nothing changes without an EMA)."""
    return ema.swapped_in(model) if ema is not None else contextlib.nullcontext(model)
