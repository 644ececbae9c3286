"""The pass registry: `@register_pass("name")` for built-in passes, the `compress.passes` entry-point group for
third-party ones. Lookups of an unknown name suggest the closest registered names."""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from .errors import CompressError, RegistrationError

if TYPE_CHECKING:
    from .pass_api import Pass

_PASSES: dict[str, type["Pass"]] = {}
_ENTRY_POINTS_LOADED = False
# the built-in passes, each imported on first use: importing the KV cache pass registers the "gear_kv" attention,
# which loads transformers' modeling and masking modules (6-9 s on a slow CPU) that a recipe without it, or
# `compress validate`, should not wait for
BUILTIN = {"activation_sparsity": "compress.activation_sparsity:ActivationSparsity",
           "gear_kv": "compress.kvcache.pass_:GearKV", "linearize": "compress.linearize.pass_:Linearize",
           "prune": "compress.prune:Prune", "quantize": "compress.quantize.pass_:Quantize",
           "recover": "compress.recover:Recover", "vq_logits": "compress.vq_logits:VQLogits"}


def register_pass(name: str):
    """Class decorator: make a `Pass` subclass available to recipes under `name`."""

    def decorate(cls: type["Pass"]) -> type["Pass"]:
        existing = _PASSES.get(name)
        # the same class, or the same class defined again (a notebook cell run twice), takes the name (over)
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise RegistrationError(f"pass name {name!r} is already registered by {existing.__module__}."
                                    f"{existing.__qualname__}; register {cls.__name__} under another name")
        home = BUILTIN.get(name, ":").split(":")[0]
        if home and cls.__module__ != home and not cls.__module__.startswith(home + "."):  # even before it loads
            raise RegistrationError(f"pass name {name!r} is already registered: built in ({BUILTIN[name]}); "
                                    f"register {cls.__name__} under another name")
        cls.name = name
        _PASSES[name] = cls
        return cls

    return decorate


_PLUGINS_SCANNED: tuple | None = None  # (the entry_points function scanned, its result)


def _plugins() -> dict:
    """Third-party passes: entry-point name -> entry point (not loaded). Scanned once per process (~10 ms a scan;
    every get_pass asks, to refuse a plugin claiming a built-in name); again if entry_points is replaced (tests)."""
    global _PLUGINS_SCANNED
    if _PLUGINS_SCANNED is None or _PLUGINS_SCANNED[0] is not entry_points:
        _PLUGINS_SCANNED = (entry_points, {ep.name: ep for ep in entry_points(group="compress.passes")})
    return _PLUGINS_SCANNED[1]


def _load(name: str) -> None:
    """Import the module that registers pass `name`, if it is not registered yet. A plugin that fails to import,
    registers no pass of its entry point's name, or claims a built-in name is a one-line CompressError naming it."""
    plugin = _plugins().get(name)
    if name in BUILTIN and plugin is not None:  # which one a recipe means is not ours to guess
        raise CompressError(f"pass {name!r} is built in, and the installed plugin {plugin.value} claims the same "
                            "name; rename its `compress.passes` entry point (or uninstall it)")
    if name in _PASSES:
        return
    if name in BUILTIN:
        importlib.import_module(BUILTIN[name].split(":")[0])  # the module registers itself via @register_pass
        return
    if plugin is None:
        return
    try:
        plugin.load()
    except Exception as exc:  # third-party code: whatever it raises is its failure, reported as such
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise CompressError(f"pass {name!r}: its plugin {plugin.value} failed to import: "
                            f"{type(exc).__name__}: {detail}") from exc
    if name not in _PASSES:
        raise CompressError(f"pass {name!r}: its plugin {plugin.value} registered no pass of that name (its class "
                            f"needs @compress.register_pass({name!r}))")


def _load_builtin_and_plugins() -> None:
    global _ENTRY_POINTS_LOADED
    for name in BUILTIN:
        _load(name)
    if _ENTRY_POINTS_LOADED:
        return
    for name in _plugins():
        _load(name)
    _ENTRY_POINTS_LOADED = True


def pass_names() -> list[str]:
    """Every pass a recipe may name, without importing any (recipe checks, suggestions)."""
    return sorted({*BUILTIN, *_PASSES, *_plugins()})


def available_passes() -> dict[str, type["Pass"]]:
    """Every pass class by name (imports them all)."""
    _load_builtin_and_plugins()
    return dict(sorted(_PASSES.items()))


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def get_pass(name: str) -> type["Pass"]:
    if not isinstance(name, str):  # a pass class, None, a number: said here, not as a TypeError from difflib
        raise CompressError(f"get_pass() takes a pass name such as 'prune', got {name!r:.80}")
    _load(name)
    if name not in _PASSES:
        names = pass_names()
        raise CompressError(f"unknown pass {name!r}{suggest(name, names)}; known passes: {', '.join(names)}")
    return _PASSES[name]
