"""The vocabulary of the config dataclasses: the bounds and patterns a field's type carries (`Range`, `Pattern`),
the common field types, the one error every configuration problem is reported in, and where presets live."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
MixedPrecision = Literal["no", "fp16", "bf16"]
MIXED_PRECISION = typing.get_args(MixedPrecision)


@dataclass(frozen=True)
class Range:
    """The values a number field allows, written into its type (`Annotated[int, Range(low=1)]`) and checked for
    every field by `field_problems`: `low <= value <= high`, with open ends where `low_open`/`high_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if isinstance(value, str):  # a word the field's type also allows (`auto`), checked by its `Literal`
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        """`>= 1`, `> 0`, `in (0, 30]`, ..."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Pattern:
    """The strings a field allows (`Annotated[bool | str, Pattern(r"step_\\d+", "step_N")]`), checked by
    `field_problems` like a `Range`; values of the field's other types pass."""

    regex: str
    shown_as: str
    """How `--help` and errors show the allowed strings."""

    def allows(self, value) -> bool:
        return not isinstance(value, str) or re.fullmatch(self.regex, value) is not None

    def describe(self) -> str:
        return self.shown_as


AtLeastOne = Annotated[int, Range(low=1)]
NotNegative = Annotated[int, Range(low=0)]
Probability = Annotated[float, Range(low=0, high=1, high_open=True)]
Share = Annotated[float, Range(low=0, high=1)]  # a share of rows, where all of them (1) is allowed
AUTO = "auto"
BatchSize = Annotated[int | Literal["auto"], Range(low=1)]  # rows, or `auto`: the largest that fits the accelerator


class ConfigError(ValueError):
    """One or more invalid options; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
