"""Run configuration: typed dataclasses, YAML presets and `--section.key=value` overrides.

Override order is defaults -> YAML preset (`--config NAME_OR_PATH`) -> command-line overrides. Field names follow
`Seq2SeqTrainingArguments` wherever the reference recipe has a name for the setting, so its users find their way.
Every problem with a configuration is collected and reported in one `ConfigError` before any model or data loads.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = Path(__file__).resolve().parent / "presets"

SOURCES = ("common_voice", "hub", "manifest")
MIXED_PRECISION = ("no", "fp16", "bf16")
SELECT_ON = ("dev_slice", "test")
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class ConfigError(ValueError):
    """One or more invalid options; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class DataConfig:
    source: str = "common_voice"
    """Where utterances come from: `common_voice` (an extracted release folder), `hub` (a Hugging Face dataset) or
    `manifest` (CSV/TSV/JSONL files named `<split>.<ext>` in `path`)."""
    path: str = ""
    """Common Voice: the `cv-corpus-*` root or its `<locale>/` folder. Manifest: the folder (or one file) of manifests."""
    locale: str = "hi"
    """Common Voice locale folder to use when `path` is a release root holding several."""
    dataset_name: str = ""
    """Hub dataset id for `source: hub`, e.g. `google/fleurs`."""
    dataset_config: str = ""
    """Hub dataset configuration, e.g. `hi_in`."""
    dataset_revision: str = ""
    """Hub dataset revision, e.g. `refs/convert/parquet`; empty for the default branch."""
    train_splits: list[str] = field(default_factory=lambda: ["train", "dev"])
    """Splits that form the training set (the recipe trains on train + validation)."""
    eval_split: str = "test"
    """The held-out split, evaluated once at the end on the selected model."""
    audio_column: str = "audio"
    """Audio column for hub and manifest sources (bytes, a path, or a datasets Audio column)."""
    text_column: str = "sentence"
    """Transcript column for hub and manifest sources (Common Voice always uses `sentence`)."""
    selection_size: int = 300
    """Utterances held out of the training splits, speaker-disjoint by `client_id`, to pick the best checkpoint."""
    max_train_samples: int = 0
    """Use at most this many training utterances (0: all); for quick experiments."""
    max_eval_samples: int = 0
    """Evaluate at most this many utterances of the selection slice and of the held-out split (0: all)."""
    max_duration_s: float = 30.0
    """Drop clips longer than this many seconds (never more than the model's input window)."""
    min_duration_s: float = 0.5
    """Clips shorter than this are implausible (a 300-byte MP3 decodes to 72 ms); Common Voice's recorder has never
    kept a take under 0.8 s. Training skips implausible rows, evaluation keeps and flags them. 0: no minimum."""
    min_chars_per_second: float = 0.5
    """Transcripts slower than this (characters, spaces included, per second of audio) are implausible: reading
    runs 8-20/s, silence around a one-word sentence takes a real row to about 1; 0.5 means text is missing. 0: off."""
    max_chars_per_second: float = 40.0
    """Transcripts faster than this are implausible (a cut clip, another row's text): twice the fast end of reading
    (20/s), and silence only lowers a row's rate."""
    pack_to_seconds: float = 0.0
    """Training rows only: join consecutive utterances into one row of at most this many seconds (30 fills
    Whisper's window, as distil-whisper trains), so a step sees several utterances per row; 0 keeps one utterance
    per row. Selection and test rows are never packed. Measured in README "Speed and memory"."""
    num_proc: int = 1
    """Processes for feature extraction with `datasets.map`."""
    cache_dir: str = ""
    """Where prepared features are cached (empty: `~/.cache/whisper-loop`). A rerun with the same inputs reuses them."""
    strict: bool = False
    """Stop at the first bad row instead of skipping and counting it."""


