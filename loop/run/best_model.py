"""`<output_dir>/best/`: the best model so far as an ordinary `save_pretrained` folder (weights, generation
config, processor, and the feature extractor's preprocessor_config.json as well) that `from_pretrained`,
`scripts/evaluate.py`, the demo, the Hub and CTranslate2's converter read as they are; a LoRA run's adapters
merged into it, and the adapter alone in `best/adapter/`."""

from __future__ import annotations

import shutil
from pathlib import Path

from loop.files import file_checksums, replace_dir, write_json_atomic
from loop.model.loading import load_for_inference
from loop.model.lora import ADAPTER_DIR, is_lora_model, merged_copy, save_adapter
from loop.model.sharding import full_state_dict
from loop.run.disk_space import folder_bytes, reporting_save_failure, weights_bytes

BEST_DIR = "best"
CHECKSUMS_FILE = "checksums.json"  # {file: {"sha256", "bytes"}} of best/'s files, written last


def best_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / BEST_DIR


def write_best_model(accelerator, model, processor, output_dir: str | Path) -> Path:
    """Saves model (safetensors), generation config and processor to `<output_dir>/best/`, replacing the previous
    best only once the new folder is complete. All processes must call it (the state dict may be gathered)."""
    best = best_dir(output_dir)
    staging = Path(output_dir) / f".tmp-{BEST_DIR}"
    lora = is_lora_model(accelerator.unwrap_model(model))
    state_dict = None if lora else full_state_dict(accelerator, model)  # gathered from the shards under FSDP2 and ZeRO-3
    if accelerator.is_main_process:
        needed = max(weights_bytes(model), folder_bytes(best))  # the previous best/ holds the processor files too
        with reporting_save_failure(f"{BEST_DIR}/ (the best model so far)", best, needed, output_dir, staging=staging):
            shutil.rmtree(staging, ignore_errors=True)
            unwrapped = accelerator.unwrap_model(model)
            if lora:
                write_merged_and_adapter(unwrapped, staging)
                save_processor_and_checksums(processor, staging)
            else:
                save_model_folder(unwrapped, processor, staging, state_dict)
            replace_dir(staging, best)
    accelerator.wait_for_everyone()
    return best


def save_model_folder(model, processor, folder: Path, state_dict: dict | None = None) -> Path:
    """A Whisper (not LoRA) as `best/` holds it: weights (`state_dict` when given), generation config, processor
    and checksums; the model's `use_cache` as it was afterwards."""
    model.config.use_cache = True  # the saved model is for inference; training turned the cache off
    try:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    finally:
        model.config.use_cache = False
    return save_processor_and_checksums(processor, folder)


def save_processor_and_checksums(processor, folder: Path) -> Path:
    processor.save_pretrained(folder)
    # transformers 5 keeps the feature extractor in processor_config.json; ct2-transformers-converter's
    # --copy_files and faster-whisper look for preprocessor_config.json (faster-whisper takes the mel bins
    # from it and assumes 80 without it), so the folder carries that file too.
    processor.feature_extractor.save_pretrained(folder)
    write_json_atomic(folder / CHECKSUMS_FILE, file_checksums(folder))
    return folder


def write_merged_and_adapter(model, folder: Path) -> None:
    """A LoRA model (`peft.PeftModel`) as `best/` holds it: the merged Whisper in `folder` (a copy is merged, the
    training model keeps its adapters) and the adapter alone in `folder/adapter/`, for one base and many adapters
    (`PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(base), "best/adapter")`)."""
    merged = merged_copy(model)
    merged.config.use_cache = True  # the saved model is for inference; training turned the cache off
    merged.save_pretrained(folder, safe_serialization=True)
    del merged
    save_adapter(model, folder / ADAPTER_DIR)


def load_best_for_evaluation(accelerator, output_dir: str | Path, encoder_window: str, attn_implementation: str = "sdpa"):
    """`best/` as a model on this process' device, prepared for evaluation (autocast as in training), decoding with
    `encoder_window`. Placed here rather than by `prepare_model`, which leaves placement to the sharding under FSDP;
    best/ is an ordinary model, on the CPU as loaded, and would meet the features on the GPU."""
    best, _ = load_for_inference(str(best_dir(output_dir)), attn_implementation=attn_implementation,
                                 encoder_window=encoder_window)
    return accelerator.prepare_model(best.to(accelerator.device), evaluation_mode=True)
