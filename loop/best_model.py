"""`<output_dir>/best/`: the best model so far as an ordinary `save_pretrained` folder (weights, generation
config, processor, and the feature extractor's preprocessor_config.json as well) that `from_pretrained`,
`scripts/evaluate.py`, the demo, the Hub and CTranslate2's converter read as they are."""

from __future__ import annotations

import shutil
from pathlib import Path

from loop.files import replace_dir

BEST_DIR = "best"


def best_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / BEST_DIR


def write_best_model(accelerator, model, processor, output_dir: str | Path) -> Path:
    """Saves model (safetensors), generation config and processor to `<output_dir>/best/`, replacing the previous
    best only once the new folder is complete. All processes must call it (the state dict may be gathered)."""
    best = best_dir(output_dir)
    staging = Path(output_dir) / f".tmp-{BEST_DIR}"
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
        # transformers 5 keeps the feature extractor in processor_config.json; ct2-transformers-converter's
        # --copy_files and faster-whisper look for preprocessor_config.json (faster-whisper takes the mel bins
        # from it and assumes 80 without it), so the folder carries that file too.
        processor.feature_extractor.save_pretrained(staging)
        replace_dir(staging, best)
    accelerator.wait_for_everyone()
    return best