@dataclass
class ModelConfig:
    name_or_path: str = "openai/whisper-small"
    """Hub id or local `save_pretrained` folder of the Whisper checkpoint to fine-tune."""
    language: str = "hindi"
    """Language of the transcripts, as a Whisper language name or code."""
    task: str = "transcribe"
    """`transcribe` or `translate`."""
    freeze_encoder: bool = False
    """Train the decoder only."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    apply_spec_augment: bool = False
    """SpecAugment masking of the input features during training (Whisper config's own implementation)."""
    mask_time_prob: float = 0.05
    """SpecAugment: fraction of time steps masked (when `apply_spec_augment`)."""
    mask_feature_prob: float = 0.0
    """SpecAugment: fraction of mel bins masked (when `apply_spec_augment`)."""
    dropout: float = 0.0
    """Dropout probability in the transformer layers."""
    attn_implementation: str = "sdpa"
    """Attention kernel: `sdpa` (PyTorch scaled dot-product attention) or `eager`."""


@dataclass
class TrainConfig:
    per_device_train_batch_size: int = 16
    """Utterances per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-5
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 500
    """Optimizer steps of linear warmup from 0 to `learning_rate`."""
    max_steps: int = 4000
    """Optimizer steps in the whole run (then linear decay reaches 0)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    mixed_precision: str = "fp16"
    """`no`, `fp16` or `bf16`; Accelerate's config file value wins when it sets one. fp16/bf16 need a GPU."""
    logging_steps: int = 25
    """Optimizer steps between log lines (and between host-device syncs for the loss)."""
    save_steps: int = 1000
    """Optimizer steps between checkpoints."""
    save_total_limit: int = 2
    """Checkpoints kept (the best one is never deleted)."""
    seed: int = 42
    """Seed for model init, data order and dropout."""
    dataloader_num_workers: int = 0
    """DataLoader worker processes."""
    resume: bool = False
    """Continue from the newest complete checkpoint in `output_dir`."""
    overwrite_output_dir: bool = False
    """Start afresh in an `output_dir` that holds another run's checkpoints."""
    max_consecutive_nonfinite: int = 10
    """Stop (after saving) when this many optimizer steps in a row have a non-finite loss."""
    torch_compile: bool = False
    """Compile the encoder with `torch.compile` (its input has a fixed shape; the first step then takes minutes)."""
    report_to: str = "tensorboard"
    """`tensorboard` or `none`."""
    push_to_hub: bool = False
    """Upload `best/` to the Hub at the end."""
    hub_model_id: str = ""
    """Repository for `push_to_hub`, e.g. `me/whisper-small-hi`."""


@dataclass
class EvalConfig:
    eval_steps: int = 1000
    """Optimizer steps between evaluations on the selection split."""
    per_device_eval_batch_size: int = 16
    """Utterances per process per generation batch."""
    generation_max_length: int = 225
    """Maximum decoded tokens, prompt included (the recipe's value)."""
    generation_num_beams: int = 1
    """1 for greedy decoding, more for beam search."""
    select_on: str = "dev_slice"
    """`dev_slice` (honest: a speaker-disjoint slice of the training data) or `test` (the recipe's way, which leaks
    the test set into model selection; labelled as such in logs and results.json)."""
    eval_on_start: bool = True
    """Evaluate before the first step, giving `initial_wer`."""
    num_logged_examples: int = 5
    """Reference/prediction pairs logged to TensorBoard at each evaluation."""


@dataclass
class RunConfig:
    output_dir: str = "runs/whisper-small-hi"
    """Folder for checkpoints, TensorBoard logs, `best/` and `results.json`."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "eval": EvalConfig}


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, whitespace folded: the one text that `--help`, the README
    and the code share, so help cannot contradict the field it describes."""
    docs, previous = {}, None
    for node in ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
        elif previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[previous] = " ".join(str(node.value.value).split())
            previous = None
    return docs


def resolve_path(path: str) -> Path:
    """A path as given, else relative to the project root (so presets work from any folder)."""
    candidate = Path(os.path.expanduser(path))
    if candidate.is_absolute() or candidate.exists() or not (PROJECT_ROOT / candidate).exists():
        return candidate
    return PROJECT_ROOT / candidate


def preset_path(name_or_path: str) -> Path:
    """`quickstart` -> loop/presets/quickstart.yaml; anything else is a file path."""
    packaged = PRESETS_DIR / f"{name_or_path}.yaml"
    if packaged.exists():
        return packaged
    return resolve_path(name_or_path)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(value, kind, where: str, problems: list[str]):
    """Converts a YAML or command-line value to the field's type; records a problem if it cannot."""
    origin = typing.get_origin(kind)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return None
        return [str(v) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        problems.append(f"{where}: expected true or false, got {value!r}")
        return None
    if kind in (int, float):
        try:
            number = kind(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (kind is int and isinstance(value, float) and not value.is_integer()):
            problems.append(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
            return None
        return number
    return "" if value is None else str(value)


def _apply(config: RunConfig, values: dict, origin: str, problems: list[str]) -> None:
    """Applies nested `{section: {key: value}}` values onto `config`, recording unknown keys and bad types."""
    for section, entries in values.items():
        if section == "output_dir":
            config.output_dir = str(entries)
            continue
        if section not in SECTIONS:
            hint = difflib.get_close_matches(section, [*SECTIONS, "output_dir"], n=1)
            problems.append(f"{origin}: unknown section '{section}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
            continue
        if entries is None:  # `eval:` with every key commented out: YAML reads it as null
            continue
        if not isinstance(entries, dict):
            problems.append(f"{origin}: section '{section}' must be a mapping of key: value")
            continue
        target = getattr(config, section)
        types_ = _field_types(type(target))
        for key, value in entries.items():
            where = f"{origin}: {section}.{key}"
            if key not in types_:
                hint = difflib.get_close_matches(key, list(types_), n=1)
                problems.append(f"{where} is not an option" + (f" (did you mean {section}.{hint[0]}?)" if hint else ""))
                continue
            coerced = _coerce(value, types_[key], where, problems)
            if coerced is not None:
                setattr(target, key, coerced)


def parse_overrides(args: list[str]) -> tuple[dict, list[str]]:
    """`--train.learning_rate=1e-4` or `--train.learning_rate 1e-4` -> nested dict; returns (values, problems)."""
    values: dict = {}
    problems: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("--"):
            problems.append(f"command line: unexpected argument {arg!r} (options look like --train.max_steps=100)")
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if index < len(args) and not args[index].startswith("--"):
                value = args[index]
                index += 1
            else:
                value = "true"  # a bare flag such as --train.resume
        section, dot, name = key.partition(".")
        if not dot:
            if key == "output_dir":
                values["output_dir"] = value
            else:
                problems.append(f"command line: unknown option --{key} (options look like --section.key=value)")
            continue
        values.setdefault(section, {})[name] = value
    return values, problems


def validate(config: RunConfig) -> list[str]:
    """Every problem with the values, before any model or data loads."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    d, m, t, e = config.data, config.model, config.train, config.eval
    problems = []
    if d.source not in SOURCES:
        problems.append(f"data.source must be one of {', '.join(SOURCES)}, got {d.source!r}")
    if d.source in ("common_voice", "manifest"):
        if not d.path:
            problems.append(f"data.path is required for data.source={d.source}")
        elif not resolve_path(d.path).exists():
            problems.append(f"data.path {d.path!r} does not exist")
    if d.source == "hub" and not d.dataset_name:
        problems.append("data.dataset_name is required for data.source=hub (e.g. google/fleurs)")
    if not d.train_splits:
        problems.append("data.train_splits must name at least one split")
    for name in ("selection_size", "max_train_samples", "max_eval_samples"):
        if getattr(d, name) < 0:
            problems.append(f"data.{name} must be >= 0, got {getattr(d, name)}")
    if d.num_proc < 1:
        problems.append(f"data.num_proc must be >= 1, got {d.num_proc}")
    if not 0 < d.max_duration_s <= 30:
        problems.append(f"data.max_duration_s must be in (0, 30], got {d.max_duration_s}")
    if not 0 <= d.min_duration_s < d.max_duration_s:
        problems.append(f"data.min_duration_s must be 0 (off) or below data.max_duration_s ({d.max_duration_s:g}), "
                        f"got {d.min_duration_s}")
    if not 0 <= d.min_chars_per_second < d.max_chars_per_second:
        problems.append(f"data.min_chars_per_second ({d.min_chars_per_second:g}) must be 0 (off) or more and below "
                        f"data.max_chars_per_second ({d.max_chars_per_second:g})")
    if not 0 <= d.pack_to_seconds <= 30:
        problems.append(f"data.pack_to_seconds must be 0 (off) or in (0, 30], got {d.pack_to_seconds}")

    language = m.language.lower()
    if language not in TO_LANGUAGE_CODE and language not in LANGUAGES:
        hint = difflib.get_close_matches(language, list(TO_LANGUAGE_CODE), n=1)
        problems.append(f"model.language {m.language!r} is not a Whisper language" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if m.task not in ("transcribe", "translate"):
        problems.append(f"model.task must be transcribe or translate, got {m.task!r}")
    problems += _model_path_problems(m.name_or_path, "model.name_or_path")
    for name in ("mask_time_prob", "mask_feature_prob", "dropout"):
        if not 0 <= getattr(m, name) < 1:
            problems.append(f"model.{name} must be in [0, 1), got {getattr(m, name)}")
    if m.attn_implementation not in ("sdpa", "eager"):
        problems.append(f"model.attn_implementation must be sdpa or eager, got {m.attn_implementation!r}")

    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_steps", "logging_steps", "save_steps"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name} must be >= 1, got {getattr(t, name)}")
    if not t.learning_rate > 0:
        problems.append(f"train.learning_rate must be > 0, got {t.learning_rate}")
    for name in ("weight_decay", "max_grad_norm", "warmup_steps", "dataloader_num_workers"):
        if getattr(t, name) < 0:
            problems.append(f"train.{name} must be >= 0, got {getattr(t, name)}")
    if t.warmup_steps > t.max_steps:
        problems.append(f"train.warmup_steps ({t.warmup_steps}) is larger than train.max_steps ({t.max_steps})")
    if t.save_total_limit < 1:
        problems.append(f"train.save_total_limit must be >= 1, got {t.save_total_limit}")
    if t.max_consecutive_nonfinite < 1:
        problems.append(f"train.max_consecutive_nonfinite must be >= 1, got {t.max_consecutive_nonfinite}")
    if t.mixed_precision not in MIXED_PRECISION:
        problems.append(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {t.mixed_precision!r}")
    if t.report_to not in ("tensorboard", "none"):
        problems.append(f"train.report_to must be tensorboard or none, got {t.report_to!r}")
    if t.resume and t.overwrite_output_dir:
        problems.append("train.resume and train.overwrite_output_dir contradict each other: choose one")
    if t.push_to_hub and not t.hub_model_id:
        problems.append("train.hub_model_id is required with train.push_to_hub (e.g. me/whisper-small-hi)")

    if e.eval_steps < 1:
        problems.append(f"eval.eval_steps must be >= 1, got {e.eval_steps}")
    elif e.eval_steps > t.max_steps:
        problems.append(f"eval.eval_steps ({e.eval_steps}) is larger than train.max_steps ({t.max_steps}): no evaluation would run")
    for name in ("per_device_eval_batch_size", "generation_max_length", "generation_num_beams"):
        if getattr(e, name) < 1:
            problems.append(f"eval.{name} must be >= 1, got {getattr(e, name)}")
    if e.select_on not in SELECT_ON:
        problems.append(f"eval.select_on must be one of {', '.join(SELECT_ON)}, got {e.select_on!r}")
    if e.num_logged_examples < 0:
        problems.append(f"eval.num_logged_examples must be >= 0, got {e.num_logged_examples}")
    return problems


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


def load_config(preset: str | None = None, overrides: list[str] | None = None, output_dir: str | None = None) -> RunConfig:
    """Defaults -> preset -> overrides, validated; raises ConfigError listing every problem."""
    config = RunConfig()
    problems: list[str] = []
    if preset:
        path = preset_path(preset)
        if not path.exists():
            problems.append(f"--config {preset!r}: no such preset or file (presets: {', '.join(list_presets())})")
        else:
            try:
                values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as error:
                raise ConfigError([f"{path}: not valid YAML: {error}"]) from error
            if not isinstance(values, dict):
                problems.append(f"{path}: a preset must be a mapping of sections")
            else:
                _apply(config, values, str(path.name), problems)
    values, parse_problems = parse_overrides(overrides or [])
    problems += parse_problems
    _apply(config, values, "command line", problems)
    if output_dir:
        config.output_dir = output_dir
    problems += validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def flat_hparams(config: RunConfig) -> dict:
    """`section.key` -> scalar, lists joined with commas (TensorBoard hparams reject lists)."""
    flat = {"output_dir": config.output_dir}
    for section in SECTIONS:
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            flat[f"{section}.{key}"] = ",".join(value) if isinstance(value, list) else value
    return flat


def from_dict(values: dict) -> RunConfig:
    """Rebuilds a saved configuration (checkpoints and results carry one)."""
    config = RunConfig()
    problems: list[str] = []
    _apply(config, values, "saved config", problems)
    if problems:
        raise ConfigError(problems)
    return config


def add_common_arguments(parser) -> None:
    """`--config` and `--output_dir`, on every script."""
    parser.add_argument("--config", default=None, help=f"preset name ({', '.join(list_presets())}) or YAML file")
    parser.add_argument("--output_dir", default=None, help="folder for everything the run writes")

