"""Every problem with a configuration, collected before any model or data loads and reported in one
`ConfigError`: first each field against its own type (`Literal` choices, `Range` bounds: `field_problems`), then
the settings that depend on each other (`validate`); and the settings allowed but rarely meant (`config_warnings`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import torch

from loop.config.fields import field_types, resolve_path
from loop.config.sections import RunConfig
from loop.config.types import HUB_ID, Pattern, Range
from loop.languages import language_problem

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""Whisper's linear layers in each transformer layer that can take an adapter (the conv stem and the tied output
layer cannot)."""
LORA_MIN_LEARNING_RATE = 1e-4
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "trackio", "swanlab")
"""The experiment trackers Accelerate speaks to (`train.report_to`)."""


def field_problems(config: RunConfig, section: str) -> list[str]:
    """What each field of `section` says on its own in its type: a `Literal`'s choices, a `Range`'s bounds."""
    return dataclass_problems(getattr(config, section), section)


def dataclass_problems(values, prefix: str) -> list[str]:
    """`field_problems` for any config dataclass (a section, an entry of `data.mix`), options named `prefix.field`."""
    problems = []
    for name, kind in field_types(type(values)).items():
        value, option = getattr(values, name), f"{prefix}.{name}"
        extras = typing.get_args(kind)[1:] if typing.get_origin(kind) is Annotated else ()
        choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else ()
        if choices and value not in choices:
            problems.append(f"{option} must be one of {', '.join(choices)}, got {value!r}")
        words = union_words(kind)
        if words and isinstance(value, str) and value not in words:
            problems.append(f"{option} must be a number or {' or '.join(words)}, got {value!r}")
        for limit in (extra for extra in extras if isinstance(extra, (Range, Pattern))):
            for item in value if isinstance(value, list) else [value]:  # a list's bounds hold for every item
                if not limit.allows(item):
                    problems.append(f"{option} must be {limit.describe()}, got {item}")
    return problems


def union_words(kind) -> tuple[str, ...]:
    """The words a number field also takes (`int | Literal["auto"]` -> ("auto",))."""
    base = typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind
    if typing.get_origin(base) not in (typing.Union, types.UnionType) or str in typing.get_args(base):
        return ()
    return tuple(word for member in typing.get_args(base) if typing.get_origin(member) is Literal
                 for word in typing.get_args(member))


def validate(config: RunConfig) -> list[str]:
    """Every problem with the values, before any model or data loads, section by section: each field against its
    type, then the settings that depend on each other."""
    d, m, t = config.data, config.model, config.train
    problems = field_problems(config, "data")
    problems += source_problems("data", d.source, d.path, d.dataset_name, "data.source", " (e.g. google/fleurs)")
    if not d.train_splits:
        problems.append("data.train_splits must name at least one split")
    if d.min_duration_s >= d.max_duration_s:
        problems.append(f"data.min_duration_s must be 0 (off) or below data.max_duration_s ({d.max_duration_s:g}), "
                        f"got {d.min_duration_s}")
    if d.min_chars_per_second >= d.max_chars_per_second:
        problems.append(f"data.min_chars_per_second ({d.min_chars_per_second:g}) must be 0 (off) or more and below "
                        f"data.max_chars_per_second ({d.max_chars_per_second:g})")
    problems += data_mix_problems(config)
    problems += field_problems(config, "model") + _language_problems(m.language, "model.language")
    problems += _model_path_problems(m.name_or_path, "model.name_or_path")
    problems += field_problems(config, "train")
    if t.resume and t.overwrite_output_dir:
        problems.append("train.resume and train.overwrite_output_dir contradict each other: choose one")
    if t.push_to_hub and not t.hub_model_id:
        problems.append("train.hub_model_id is required with train.push_to_hub (e.g. me/whisper-small-hi)")
    problems += lora_problems(config) + tracker_problems(t.report_to) + engine_problems(config, os.environ)
    if t.distill_from:
        problems += _model_path_problems(t.distill_from, "train.distill_from")
        if t.distill_alpha_ce == 0 and t.distill_alpha_kl == 0:
            problems.append("train.distill_alpha_ce and train.distill_alpha_kl are both 0: nothing to learn from")
    if config.eval.assistant_model:
        problems += _model_path_problems(config.eval.assistant_model, "eval.assistant_model")
    return problems + field_problems(config, "eval") + _guard_set_problems(config) + _augment_problems(config)


