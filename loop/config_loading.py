"""A `RunConfig` from its sources, checked: defaults -> YAML preset (`--config NAME_OR_PATH`) -> command-line
overrides (`--section.key=value`), or a saved `config.json` (checkpoints and results carry one).

Every problem with a configuration is collected and reported in one `ConfigError` before any model or data loads:
first each field against its own type (`Literal` choices, `Range` bounds: `field_problems`), then the settings
that depend on each other (`validate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml

from loop.config import (
    HUB_ID,
    PRESETS_DIR,
    SECTIONS,
    ConfigError,
    Pattern,
    Range,
    RunConfig,
    field_types,
    option_names,
    resolve_path,
)
from loop.lora import lora_problems, lora_warnings


def preset_path(name_or_path: str) -> Path:
    """`quickstart` -> loop/presets/quickstart.yaml; anything else is a file path."""
    packaged = PRESETS_DIR / f"{name_or_path}.yaml"
    if packaged.exists():
        return packaged
    return resolve_path(name_or_path)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _base_type(kind):
    """`Annotated[int, Range(...)]` -> int; a `Literal` of strings -> str; anything else as it is."""
    if typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) is Literal:
        return str
    return kind


def _coerce(value, kind, where: str, problems: list[str]):
    """Converts a YAML or command-line value to the field's type; records a problem if it cannot."""
    kind = _base_type(kind)
    if isinstance(kind, types.UnionType):  # `bool | str`: the first member the value converts to, in order
        for member in typing.get_args(kind):
            tried: list[str] = []
            coerced = _coerce(value, member, where, tried)
            if not tried:
                return coerced
        problems.append(f"{where}: got {value!r}")
        return None
    if typing.get_origin(kind) is list and dataclasses.is_dataclass((typing.get_args(kind) or (str,))[0]):
        return _coerce_entries(value, typing.get_args(kind)[0], where, problems)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return None
        (item,) = typing.get_args(kind) or (str,)
        if item is not str:  # list[float]: each item as a number, each bad one reported
            items = [_coerce(v, item, f"{where}[{index}]", problems) for index, v in enumerate(value)]
            return None if None in items else items
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


def _coerce_entries(values, kind, where: str, problems: list[str]):
    """A list of `kind` dataclasses from YAML's list of mappings, or from the command line's YAML flow list
    (`[{name: en, weight: 0.2}]`); each entry's keys are checked and coerced like a section's."""
    if isinstance(values, str):
        try:
            values = yaml.safe_load(values) if values.strip() else []
        except yaml.YAMLError as error:
            problems.append(f"{where}: not a YAML list of mappings ({' '.join(str(error).split())})")
            return None
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(entry, dict) for entry in values):
        problems.append(f"{where}: expected a list of mappings such as [{{name: en, weight: 0.2}}], got {values!r}")
        return None
    types_, entries, count = field_types(kind), [], len(problems)
    for index, entry in enumerate(values):
        coerced = {}
        for key, value in entry.items():
            if key not in types_:
                hint = difflib.get_close_matches(str(key), list(types_), n=1)
                problems.append(f"{where}[{index}].{key} is not a field of {kind.__name__}"
                                + (f" (did you mean {hint[0]}?)" if hint else f" (fields: {', '.join(types_)})"))
                continue
            item = _coerce(value, types_[key], f"{where}[{index}].{key}", problems)
            if item is not None:
                coerced[key] = item
        entries.append(kind(**coerced))
    return None if len(problems) > count else entries


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
        types_ = field_types(type(target))
        for key, value in entries.items():
            where = f"{origin}: {section}.{key}"
            if key not in types_:
                hint = difflib.get_close_matches(key, list(types_), n=1)
                problems.append(f"{where} is not an option" + (f" (did you mean {section}.{hint[0]}?)" if hint else ""))
                continue
            coerced = _coerce(value, types_[key], where, problems)
            if coerced is not None:
                setattr(target, key, coerced)


SHORT_FORMS = {"resume": ("train", "resume")}
"""Options other tools spell without a section, accepted as they are: `--resume` is `--train.resume=true`."""


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
            elif key in SHORT_FORMS:
                section, name = SHORT_FORMS[key]
                values.setdefault(section, {})[name] = value
            else:
                same_name = [option for option in option_names() if option.endswith(f".{key}")]
                hint = f"did you mean --{same_name[0]}?" if same_name else "options look like --section.key=value"
                problems.append(f"command line: unknown option --{key} ({hint})")
            continue
        values.setdefault(section, {})[name] = value
    return values, problems


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
        for limit in (extra for extra in extras if isinstance(extra, (Range, Pattern))):
            for item in value if isinstance(value, list) else [value]:  # a list's bounds hold for every item
                if not limit.allows(item):
                    problems.append(f"{option} must be {limit.describe()}, got {item}")
    return problems


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
    problems += lora_problems(config)
    return problems + field_problems(config, "eval") + _guard_set_problems(config) + _augment_problems(config)


def source_problems(prefix: str, source: str, path: str, dataset_name: str, source_option: str = "source",
                    hub_hint: str = "") -> list[str]:
    """Where a source's rows come from (the data section, a `data.mix` entry, a guard set): a folder that exists
    for `common_voice` and `manifest`, a dataset id for `hub`."""
    if source == "hub":
        return [] if dataset_name else [f"{prefix}.dataset_name is required for {source_option}=hub{hub_hint}"]
    if not path:
        return [f"{prefix}.path is required for {source_option}={source}"]
    return [] if resolve_path(path).exists() else [f"{prefix}.path {path!r} does not exist"]


def _language_problems(language: str, option: str) -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    if language.lower() in TO_LANGUAGE_CODE or language.lower() in LANGUAGES:
        return []
    hint = difflib.get_close_matches(language.lower(), list(TO_LANGUAGE_CODE), n=1)
    return [f"{option} {language!r} is not a Whisper language" + (f" (did you mean {hint[0]!r}?)" if hint else "")]


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
    return problems


def data_mix_problems(config: RunConfig) -> list[str]:
    """`data.no_speech_dir` and each `data.mix` entry: its fields, a unique name, its place or dataset, a Whisper
    language, and room left for the data source (the weights sum below 1)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

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
        language = entry.language.lower()
        if language and language not in TO_LANGUAGE_CODE and language not in LANGUAGES:
            problems.append(f"{where}.language {entry.language!r} is not a Whisper language")
    total = sum(entry.weight for entry in d.mix)
    if d.mix and total >= 1:
        problems.append(f"data.mix weights sum to {total:g}: they are shares of each epoch's rows, and the data "
                        "source needs the rest; keep their sum below 1")
    return problems


def _augment_problems(config: RunConfig) -> list[str]:
    """The augment section: its fields, the ranges' ends in order, the noise folder there (its clips are read,
    and an empty folder refused, when `loop.augment.Augmenter` is built)."""
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
            "train.torch_compile with model.encoder_window=dynamic: the encoder compiles again for every window length "
            "(up to 30 at 1-s multiples); raise model.encoder_window_multiple_s for fewer"
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


def from_dict(values: dict) -> RunConfig:
    """Rebuilds a saved configuration (checkpoints and results carry one)."""
    config = RunConfig()
    problems: list[str] = []
    _apply(config, values, "saved config", problems)
    if problems:
        raise ConfigError(problems)
    return config
