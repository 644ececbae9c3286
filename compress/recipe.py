"""Recipes: YAML that names a model, optional calibration data, and an ordered list of passes.

Validation happens before any model loads, and reports every problem at once, each as FILE:LINE:COLUMN: message,
from the YAML node marks: unknown keys, unknown passes (with a suggestion), wrong types, values out of range.

    model: builtin:tiny
    calibration: {source: builtin:calibration, num_samples: 64, seq_len: 256}
    passes:
      - prune: {method: magnitude, sparsity: 0.5}
    output: out/magnitude-50
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .calibration import CalibrationSpec
from .errors import ConfigError, RecipeError
from .registry import available_passes, suggest

TOP_LEVEL_KEYS = ("model", "calibration", "passes", "output")
Marks = dict[tuple, tuple[int, int]]


def _to_python(node: yaml.Node, path: tuple, marks: Marks, loader: yaml.SafeLoader) -> Any:
    """Convert a composed YAML node to Python values, recording the (line, column) of every path."""
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise RecipeError([f"{{file}}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: "
                                   f"duplicate key {key!r}"])
            marks[path + (key, "__key__")] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _to_python(value_node, path + (key,), marks, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(n, path + (i,), marks, loader) for i, n in enumerate(node.value)]
    return loader.construct_object(node, deep=True)


@dataclass
class PassSpec:
    name: str
    args: dict[str, Any]
    path: tuple


@dataclass
class Recipe:
    """A validated recipe. Build with `Recipe.from_yaml(path)` or `Recipe.from_text(text)`."""

    model: str | None
    passes: list[PassSpec]
    calibration: CalibrationSpec | None = None
    output: str | None = None
    text: str = ""
    source: str = "<recipe>"
    base_dir: Path | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.exists():
            raise RecipeError([f"{path}: no such recipe file"])
        return cls.from_text(path.read_text(encoding="utf-8"), source=str(path), base_dir=path.parent)

    @classmethod
    def from_text(cls, text: str, source: str = "<recipe>", base_dir: Path | None = None) -> "Recipe":
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            raise RecipeError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
        finally:
            loader.dispose()
        marks: Marks = {}
        try:
            data = _to_python(node, (), marks, yaml.SafeLoader("")) if node is not None else None
        except RecipeError as exc:
            raise RecipeError([p.format(file=source) for p in exc.problems]) from None
        return _Validator(source, marks).validate(data, text, base_dir)

    def resolved_model(self) -> str | None:
        """The recipe's model; a relative folder that does not exist from here is taken from the recipe's folder."""
        m = self.model
        if m and not m.startswith("builtin:") and not Path(m).exists() and self.base_dir is not None:
            if (self.base_dir / m).exists():
                return str(self.base_dir / m)
        return m

    def build_passes(self):
        from .registry import get_pass

        return [get_pass(s.name)(s.args) for s in self.passes]


class _Validator:
    def __init__(self, source: str, marks: Marks):
        self.source, self.marks, self.problems = source, marks, []

    def where(self, path: tuple, key: bool = False) -> str:
        probe = path + ("__key__",) if key else path
        while probe not in self.marks and probe:
            probe = probe[:-1]
        line, col = self.marks.get(probe, (1, 1))
        return f"{self.source}:{line}:{col}"

    def error(self, path: tuple, message: str, key: bool = False) -> None:
        self.problems.append(f"{self.where(path, key)}: {message}")

    def pydantic_errors(self, base: tuple, exc: ValidationError, what: str) -> None:
        reported = set()
        for err in exc.errors():
            # a union field (e.g. `float | list[float]`) yields one error per member: report the field once,
            # and keep only field names and list indices of the location (not pydantic's member tags)
            loc = tuple(p for i, p in enumerate(err["loc"]) if i == 0 or isinstance(p, int))
            if loc in reported:
                continue
            reported.add(loc)
            if err["type"] == "extra_forbidden":
                name = loc[-1]
                self.error(base + loc, f"{what}: unknown key {name!r}{suggest(str(name), self._fields)}", key=True)
            elif err["type"] == "missing":
                self.error(base, f"{what}: missing required key {'.'.join(map(str, loc))!r}")
            else:
                msg = err["msg"].removeprefix("Value error, ")
                got = f" (got {err.get('input')!r})" if repr(err.get("input")) not in msg else ""
                self.error(base + loc, f"{what}: {'.'.join(map(str, loc))}: {msg}{got}")

    def validate(self, data: Any, text: str, base_dir: Path | None) -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError([f"{self.source}:1:1: a recipe is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}"])
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                self.error((key,), f"unknown key {key!r}{suggest(str(key), TOP_LEVEL_KEYS)}; "
                                   f"a recipe has {', '.join(TOP_LEVEL_KEYS)}", key=True)
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            self.error(("model",), f"model must be a local folder path or builtin:NAME (got {model!r})")
        output = data.get("output")
        if output is not None and not isinstance(output, str):
            self.error(("output",), f"output must be a folder path (got {output!r})")
        calibration = self.calibration(data.get("calibration"))
        passes = self.passes(data.get("passes"))
        if "calibration" not in data:
            for spec, instance in zip(passes, self._instances):
                if instance.needs_calibration_for():
                    self.error(spec.path, f"pass {spec.name!r} with these arguments needs calibration data: add "
                                          "`calibration: {source: builtin:calibration}` to the recipe", key=True)
        if self.problems:
            raise RecipeError(self.problems)
        return Recipe(model=model, passes=passes, calibration=calibration, output=output, text=text,
                      source=self.source, base_dir=base_dir)

    def calibration(self, raw: Any) -> CalibrationSpec | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            raw = {"source": raw}
        if not isinstance(raw, dict):
            self.error(("calibration",), "calibration must be a mapping (source, num_samples, seq_len, seed)")
            return None
        self._fields = list(CalibrationSpec.model_fields)
        try:
            return CalibrationSpec(**raw)
        except ValidationError as exc:
            self.pydantic_errors(("calibration",), exc, "calibration")
            return None

    def passes(self, raw: Any) -> list[PassSpec]:
        self._instances = []
        if raw is None:
            self.error((), "the recipe has no `passes:` list; add at least one pass, e.g. `- prune: {sparsity: 0.5}`")
            return []
        if not isinstance(raw, list) or not raw:
            self.error(("passes",), "passes must be a non-empty list of `- pass_name: {arguments}` items")
            return []
        registered = available_passes()
        specs, self._instances = [], []
        for i, item in enumerate(raw):
            path = ("passes", i)
            if isinstance(item, str):
                item = {item: {}}
            if not isinstance(item, dict) or len(item) != 1:
                self.error(path, "each pass is one `pass_name: {arguments}` mapping")
                continue
            (name, args), = item.items()
            if name not in registered:
                self.error(path + (name,), f"unknown pass {name!r}{suggest(str(name), registered)}; "
                                           f"known: {', '.join(registered)}", key=True)
                continue
            if args is None:
                args = {}
            if not isinstance(args, dict):
                self.error(path + (name,), f"the arguments of pass {name!r} must be a mapping (got {args!r})")
                continue
            cls = registered[name]
            self._fields = list(cls.Config.model_fields)
            try:
                instance = cls(args)
            except ConfigError as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, ValidationError):
                    self.pydantic_errors(path + (name,), cause, f"pass {name!r}")
                else:
                    self.error(path + (name,), f"pass {name!r}: {exc}")
                continue
            specs.append(PassSpec(name=name, args=args, path=path + (name,)))
            self._instances.append(instance)
        return specs
