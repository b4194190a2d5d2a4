"""Checkpoint averaging (icefall's `--avg`): the element-wise mean of the weights of a run's last K checkpoints,
written as an ordinary model folder like `best/` (`scripts/average_checkpoints.py`).

The mean is taken in float64 and stored in each weight's own dtype, so the order of the checkpoints cannot change
a bit of it. Only the weights are averaged; config, generation config and processor come from the run's `best/`
(the same for every checkpoint of a run).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from loop.files import replace_dir
from loop.model.loading import load_for_inference
from loop.run.best_model import best_dir, save_model_folder
from loop.run.checkpoints import list_checkpoints
from loop.run.ema import EMA_FILE

WEIGHTS_FILE = "model.safetensors"  # what accelerator.save_state writes for one unsharded model


class AveragingError(ValueError):
    """The run's checkpoints cannot be averaged (too few, sharded, LoRA adapters); the message says why."""


def last_checkpoints(run_dir: str | Path, count: int) -> list[Path]:
    """The newest `count` complete checkpoints of `run_dir`, oldest first."""
    found = [path for _, path in list_checkpoints(run_dir)]
    if count < 1:
        raise AveragingError(f"--last must be 1 or more, got {count}")
    if len(found) < count:
        raise AveragingError(f"{run_dir}/checkpoints holds {len(found)} complete checkpoints, fewer than --last "
                             f"{count} (train.save_total_limit keeps that many; raise it for averaging)")
    return found[-count:]


def average_weights(checkpoints: list[Path], file: str = WEIGHTS_FILE) -> dict[str, torch.Tensor]:
    """The mean of `file`'s tensors over `checkpoints` (every checkpoint must hold the same names and shapes)."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for checkpoint in checkpoints:
        path = checkpoint / file
        if not path.is_file():
            raise AveragingError(f"{path} does not exist: " + ("the run was trained without train.ema_decay"
                                                                if file == EMA_FILE else why_no_weights(checkpoint)))
        weights = load_file(str(path))
        if total and weights.keys() != total.keys():
            raise AveragingError(f"{path}: its weights are not those of {checkpoints[0] / file} (another model?)")
        for name, tensor in weights.items():
            if name in total:
                total[name] += tensor.double()
            else:
                total[name], dtypes[name] = tensor.double(), tensor.dtype
    return {name: (tensor / len(checkpoints)).to(dtypes[name]) for name, tensor in total.items()}


def why_no_weights(checkpoint: Path) -> str:
    if (checkpoint / "adapter_model.safetensors").is_file():
        return "a LoRA run's checkpoints hold adapters only; averaging them is not supported"
    if any(checkpoint.glob("pytorch_model_fsdp*")) or any(checkpoint.glob("*/mp_rank_*")):
        return "the checkpoint is sharded (FSDP/DeepSpeed); consolidate it first (accelerate merge-weights)"
    return "not a checkpoint of this project's loop"


def write_averaged_model(run_dir: str | Path, checkpoints: list[Path], output: str | Path,
                         file: str = WEIGHTS_FILE) -> Path:
    """The average of `checkpoints` as a model folder at `output` (replaced if it exists), with `best/`'s config,
    generation config and processor. `file`: the weights (`model.safetensors`) or their EMA (`ema.safetensors`,
    `train.ema_decay`), which holds the trainable weights only: the frozen ones are `best/`'s, the same in every
    checkpoint."""
    best = best_dir(run_dir)
    if not (best / "config.json").is_file():
        raise AveragingError(f"{best} is missing: the averaged folder takes its config and processor from it")
    averaged = average_weights(checkpoints, file)
    model, processor = load_for_inference(str(best))
    missing, unexpected = model.load_state_dict(averaged, strict=False)
    allowed = set(missing) if file == EMA_FILE else {"proj_out.weight"}  # proj_out: tied to the token embedding
    if set(missing) - allowed or unexpected:
        raise AveragingError(f"{checkpoints[0] / file} does not fit {best}: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]} (a LoRA run's EMA is of its adapters)")
    model.tie_weights()
    output = Path(output)
    staging = output.parent / f".tmp-{output.name}"  # renamed into place once complete
    shutil.rmtree(staging, ignore_errors=True)
    save_model_folder(model, processor, staging)
    replace_dir(staging, output)
    return output
