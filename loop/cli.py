"""What every script's command line shares: `--config`, `--output_dir`, the `--section.key=value` options listed
in `--help` from the config dataclasses' own docstrings, and one-line error messages."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing

from loop.config import SECTIONS, ConfigError, Pattern, Range, field_docs, field_types
from loop.config.checks import union_words
from loop.config.loading import SHORT_FORMS, list_presets

HELP_WIDTH = 100


def make_parser(description: str, sections: tuple[str, ...] = tuple(SECTIONS)) -> argparse.ArgumentParser:
    """An ArgumentParser with `--config` and `--output_dir`, whose `--help` lists every `--section.key` option of
    `sections` with its default, its allowed values and its docstring. No abbreviations: `--output x` must not
    quietly become `--output_dir`; it reaches the config as an unknown option and is reported."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False, epilog=options_help(sections))
    parser.add_argument("--config", default=None, help=f"preset name ({', '.join(list_presets())}) or YAML file")
    parser.add_argument("--output_dir", default=None, help="folder for everything the run writes")
    return parser


def options_help(sections: tuple[str, ...]) -> str:
    """The `--section.key=value` options, a paragraph each, grouped by section."""
    lines = ["configuration options (after a preset; --section.key=value or --section.key value):"]
    for section in sections:
        cls = SECTIONS[section]
        docs, defaults = field_docs(cls), {f.name: _default(f) for f in dataclasses.fields(cls)}
        lines.append(f"\n{section}:")
        for name, kind in field_types(cls).items():
            allowed = _allowed(kind)
            lines.append(f"  --{section}.{name}={defaults[name]}" + (f"  ({allowed})" if allowed else ""))
            lines += textwrap.wrap(docs.get(name, ""), HELP_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    short = ", ".join(f"--{name} is --{section}.{key}=true" for name, (section, key) in SHORT_FORMS.items())
    lines.append(f"\nshort forms: {short}")
    return "\n".join(lines)


def _default(spec: dataclasses.Field):
    value = spec.default_factory() if spec.default is dataclasses.MISSING else spec.default
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else value


def _allowed(kind) -> str:
    """`one of a, b`, `>= 1`, ... for a field's type; empty when any value of its type will do."""
    extras = typing.get_args(kind)[1:] if typing.get_origin(kind) is typing.Annotated else ()
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(typing.get_args(kind))
    allowed = ", ".join(extra.describe() for extra in extras if isinstance(extra, (Range, Pattern)))
    return " or ".join([allowed, *union_words(kind)]) if union_words(kind) else allowed


def one_line(error: Exception) -> str:
    """An error as one line for stderr: a ConfigError's problems joined, any other message's whitespace folded."""
    if isinstance(error, ConfigError):
        return "invalid configuration: " + "; ".join(error.problems)
    return " ".join(str(error).split())
