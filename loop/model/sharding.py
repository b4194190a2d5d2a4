"""Evaluation and `best/` under sharded engines: FSDP2 (accelerate_configs/fsdp.yaml) and DeepSpeed ZeRO-3.

Training under them needs nothing of the loop: Accelerate wraps the model, and `save_state`/`load_state` write and
read sharded checkpoints. Two things do:

- Generation. Under FSDP2 every parameter is a shard (a DTensor) between forwards; each FSDP unit all-gathers its
  own in its pre-forward hook, the root (`WhisperForConditionalGeneration`, owning the convolutions, embeddings,
  final norms) in the root's. The evaluation calls the encoder directly (one encoder pass serves loss and
  generation), which skips the root's hook, and processes decode to different lengths, so they would run different
  numbers of forwards and wait in each other's all-gathers. `full_parameters` therefore gathers every unit once,
  keeps it gathered through the evaluation (`set_reshard_after_forward(False)`, what torch's docs suggest for evals)
  and reshards afterwards: no collective runs inside a forward, and one full copy of the weights lives on each
  process for the evaluation's duration (3.1 GB for large-v3 in bf16). Under ZeRO-3 DeepSpeed's hooks on every
  module gather parameters per forward, so the processes must run forwards in lockstep: `generation_kwargs` asks
  `generate` for `synced_gpus=True` (Whisper's `generate` defaults it to False, unlike the generic one).
- `best/`. `full_state_dict` gathers the full, unsharded weights on the main process: through torch's
  `get_model_state_dict` for an FSDP2 model (what `accelerator.get_state_dict` does, but it needs no Accelerate
  state, so tests/test_distributed.py checks it on CPU processes), through Accelerate otherwise (ZeRO-3 needs
  `zero3_save_16bit_model: true` in the config, accelerate_configs/deepspeed_zero3.yaml sets it).
"""

from __future__ import annotations

import contextlib

import torch


def fsdp2_units(model) -> list:
    """The FSDP2 units (`FSDPModule`s) of `model`, root first; empty for a model that is not sharded with FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def full_parameters(model):
    """Inside, an FSDP2 model's parameters are whole on every process and stay so across forwards (see the module
    docstring); afterwards they are sharded again and each unit reshards after its forward as before. All
    processes must enter it together (the gathering is a collective). A no-op for any other model."""
    units = fsdp2_units(model)
    if not units:
        yield model
        return
    root = units[0]
    # The root must be the first unit FSDP initialises: the evaluation's first call goes to the encoder's layers,
    # which would otherwise take the root's role (at step 0, before any training forward). Private, but the
    # initialisation every root forward performs; a no-op once it has run.
    root._get_fsdp_state()._lazy_init()
    root.set_reshard_after_forward(False, recurse=True)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        # Training's setting: each layer reshards after its forward; the root never does (FSDP's own choice for it,
        # whose parameters the backward needs first).
        root.set_reshard_after_forward(True, recurse=True)
        root.set_reshard_after_forward(False, recurse=False)


def generation_kwargs(accelerator) -> dict:
    """Extra `generate` arguments for the engine: every process steps together under ZeRO-3 with several."""
    return {"synced_gpus": True} if is_zero3(accelerator) and accelerator.num_processes > 1 else {}


def any_process(flag: bool, device) -> bool:
    """Whether `flag` is true on any process (an all-reduce when torch.distributed runs several; all call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    votes = torch.tensor([int(flag)], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return bool(votes.item())


def full_state_dict(accelerator, model) -> dict:
    """The model's full weights on the main process (an empty dict or the full one elsewhere); all processes call."""
    if fsdp2_units(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it, on the CPU
        return get_model_state_dict(model, options=options)
    return accelerator.get_state_dict(model)


def check_generation_supported(accelerator, model) -> None:
    """FSDP1 (`fsdp_version: 1`) keeps flattened parameters the evaluation cannot gather this way: refused, with
    the fix. So is LoRA under FSDP or ZeRO-3 (`loop.config.checks.engine_problems` says why; this catches an
    engine set up without `accelerate launch`'s environment)."""
    from accelerate.utils import DistributedType

    from loop.model.lora import is_lora_model

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not fsdp2_units(model):
        raise ValueError("FSDP version 1 is not supported by the evaluation: set fsdp_version: 2 in the accelerate "
                         "config (accelerate_configs/fsdp.yaml does)")
    if (fsdp or is_zero3(accelerator)) and is_lora_model(accelerator.unwrap_model(model)):
        raise ValueError("model.lora under FSDP or DeepSpeed ZeRO-3 is not supported: use plain data parallel "
                         "(accelerate launch --multi_gpu) or ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml)")


def grad_norm_tensor(grad_norm, device) -> torch.Tensor:
    """`accelerator.clip_grad_norm_`'s result as a tensor: DeepSpeed returns its engine's float (the norm of the step
    it already took inside `backward`), or None before its first step."""
    if isinstance(grad_norm, torch.Tensor):
        return grad_norm
    return torch.tensor(0.0 if grad_norm is None else float(grad_norm), device=device)
