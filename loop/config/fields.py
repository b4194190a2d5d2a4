"""What the config dataclasses say about themselves: each field's docstring and type, every `section.key` option,
a config as a flat dict, and which options a resumed run must keep."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import typing
from pathlib import Path

from loop.config.sections import SECTIONS, RunConfig
from loop.config.types import PROJECT_ROOT


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (its bases' included, a redeclared field's own winning),
    whitespace folded: the one text that `--help`, the docs and the code share, so help cannot contradict the
    field it describes."""
    docs = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        previous = None
        for node in ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body:
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


def field_types(cls) -> dict[str, typing.Any]:
    """Field name -> its type with the `Annotated` metadata kept (the `Range`)."""
    return typing.get_type_hints(cls, include_extras=True)


def option_names() -> list[str]:
    """Every `section.key` option."""
    return [f"{section}.{name}" for section, cls in SECTIONS.items() for name in field_types(cls)]


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)


def flatten(values: dict) -> dict:
    """A saved or live config as `{"section.key": value}` (and `output_dir`), lists joined with commas."""
    flat = {"output_dir": values.get("output_dir")}
    for section in SECTIONS:
        for key, value in (values.get(section) or {}).items():
            flat[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat


def flat_hparams(config: RunConfig) -> dict:
    """`section.key` -> scalar (TensorBoard hparams reject lists)."""
    return flatten(to_dict(config))


# Settings whose change makes a resumed run differ from an uninterrupted one: the rows, their order and what
# augmentation makes of them (data, augment, batch, accumulation, seed) or the parameters the optimizer state
# belongs to (model, frozen encoder). The data options that only say how to prepare (processes, cache folder,
# strictness) are not among them.
NOT_FIXED_ON_RESUME = {"data.num_proc", "data.cache_dir", "data.strict", "data.max_eval_samples", "data.verify_shards"}
FIXED_ON_RESUME = {option for option in option_names()
                   if option.startswith(("data.", "augment."))} - NOT_FIXED_ON_RESUME | {
    "train.per_device_train_batch_size", "train.gradient_accumulation_steps", "train.seed", "train.group_by_length",
    "model.name_or_path", "model.freeze_encoder", "model.lora", "model.lora_rank", "model.lora_target_modules",
    "model.lora_layers", "model.quantization", "train.optimizer", "train.ema_decay", "train.distill_from",
}
NEVER_COMPARED = {"output_dir", "train.resume", "train.overwrite_output_dir", "train.allow_config_change"}


def config_differences(saved: dict, current: RunConfig) -> list[tuple[str, object, object]]:
    """(option, saved value, current value) for every option the two configs set differently; options that only
    one of them knows (a field added or removed between versions) are not compared."""
    before, after = flatten(saved), flat_hparams(current)
    return [(option, before[option], after[option]) for option in after
            if option in before and option not in NEVER_COMPARED and before[option] != after[option]]
