"""Optional dependencies: the demo, the export and later features live in extras (`pip install -e '.[demo]'`), so
a training install stays lean. A missing one is said in one line that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`module` imported, or `MissingExtra`: "<purpose> needs <module>, which is not installed: pip install -e
    '.[<extra>]'"."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install -e '.[{extra}]'") from error
