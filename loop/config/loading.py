"""A `RunConfig` from its sources, checked: defaults -> YAML preset (`--config NAME_OR_PATH`) -> command-line
overrides (`--section.key=value`), or a saved configuration (a run's `config.json`, a checkpoint's `run_config.json`).

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

from loop.config.checks import config_warnings, dataclass_problems, validate  # noqa: F401  (re-exported)
from loop.config.fields import field_types, option_names, resolve_path
from loop.config.sections import SECTIONS, RunConfig, TrainConfig
from loop.config.types import AUTO, PRESETS_DIR, ConfigError


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
    if typing.get_origin(kind) is Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (types.UnionType, typing.Union):  # `bool | str`, `int | Literal["auto"]`
        for member in typing.get_args(kind):  # the first member the value converts to, in order
            if typing.get_origin(member) is Literal:  # a word of the field's own: only those words
                if str(value) in typing.get_args(member):
                    return str(value)
                continue
            tried: list[str] = []
            coerced = _coerce(value, member, where, tried)
            if not tried:
                return coerced
        problems.append(f"{where}: expected {' or '.join(map(_describe, typing.get_args(kind)))}, got {value!r}")
        return None
    kind = _base_type(kind)
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


def _describe(kind) -> str:
    """How an error names what a union member accepts."""
    if typing.get_origin(kind) is Literal:
        return " or ".join(typing.get_args(kind))
    return {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "a string")


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
    replaced = _batch_number(config, TrainConfig.per_device_train_batch_size)
    values, parse_problems = parse_overrides(overrides or [])
    problems += parse_problems
    _apply(config, values, "command line", problems)
    if output_dir:
        config.output_dir = output_dir
    t = config.train
    if t.per_device_train_batch_size == AUTO and t.auto_effective_batch == 0:  # keep what `auto` replaced
        t.auto_effective_batch = replaced * t.gradient_accumulation_steps
    problems += validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def _batch_number(config: RunConfig, otherwise: int) -> int:
    """The configuration's per-device batch when it is a number (not `auto`), else `otherwise`."""
    batch = config.train.per_device_train_batch_size
    return batch if isinstance(batch, int) else otherwise


def from_dict(values: dict) -> RunConfig:
    """Rebuilds a saved configuration (checkpoints and results carry one)."""
    config = RunConfig()
    problems: list[str] = []
    _apply(config, values, "saved config", problems)
    if problems:
        raise ConfigError(problems)
    return config
