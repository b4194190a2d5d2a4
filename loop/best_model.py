"""`<output_dir>/best/`: the best model so far as an ordinary `save_pretrained` folder (weights, generation
config, processor) that `from_pretrained`, `scripts/evaluate.py`, the demo and the Hub read as they are."""

from __future__ import annotations

import shutil
from pathlib import Path

from loop.files import replace_dir
from loop.sharding import full_state_dict

BEST_DIR = "best"


def best_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / BEST_DIR


def write_best_model(accelerator, model, processor, output_dir: str | Path) -> Path:
    """Saves model (safetensors), generation config and processor to `<output_dir>/best/`, replacing the previous
    best only once the new folder is complete. All processes must call it (the state dict may be gathered)."""
    best = best_dir(output_dir)
    staging = Path(output_dir) / f".tmp-{BEST_DIR}"
    state_dict = full_state_dict(accelerator, model)  # gathered from the shards under FSDP2 and ZeRO-3
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # the saved model is for inference; training turned the cache off
        try:
            unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        finally:
            unwrapped.config.use_cache = False
        processor.save_pretrained(staging)
        replace_dir(staging, best)
    accelerator.wait_for_everyone()
    return best
