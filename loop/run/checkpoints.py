"""Checkpoints under `<output_dir>/checkpoints/step_<N>/`: written atomically, found, rotated, resumed.

A checkpoint is `accelerator.save_state` (model, optimizer, scheduler, scaler, RNG states, all loaded back with
`weights_only=True`) plus `loop_state.json` (step, epoch, position in the epoch, best WER, ...) and the run's configuration,
`run_config.json` (earlier versions named it `config.json`, the name every Hugging Face tool takes for a model's
config: `read_run_config` reads both, and `loop.run.model_folder` loads a checkpoint as a model).
The loop's own state is plain JSON rather than a registered object: Accelerate unpickles registered objects with
`weights_only=False`, which would execute whatever a tampered checkpoint holds.

Folders are named by optimizer step here, not by Accelerate's automatic naming, whose counter restarts after a
resume and then prunes the wrong checkpoint. Each is written to a hidden temporary folder and renamed into place,
so a process killed mid-save never leaves a folder that looks complete. `loop_state.json` also records each of the
folder's files with its SHA-256 and size (`files`), so a resume can tell a checkpoint damaged later (a truncated
copy, a bad disk) from a good one: `loop.run.checkpoint_integrity`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loop.files import file_checksums, replace_dir, write_json_atomic
from loop.run.disk_space import checkpoint_bytes, reporting_save_failure

CHECKPOINT = re.compile(r"^step_(\d+)$")
STATE_FILE = "loop_state.json"
RUN_CONFIG_FILE = "run_config.json"  # the run's configuration in a checkpoint
LEGACY_RUN_CONFIG_FILE = "config.json"  # where earlier versions kept it, and where a run folder keeps it
CHECKSUMS_KEY = "files"  # in STATE_FILE: {file: {"sha256", "bytes"}} of every other file of the checkpoint


@dataclass
class LoopState:
    """Everything about the loop's progress that `save_state` does not know."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Passes over the training data begun (0-based)."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (resume skips them)."""
    best_wer: float = math.inf
    best_step: int = -1
    initial_wer: float | None = None
    nonfinite_steps: int = 0
    """Optimizer steps skipped because the loss or gradient norm was not finite."""
    consecutive_nonfinite: int = 0
    samples_seen: int = 0
    """Training samples (rows) of all processes, counted at each log line."""
    utterances_seen: int = 0
    """Training utterances of all processes (more than samples when rows are packed), counted at each log line."""
    train_seconds: float = 0.0
    """Time spent in optimizer steps (evaluation and saving excluded), for throughput."""
    evaluations: list[dict] = field(default_factory=list)
    """One entry per evaluation on the selection split: step, wer, cer, loss, ..."""
    streams: list[dict] = field(default_factory=list)
    """With `data.streaming`: each process's place in the shards (epoch, window, batch) and the rows it skipped
    (`loop.data.streaming.StreamLoader.state_dict`), by process index."""

    def to_json(self) -> dict:
        values = asdict(self)
        values["best_wer"] = None if math.isinf(self.best_wer) else self.best_wer
        return values

    @classmethod
    def from_json(cls, values: dict) -> LoopState:
        values = dict(values)
        values.pop(CHECKSUMS_KEY, None)  # the checkpoint's checksums, not loop state
        values["best_wer"] = math.inf if values.get("best_wer") is None else values["best_wer"]
        return cls(**values)


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary folders of interrupted saves are not listed."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(accelerator, output_dir: str | Path, state: LoopState, config: dict, keep: int) -> Path:
    """Writes `step_<N>` atomically on the main process (all processes must call: save_state gathers), then
    keeps the newest `keep` checkpoints and the best one."""
    final = checkpoints_dir(output_dir) / f"step_{state.step}"
    staging = checkpoints_dir(output_dir) / f".tmp-step_{state.step}"
    # A failed write (a full disk) removes the staging folder and raises one SaveError; complete checkpoints stay.
    with reporting_save_failure(f"checkpoint {final.name}", final.parent, checkpoint_bytes(accelerator), output_dir,
                                staging=staging):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
        if accelerator.is_main_process:
            write_json_atomic(staging / RUN_CONFIG_FILE, config)
            # The state file is written last: a folder without it is never taken for a checkpoint.
            write_state_file(staging, state)
            # A re-save of the same step (after a resume that stopped at once) replaces the folder whole.
            replace_dir(staging, final)
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, keep=keep, protect_step=state.best_step)
    accelerator.wait_for_everyone()
    return final


