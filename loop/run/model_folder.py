"""What a `--model` folder is, and how to load it as a model: one answer for `scripts/evaluate.py` (and
`--compare`), the demo and the export.

A folder may be
- a model: a `save_pretrained` Whisper (`<run>/best/`, a downloaded Hub model), loaded as it is;
- a checkpoint: `<run>/checkpoints/step_N/`, the loop's `save_state` folder. Its weights (`model.safetensors`,
  or a LoRA run's `adapter_model.safetensors`) fit the run's base model, so it is rebuilt as the loop built it:
  `loop.model.loading.load_model` with the run's `model` and `eval` sections (base `model.name_or_path`, its
  processor, language, task, max length, beams, decoding options, encoder window), the saved weights loaded into
  it (the `train.ema_decay` average when the run kept one, as its evaluations used), a LoRA adapter merged as
  `best/` merges it. It then decodes as the loop's evaluation did at that step;
- a run: `<run>/`, whose checkpoints and best/ `loop.eval.run_scores` scores together;
- anything else (an empty folder, `tensorboard/`, a file, another architecture), refused by `NotAModelError` in
  one or two lines that say what was found and what to pass instead, before transformers prints a load report.

A checkpoint keeps the run's configuration in `run_config.json`: `config.json` is the name every Hugging Face
tool reads as a model config. Checkpoints of earlier versions hold it as `config.json`; `read_run_config` reads
both.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loop.config import ConfigError, RunConfig, resolve_path
from loop.config.loading import from_dict
from loop.data.no_speech import allow_empty_transcripts
from loop.model.loading import (
    ModelLoadError,
    check_files_agree,
    load_for_inference,
    load_model,
    set_encoder_window,
    set_generation_settings,
)
from loop.model.lora import ADAPTER_WEIGHTS, load_adapter, merged_copy
from loop.run.best_model import BEST_DIR, save_model_folder
from loop.run.checkpoints import (
    CHECKPOINT,
    STATE_FILE,
    list_checkpoints,
    read_run_config,
    run_config_file,
)
from loop.run.ema import EMA_FILE
from loop.run.output_dir import RESULTS_FILE, TENSORBOARD_DIR

FULL_WEIGHTS = "model.safetensors"  # what `save_state` writes for a fully fine-tuned model

HINT = "pass a run's best/ or checkpoints/step_N folder, the run folder itself (evaluate.py scores all of it), or a Hub id"


class NotAModelError(ModelLoadError):
    """A `--model` that is no model: the message says what the folder holds and what to pass instead."""


@dataclass
class ModelSource:
    """What `identify` found at a `--model` location."""

    kind: str
    """`hub` (not on disk: a Hub id), `model` (a save_pretrained folder), `checkpoint` (step_N) or `run`."""
    location: str
    """The path (resolved) or the Hub id."""
    run_config: RunConfig | None = None
    """For a checkpoint and a run: the run's configuration."""
    step: int | None = None
    """For a checkpoint: its optimizer step."""

    @property
    def name(self) -> str:
        """How reports name it: the checkpoint's run and step, else the location."""
        if self.kind == "checkpoint":
            return f"{Path(self.location).parent.parent.name}/step_{self.step}"
        return self.location


def identify(name_or_path: str | Path, option: str = "--model", allow_run: bool = False) -> ModelSource:
    """What `name_or_path` is (see the module docstring); a run folder only with `allow_run`. Raises
    NotAModelError for anything that is no model."""
    path = resolve_path(str(name_or_path))
    if not path.exists():
        return ModelSource("hub", str(name_or_path))
    where = f"{option} {name_or_path}"
    if not path.is_dir():
        raise NotAModelError(f"{where} is a file, not a model folder; {HINT}")
    if (path / STATE_FILE).is_file():
        return _checkpoint(path, where)
    model_type = _model_type(path / "config.json", where)
    if model_type == "whisper":
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise NotAModelError(f"{where} has a Whisper config.json but no weights (*.safetensors); {HINT}")
        return ModelSource("model", str(path))
    if model_type is not None:
        raise NotAModelError(f"{where} holds a {model_type!r} model, not a Whisper; {HINT}")
    if is_run_folder(path):
        return _run(path, where, allow_run)
    if (path / "config.json").is_file():
        raise NotAModelError(f"cannot load a model from {where}: its config.json names no model_type (neither a "
                             f"model's config nor a run's); {HINT}")
    raise NotAModelError(f"{where} {_what_is_there(path)}")


