"""The built-in pass classes (`compress.passes.Prune(...)`), each imported on first use (registry.BUILTIN).
Third-party passes use the `compress.passes` entry-point group."""
from __future__ import annotations

import importlib

from .registry import BUILTIN

_CLASSES = {path.split(":")[1]: path.split(":")[0] for path in BUILTIN.values()}
__all__ = sorted(_CLASSES)


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion lists the pass classes (imported on first use)
    return sorted({*globals(), *_CLASSES})
