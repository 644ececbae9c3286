"""The pass registry: `@register_pass("name")` for built-in passes, the `compress.passes` entry-point group for
third-party ones. Lookups of an unknown name suggest the closest registered names."""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from .errors import CompressError

if TYPE_CHECKING:
    from .pass_api import Pass

_PASSES: dict[str, type["Pass"]] = {}
_ENTRY_POINTS_LOADED = False


def register_pass(name: str):
    """Class decorator: make a `Pass` subclass available to recipes under `name`."""

    def decorate(cls: type["Pass"]) -> type["Pass"]:
        existing = _PASSES.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"pass name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return decorate


def _load_builtin_and_plugins() -> None:
    global _ENTRY_POINTS_LOADED
    from . import passes  # noqa: F401  (imports register the built-in passes)

    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="compress.passes"):
        if ep.name not in _PASSES:
            ep.load()  # the module registers itself via @register_pass


def available_passes() -> dict[str, type["Pass"]]:
    _load_builtin_and_plugins()
    return dict(sorted(_PASSES.items()))


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def get_pass(name: str) -> type["Pass"]:
    passes = available_passes()
    if name not in passes:
        raise CompressError(f"unknown pass {name!r}{suggest(name, passes)}; known passes: {', '.join(passes)}")
    return passes[name]