def read_run_config(folder: str | Path) -> dict | None:
    """The run configuration saved in `folder` (a checkpoint, or a run folder): `run_config.json`, else a
    `config.json` that holds one rather than a model's config (checkpoints of earlier versions, a run's top level).
    None when there is none."""
    found = run_config_file(folder)
    return found[1] if found else None


def run_config_file(folder: str | Path) -> tuple[Path, dict] | None:
    """(the file, its contents) of `read_run_config`."""
    for name in (RUN_CONFIG_FILE, LEGACY_RUN_CONFIG_FILE):
        path = Path(folder) / name
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(values, dict) and "model" in values and "train" in values and "model_type" not in values:
            return path, values
    return None


def write_state_file(folder: Path, state: LoopState) -> Path:
    """`loop_state.json`: the loop's state and the SHA-256 and size of every other file in `folder`."""
    return write_json_atomic(folder / STATE_FILE, {**state.to_json(),
                                                   CHECKSUMS_KEY: file_checksums(folder, skip=(STATE_FILE,))})


def recorded_checksums(checkpoint: Path) -> dict | None:
    """The checksums `loop_state.json` recorded (None: a checkpoint of an earlier version, without them). Raises
    ValueError when the state file itself cannot be read."""
    try:
        values = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{STATE_FILE}: unreadable ({error})") from error
    return values.get(CHECKSUMS_KEY) if isinstance(values, dict) else None


def rotate_checkpoints(output_dir: str | Path, keep: int, protect_step: int) -> list[Path]:
    """Deletes all but the newest `keep` checkpoints, never the one of `protect_step` (the best); returns the
    deleted folders. Leftover temporary folders of interrupted saves are removed too."""
    checkpoints = list_checkpoints(output_dir)
    newest = {step for step, _ in checkpoints[-keep:]}
    deleted = []
    for step, path in checkpoints:
        if step not in newest and step != protect_step:
            shutil.rmtree(path)
            deleted.append(path)
    for leftover in checkpoints_dir(output_dir).glob(".tmp-step_*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return deleted


def keep_adapters_only(accelerator) -> None:
    """Makes `save_state` write a LoRA model's adapter (`adapter_model.safetensors`, `adapter_config.json`: the
    folder is a peft adapter folder too) instead of `model.safetensors`, and `load_state` read it back. The frozen
    base is not saved: a resumed run loads it from `model.name_or_path`, as the first run did. The hooks take the
    models they handle out of Accelerate's lists, since its own loading would refuse a file without the base's
    weights. (Under FSDP and DeepSpeed, which save their shards themselves, the whole model is saved as before.)"""
    accelerator.register_save_state_pre_hook(functools.partial(_save_adapters, accelerator))
    accelerator.register_load_state_pre_hook(functools.partial(_load_adapters, accelerator))


def _save_adapters(accelerator, models: list, weights: list, output_dir: str) -> None:
    from loop.model.lora import is_lora_model, save_adapter

    if len(weights) != len(models):  # FSDP/DeepSpeed: no state dicts to replace
        return
    for index in reversed(range(len(models))):
        model = accelerator.unwrap_model(models[index])
        if is_lora_model(model):
            if accelerator.is_main_process:
                save_adapter(model, output_dir)
            weights.pop(index)


def _load_adapters(accelerator, models: list, input_dir: str) -> None:
    from loop.model.lora import is_lora_model, load_adapter

    for index in reversed(range(len(models))):
        model = accelerator.unwrap_model(models[index])
        if is_lora_model(model):
            load_adapter(model, input_dir)
            models.pop(index)


def load_checkpoint(accelerator, checkpoint: Path) -> LoopState:
    """Restores model, optimizer, scheduler, scaler and RNG states and returns the loop's state."""
    accelerator.load_state(str(checkpoint))
    return LoopState.from_json(json.loads((checkpoint / STATE_FILE).read_text()))