def source_problems(prefix: str, source: str, path: str, dataset_name: str, source_option: str = "source",
                    hub_hint: str = "") -> list[str]:
    """Where a source's rows come from (the data section, a `data.mix` entry, a guard set): a folder that exists
    for `common_voice` and `manifest`, a dataset id for `hub`."""
    if source == "hub":
        return [] if dataset_name else [f"{prefix}.dataset_name is required for {source_option}=hub{hub_hint}"]
    if not path:
        return [f"{prefix}.path is required for {source_option}={source}"]
    if source == "shards" and "://" in path:  # a URL: read (and checked) when the run opens its index
        return []
    return [] if resolve_path(path).exists() else [f"{prefix}.path {path!r} does not exist"]


def _language_problems(language: str, option: str) -> list[str]:
    problem = language_problem(language, option)
    return [problem] if problem else []


def _guard_set_problems(config: RunConfig) -> list[str]:
    """Each guard set: a unique name, a Whisper language, a source it can be read from."""
    problems, names = [], set()
    for index, guard in enumerate(config.eval.guard_sets):
        option = f"eval.guard_sets[{index}]"
        if not guard.name:
            problems.append(f"{option}.name is required (it names the set in logs and results.json)")
        elif guard.name in names:
            problems.append(f"{option}.name {guard.name!r} is used twice")
        names.add(guard.name)
        problems += dataclass_problems(guard, option)
        problems += (_language_problems(guard.language, f"{option}.language") if guard.language
                     else [f"{option}.language is required (decoding is forced to it)"])
        problems += source_problems(option, guard.source, guard.path, guard.dataset_name)
        if guard.source == "shards":
            problems.append(f"{option}.source=shards: a guard set is read as utterances (common_voice, manifest or "
                            "hub), not as prepared shards")
    return problems


def data_mix_problems(config: RunConfig) -> list[str]:
    """`data.no_speech_dir` and each `data.mix` entry: its fields, a unique name, its place or dataset, a Whisper
    language, and room left for the data source (the weights sum below 1)."""
    d = config.data
    problems = []
    if d.no_speech_dir and not resolve_path(d.no_speech_dir).is_dir():
        problems.append(f"data.no_speech_dir {d.no_speech_dir!r} is not a folder")
    names = [entry.name for entry in d.mix]
    for index, entry in enumerate(d.mix):
        where = f"data.mix[{index}]" + (f" ({entry.name})" if entry.name else "")
        problems += dataclass_problems(entry, where)
        if not entry.name or not all(c.isalnum() or c in "-_" for c in entry.name):
            problems.append(f"{where}.name must be a short name of letters, digits, - or _ (e.g. en), got {entry.name!r}")
        elif names.count(entry.name) > 1:
            problems.append(f"{where}.name {entry.name!r} is used by more than one data.mix entry")
        problems += source_problems(where, entry.source, entry.path, entry.dataset_name)
        if not entry.train_splits:
            problems.append(f"{where}.train_splits must name at least one split")
        if entry.language:
            problems += _language_problems(entry.language, f"{where}.language")
    problems += streaming_problems(config)
    total = sum(entry.weight for entry in d.mix)
    if d.mix and total >= 1:
        problems.append(f"data.mix weights sum to {total:g}: they are shares of each epoch's rows, and the data "
                        "source needs the rest; keep their sum below 1")
    return problems