def saved_run_config(source: ModelSource) -> str:
    """The file holding the run configuration of a checkpoint or run (JSON, so a valid `--config`)."""
    for folder in (Path(source.location), Path(source.location).parent.parent):
        found = run_config_file(folder)
        if found:
            return str(found[0])
    raise NotAModelError(f"{source.location}: no run configuration found")


def is_run_folder(path: Path) -> bool:
    """A loop's output folder: its run configuration, checkpoints, best/ or results.json."""
    return (read_run_config(path) is not None or (path / "checkpoints").is_dir() or (path / BEST_DIR).is_dir()
            or (path / RESULTS_FILE).is_file())


def _model_type(config_file: Path, where: str) -> str | None:
    """The `model_type` of a model's config.json; None when there is none or it is a run's configuration."""
    if not config_file.is_file():
        return None
    try:
        values = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotAModelError(f"{where}: its config.json is unreadable ({error}); {HINT}") from error
    return values.get("model_type") if isinstance(values, dict) else None


def _checkpoint(path: Path, where: str) -> ModelSource:
    values = read_run_config(path) or read_run_config(path.parent.parent)
    if values is None:
        raise NotAModelError(f"{where} is a checkpoint without its run's configuration (run_config.json, or "
                             f"config.json for earlier versions) here or in {path.parent.parent}; {HINT}")
    try:
        config = from_dict(values)
    except ConfigError as error:
        raise NotAModelError(f"{where}: its run configuration does not load ({error}); {HINT}") from error
    weights = ADAPTER_WEIGHTS if config.model.lora else FULL_WEIGHTS
    if not (path / weights).is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise NotAModelError(f"{where} is a checkpoint without {weights} (it holds {found}; a checkpoint saved in "
                             f"shards by FSDP or DeepSpeed is not read here); {HINT}")
    match = CHECKPOINT.match(path.name)
    step = int(match.group(1)) if match else json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["step"]
    return ModelSource("checkpoint", str(path), config, step)


def _run(path: Path, where: str, allow_run: bool) -> ModelSource:
    steps = [f"step_{step}" for step, _ in list_checkpoints(path)]
    has_best = (path / BEST_DIR).is_dir()
    if not steps and not has_best:
        raise NotAModelError(f"{where} is a run folder without checkpoints or best/ (it saved none yet, or they "
                             f"were deleted); pass another run or a Hub id")
    values = read_run_config(path)
    if allow_run and values is not None:
        return ModelSource("run", str(path), from_dict(values))
    held = ", ".join([f"checkpoints/{name}" for name in steps] + ([f"{BEST_DIR}/"] if has_best else []))
    raise NotAModelError(f"{where} is a run folder (it holds {held}), not one model: pass one of them, e.g. "
                         f"{path / (BEST_DIR if has_best else 'checkpoints/' + steps[-1])}"
                         + ("; scripts/evaluate.py --model takes the whole run" if not allow_run else ""))


def _what_is_there(path: Path) -> str:
    """What a folder that is no model holds, and what to pass instead, in words."""
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return f"is an empty folder; {HINT}"
    if path.name == TENSORBOARD_DIR or any(path.rglob("events.out.tfevents.*")):
        return (f"holds TensorBoard logs, not a model: pass {path.parent / BEST_DIR}, one of "
                f"{path.parent / 'checkpoints'}/step_N, or the run folder {path.parent}")
    steps = [name for name in entries if CHECKPOINT.match(name)]
    if steps:
        return (f"holds a run's checkpoints ({', '.join(steps)}), not one model: pass one of them, e.g. "
                f"{path / steps[-1]}, or the run folder {path.parent}")
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"holds no model (no config.json with weights, no {STATE_FILE}; it has {shown}); {HINT}"


