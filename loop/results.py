"""What a run leaves for users: the best model as an ordinary `save_pretrained` folder, and version facts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from pathlib import Path

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "soundfile", "soxr", "jiwer", "tokenizers")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_best_model(accelerator, model, processor, config) -> Path:
    """Saves model (safetensors), generation config and processor to `<output_dir>/best/`, replacing the previous
    best only once the new folder is complete. All processes must call it (the state dict may be gathered)."""
    best = Path(config.output_dir) / "best"
    staging = Path(config.output_dir) / ".tmp-best"
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.use_cache = True  # the saved model is for inference; training turned the cache off
        try:
            unwrapped.save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        finally:
            unwrapped.config.use_cache = False
        processor.save_pretrained(staging)
        previous = Path(config.output_dir) / ".old-best"
        if best.exists():
            os.replace(best, previous)
        os.replace(staging, best)
        shutil.rmtree(previous, ignore_errors=True)
    accelerator.wait_for_everyone()
    return best