def streaming_problems(config: RunConfig) -> list[str]:
    """`data.streaming` streams shards, and only what shards hold: no rows added or cut at run time."""
    d = config.data
    if not d.streaming:
        return []
    fix = "write the shards with scripts/prepare_data.py --shards"
    problems = [] if d.source == "shards" else [f"data.streaming needs data.source=shards, got {d.source}: {fix}"]
    problems += [f"data.mix[{i}] ({entry.name}): data.streaming mixes shard folders only, got source={entry.source}: "
                 f"{fix} (with that source as data.source and its language as model.language)"
                 for i, entry in enumerate(d.mix) if entry.source != "shards"]
    if d.no_speech_fraction > 0:
        problems.append("data.no_speech_fraction is not available with data.streaming: it adds rows to a prepared "
                        "table; set it to 0")
    if d.max_train_samples:
        problems.append("data.max_train_samples is not available with data.streaming: write fewer rows as shards")
    if config.train.per_device_train_batch_size == "auto":
        problems.append("train.per_device_train_batch_size=auto is not available with data.streaming (its search "
                        "takes the longest row of a table read whole): find it with data.streaming=false, then "
                        "give the number")
    return problems


def _augment_problems(config: RunConfig) -> list[str]:
    """The augment section: its fields, the ranges' ends in order, the noise folder there (its clips are read,
    and an empty folder refused, when `loop.data.augment.Augmenter` is built)."""
    a = config.augment
    problems = field_problems(config, "augment")
    if a.speed_perturbation and not a.speed_factors:
        problems.append("augment.speed_factors must name at least one factor with augment.speed_perturbation")
    for name in ("snr_db", "gain_db"):
        low, high = getattr(a, f"{name}_low"), getattr(a, f"{name}_high")
        if low > high:
            problems.append(f"augment.{name}_low ({low:g}) must not be above augment.{name}_high ({high:g})")
    if a.noise_dir and not resolve_path(a.noise_dir).is_dir():
        problems.append(f"augment.noise_dir {a.noise_dir!r} is not a folder")
    return problems


def config_warnings(config: RunConfig) -> list[str]:
    """Settings that are allowed but rarely meant, said once at the start of a run."""
    t = config.train
    warnings = []
    if t.warmup_steps > t.max_steps:
        warnings.append(
            f"train.warmup_steps ({t.warmup_steps}) is larger than train.max_steps ({t.max_steps}): the learning "
            f"rate rises for the whole run and reaches {t.max_steps / t.warmup_steps:.0%} of train.learning_rate"
        )
    if t.torch_compile and config.model.encoder_window == "dynamic":
        warnings.append(
            "train.torch_compile with model.encoder_window=dynamic: the encoder is compiled with dynamic shapes (one "
            "graph for every window length, per train/eval mode), whose kernels can be slower than a fixed window's; "
            "compare samples/s with and without it (python benchmarks/gpu_probe.py)"
        )
    if config.data.timestamp_fraction > 0 and config.augment.speed_perturbation:
        warnings.append(
            "data.timestamp_fraction with augment.speed_perturbation: the timestamps in the labels are not rescaled "
            "with the speed, so a sped-up or slowed row's timestamps are off by up to the factor's difference from 1"
        )
    return warnings + lora_warnings(config)


def _model_path_problems(name_or_path: str, option: str) -> list[str]:
    """A local path must exist; anything else must look like a Hub id (`org/name`)."""
    if not name_or_path:
        return [f"{option} is required"]
    path = resolve_path(name_or_path)
    first = Path(name_or_path).parts[0] if Path(name_or_path).parts else ""
    looks_local = name_or_path.startswith((".", "/", "~")) or (first and resolve_path(first).is_dir())
    if path.exists():
        return [] if (path / "config.json").exists() else [f"{option} {name_or_path!r} has no config.json: not a saved model folder"]
    if looks_local or not HUB_ID.match(name_or_path):
        return [f"{option} {name_or_path!r} does not exist (neither a local folder nor a Hub id like openai/whisper-small)"]
    return []