def load_checkpoint_model(source: ModelSource, attn_implementation: str | None = None):
    """A checkpoint's model and processor as the loop had them at its step, in eval mode: the run's base model
    built as `load_model` builds it for training, the checkpoint's weights loaded into it (a LoRA adapter merged
    into a plain Whisper, as best/ holds it), and the generation settings the loop evaluated with."""
    config = source.run_config
    model_config = dataclasses.replace(config.model, gradient_checkpointing=False,
                                       attn_implementation=attn_implementation or config.model.attn_implementation)
    model, processor = load_model(model_config, config.eval)
    if config.data.no_speech_fraction > 0:  # as train.setup does: the empty transcript must be one it can give
        allow_empty_transcripts(model.generation_config)
    folder = Path(source.location)
    try:
        if config.model.lora:
            load_adapter(model, folder)
        else:
            _load_full_weights(model, folder / FULL_WEIGHTS)
        if config.train.ema_decay > 0:  # the loop evaluated (and wrote best/) with the averaged weights
            _load_averaged_weights(model, folder / EMA_FILE)
        if config.model.lora:
            model = merged_copy(model)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"{folder}: its weights do not fit the run's base model "
                             f"{config.model.name_or_path!r}: {error}") from error
    model.config.use_cache = True
    model.eval()
    return model, processor


def _load_full_weights(model, path: Path) -> None:
    """`save_state`'s model.safetensors into `model`: every tensor but the tied output projection (saved once,
    as the decoder's embedding) must be there."""
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(str(path)), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [key for key in result.missing_keys if key not in tied]
    if missing or result.unexpected_keys:
        raise ValueError(f"{len(missing)} missing tensors (e.g. {missing[:2]}) and {len(result.unexpected_keys)} "
                         f"unknown ones (e.g. {result.unexpected_keys[:2]})")


def _load_averaged_weights(model, path: Path) -> None:
    """`train.ema_decay`'s average (`loop.run.ema`, saved by name for every trainable weight) into `model`."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if saved.keys() != trainable.keys():
        raise ValueError(f"{path.name} holds {len(saved)} tensors, the model has {len(trainable)} trainable weights")
    with torch.no_grad():
        for name, tensor in saved.items():
            trainable[name].copy_(tensor)


def load_inference_model(name_or_path: str | Path, *, language: str | None = None, task: str | None = None,
                         num_beams: int | None = None, max_length: int | None = None,
                         encoder_window: str | None = None, fallback_language: str = "hindi",
                         attn_implementation: str | None = None, option: str = "--model"):
    """Model (eval mode) and processor of any `--model`: a Hub id or model folder as `load_for_inference` loads
    it, a checkpoint as `load_checkpoint_model` rebuilds it. Arguments that are not None override the decoding the
    folder or run saved. Raises NotAModelError for a folder that is no model."""
    source = identify(name_or_path, option)
    if source.kind != "checkpoint":
        return load_for_inference(source.location if source.kind == "model" else str(name_or_path),
                                  language=language, task=task, num_beams=num_beams, max_length=max_length,
                                  encoder_window=encoder_window, fallback_language=fallback_language,
                                  attn_implementation=attn_implementation or "sdpa")
    model, processor = load_checkpoint_model(source, attn_implementation)
    settings = model.generation_config
    if language or task:
        set_generation_settings(model, language or settings.language, task or settings.task, None)
        processor.tokenizer.set_prefix_tokens(language=settings.language, task=settings.task, predict_timestamps=False)
        check_files_agree(str(name_or_path), model, processor)
    if num_beams is not None:
        settings.num_beams = num_beams
    if max_length is not None:
        settings.max_length = max_length
    if encoder_window is not None:
        set_encoder_window(model, encoder_window, source.run_config.model.encoder_window_multiple_s)
    return model, processor


@contextmanager
def model_folder(name_or_path: str | Path, option: str = "--model"):
    """A `save_pretrained` folder of `name_or_path` for tools that read files (the CTranslate2 converter): a model
    folder as it is, a checkpoint written out like best/ into a temporary folder, removed afterwards."""
    source = identify(name_or_path, option)
    if source.kind != "checkpoint":
        yield Path(source.location)
        return
    model, processor = load_checkpoint_model(source)
    with tempfile.TemporaryDirectory(prefix="whisper-loop-checkpoint-") as staging:
        folder = Path(staging) / source.name.replace("/", "-")  # `<run>-step_N`: the export names it so
        save_model_folder(model, processor, folder)
        yield folder