def bitsandbytes_problem(option: str, value: str) -> str:
    """Why `option=value` (8-bit AdamW, an 8-/4-bit base) cannot run on this machine, or "" when it can."""
    instead = {
        "train.optimizer": "use --train.optimizer=adamw (and --model.lora=true or --model.gradient_checkpointing=true "
                           "to save memory)",
        "model.quantization": "use --model.quantization=none with --model.lora=true (LoRA on a float base)",
    }[option]
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"{option}={value} needs bitsandbytes, which is not installed: pip install -e '.[qlora]' on a CUDA "
                f"machine, or {instead}")
    if not torch.cuda.is_available():
        return (f"{option}={value} needs a CUDA GPU: bitsandbytes' 8-bit optimizer and 8-/4-bit layers run their "
                f"kernels on CUDA, and torch sees no GPU here; {instead}")
    return ""


def lora_problems(config) -> list[str]:
    """The LoRA, quantization and optimizer options together (each field's own type is checked elsewhere)."""
    m, t = config.model, config.train
    problems = []
    unknown = [name for name in m.lora_target_modules if name not in LORA_MODULES]
    if unknown:
        problems.append(f"model.lora_target_modules: {', '.join(unknown)} is not one of {', '.join(LORA_MODULES)}")
    if m.lora and not m.lora_target_modules:
        problems.append("model.lora_target_modules must name at least one layer with model.lora")
    if m.lora and m.freeze_encoder and m.lora_layers == "encoder":
        problems.append("model.lora_layers=encoder with model.freeze_encoder leaves nothing to train: choose one")
    if m.quantization != "none":
        if not m.lora:
            problems.append(f"model.quantization={m.quantization} needs model.lora=true: a quantized base is frozen, "
                            "only adapters over it can train")
        problems += [p for p in [bitsandbytes_problem("model.quantization", m.quantization)] if p]
    if t.optimizer == "adamw_8bit":
        problems += [p for p in [bitsandbytes_problem("train.optimizer", t.optimizer)] if p]
    return problems


def sharding_engine(environ) -> str:
    """The engine `accelerate launch` set up that shards parameters across processes, read from the environment it
    gives them (`ACCELERATE_USE_FSDP`; `ACCELERATE_USE_DEEPSPEED` with ZeRO stage 3, from
    `ACCELERATE_DEEPSPEED_ZERO_STAGE` or the DeepSpeed JSON file it names); "" for none."""
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return ""
    stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    settings_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not stage and settings_file and resolve_path(settings_file).is_file():
        try:
            stage = str(json.loads(resolve_path(settings_file).read_text()).get("zero_optimization", {}).get("stage", ""))
        except (OSError, ValueError):  # DeepSpeed reports its own file's errors, with more to say
            stage = ""
    return "DeepSpeed ZeRO-3" if stage == "3" else ""


def engine_problems(config, environ) -> list[str]:
    """LoRA under an engine that shards parameters: the adapter checkpoints and the merge into best/ read whole
    parameters on the main process, which FSDP and ZeRO-3 hold in pieces across the processes."""
    engine = sharding_engine(environ)
    if not (config.model.lora and engine):
        return []
    return [f"model.lora under {engine} is not supported (the adapters are saved and merged into best/ from whole "
            "parameters, which it shards): with LoRA the base is frozen and the adapters small, so plain data "
            "parallel holds it (accelerate launch --multi_gpu), or ZeRO-2 (accelerate_configs/deepspeed_zero2.yaml)"]


def lora_warnings(config) -> list[str]:
    if config.model.lora and config.train.learning_rate < LORA_MIN_LEARNING_RATE:
        return [(f"model.lora with train.learning_rate={config.train.learning_rate:g}: adapters start at zero and "
                 "usually train at 1e-4 to 1e-3 (the PEFT Whisper notebook: 1e-3)")]
    return []


def tracker_problems(report_to: list[str]) -> list[str]:
    unknown = [name for name in report_to if name not in (*TRACKERS, "none")]
    if unknown:
        return [f"train.report_to: {', '.join(unknown)} is not one of none, {', '.join(TRACKERS)}"]
    if "none" in report_to and len(report_to) > 1:
        return [f"train.report_to: `none` cannot go with other trackers, got {','.join(report_to)}"]
    return []
