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

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .calibration import BUILTIN_TEXTS, CalibrationSpec, source_path
from .errors import CalibrationError, CompressError, ConfigError, RecipeError
from .registry import get_pass, pass_names, suggest

TOP_LEVEL_KEYS = ("model", "calibration", "passes", "output", "export")
Marks = dict[tuple, tuple[int, int]]

# Limits that keep a hostile recipe from exhausting memory or the stack (a real recipe is a few dozen lines).
MAX_RECIPE_BYTES = 1024 * 1024
MAX_DEPTH = 32          # nesting of mappings and lists
MAX_ALIASES = 64        # *alias references
MAX_VALUES = 20_000     # values after alias expansion (an alias "bomb" multiplies them)
NAME_MAX, PATH_MAX = 255, 4096  # what file systems accept for one path component, and for a whole path


class _LimitedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer counts nesting depth and aliases and refuses explicit tags."""

    def __init__(self, stream):
        super().__init__(stream)
        self.depth = self.aliases = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise _LimitError(event.start_mark, f"more than {MAX_ALIASES} aliases; write the values out")
        elif getattr(event, "tag", None) not in (None, "!"):
            raise _LimitError(event.start_mark, f"tag {event.tag.replace('tag:yaml.org,2002:', '!!')} is not allowed in a recipe: remove it (quote the "
                                                "value if it should be a string)")
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _LimitError(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _LimitError(Exception):
    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark, self.message = mark, message


def read_recipe_text(path: Path) -> str:
    """The recipe file as text, or a one-line RecipeError (missing, a folder, too large, not UTF-8, path too long)."""
    from .errors import user_error

    try:
        if not path.is_file():
            what = ("is a folder, not a recipe file" if path.is_dir() else
                    "is not a regular file (a device or pipe); give a YAML file" if path.exists() else
                    "no such recipe file")
            raise RecipeError([f"{path}: {what}"])
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError([f"{path}: {size} bytes, larger than a recipe can be ({MAX_RECIPE_BYTES} bytes)"])
        raw = path.read_bytes()
    except OSError as exc:
        mapped = user_error(exc)
        raise RecipeError([f"recipe: {mapped if mapped else exc.strerror}"]) from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise RecipeError([f"{path}:1: the recipe is UTF-16 text; save it as UTF-8"])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError([f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the recipe as "
                           "UTF-8"]) from None


def _to_python(node: yaml.Node, path: tuple, marks: Marks, loader: yaml.SafeLoader) -> Any:
    """Convert a composed YAML node to Python values, recording the (line, column) of every path."""
    if len(marks) >= MAX_VALUES or len(path) > MAX_DEPTH:
        what = f"more than {MAX_VALUES} values" if len(marks) >= MAX_VALUES else f"nested deeper than {MAX_DEPTH} levels"
        raise RecipeError([f"{{file}}:{node.start_mark.line + 1}:{node.start_mark.column + 1}: {what} once aliases "
                           "are expanded; write the recipe out without aliases"])
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out, merged = {}, {}
        merges = [(k, v) for k, v in node.value if k.tag == "tag:yaml.org,2002:merge"]  # `<<: *defaults`
        if len(merges) > 1:
            mark = merges[1][0].start_mark
            raise RecipeError([f"{{file}}:{mark.line + 1}:{mark.column + 1}: duplicate key '<<' (merge several "
                               "mappings with `<<: [*a, *b]`)"])
        if merges:  # first: the marks of the keys written out (below) win over those of the merged ones
            merged = _merged(merges[0][1], path, marks, loader)
        for key_node, value_node in node.value:
            if (key_node, value_node) in merges:
                continue
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise RecipeError([f"{{file}}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: "
                                   f"key {key!r:.40} is not a name: a recipe's keys are names (quote it if it is one)"])
            if key in out:
                raise RecipeError([f"{{file}}:{key_node.start_mark.line + 1}:{key_node.start_mark.column + 1}: "
                                   f"duplicate key {key!r}"])
            marks[path + (key, "__key__")] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _to_python(value_node, path + (key,), marks, loader)
        return {**merged, **out}  # the keys written out win over the merged ones
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(n, path + (i,), marks, loader) for i, n in enumerate(node.value)]
    if node.style in ("'", '"'):  # quoted: text by the writer's choice (the number hint says to unquote it)
        marks[path + ("__quoted__",)] = marks[path]
    return loader.construct_object(node, deep=True)


def _yaml_hint(value: Any, quoted: bool = False) -> str:
    """YAML 1.1 (PyYAML) reads `1e-4` as text: a float needs a dot in its mantissa and a sign in its exponent
    (1.0e-4, 1.0e+6). Said where it bites; a quoted number is text by the quotes."""
    match = re.fullmatch(r"([-+]?\d+)(\.\d*)?[eE]([-+]?)(\d+)", value) if isinstance(value, str) else None
    if match is None:
        return ""
    mantissa, sign, exponent = match[1] + (match[2] if match[2] not in (None, ".") else ".0"), match[3] or "+", match[4]
    written = f"{mantissa}e{sign}{exponent}"
    if quoted:
        return f"; the quotes make {value!r} text: write {written} without them"
    whole = f" or {int(float(value))}" if sign == "+" and float(value).is_integer() and len(match[4]) < 2 else ""
    return f"; YAML reads {value} as text: write {written}{whole}"


def _merged(node: yaml.Node, path: tuple, marks: Marks, loader: yaml.SafeLoader) -> dict:
    """The mapping(s) a merge key names (`<<: *a` or `<<: [*a, *b]`: the earlier one wins), their values' errors
    reported where they are written."""
    sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
    out: dict = {}
    for source in sources:
        if not isinstance(source, yaml.MappingNode):
            raise RecipeError([f"{{file}}:{source.start_mark.line + 1}:{source.start_mark.column + 1}: `<<` merges "
                               "mappings (`<<: *name` of an anchored mapping)"])
        own = marks.get(path)
        value = _to_python(source, path, marks, loader)
        marks[path] = own  # the mapping is where it is written, not where the merged one is
        out.update({k: v for k, v in value.items() if k not in out})
    return out


@dataclass
class PassSpec:
    name: str
    args: dict[str, Any]
    path: tuple
    location: str = ""  # "recipe.yaml:LINE:COL" of the pass's name: errors found once a model is known point here


@dataclass
class Recipe:
    """A validated recipe. Build with `Recipe.from_yaml(path)` or `Recipe.from_text(text)`."""

    model: str | None
    passes: list[PassSpec]
    calibration: CalibrationSpec | None = None
    output: str | None = None
    text: str = ""
    export_format: str | None = None  # `export: {format: ...}`: native (default) or compressed-tensors
    source: str = "<recipe>"
    base_dir: Path | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        """Read and validate a recipe file (model, calibration, passes, output, export): every mistake is a
        RecipeError naming its file:line:column; a calibration `source` path is taken from the file's folder."""
        path = Path(path)
        return cls.from_text(read_recipe_text(path), source=str(path), base_dir=path.parent)

    @classmethod
    def from_text(cls, text: str, source: str = "<recipe>", base_dir: Path | None = None) -> "Recipe":
        """A recipe from its YAML text; `source` names it in errors, `base_dir` is where relative paths start."""
        if not isinstance(text, str):  # bytes too: the recipe's text is recorded (and hashed) in the checkpoint
            raise RecipeError([f"{source}: Recipe.from_text takes the YAML text as a str, got {type(text).__name__} "
                               "(decode bytes first, or use Recipe.from_yaml(path))"])
        if len(text) > MAX_RECIPE_BYTES:
            raise RecipeError([f"{source}: {len(text)} characters, larger than a recipe can be"])
        loader = None
        try:
            loader = _LimitedLoader(text)  # the reader rejects control characters already here
            node = loader.get_single_node()
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            raise RecipeError([f"{source}:{line}: not valid YAML (character #x{exc.character:04x} is not allowed)"]) from None
        except _LimitError as exc:
            raise RecipeError([f"{source}:{exc.mark.line + 1}:{exc.mark.column + 1}: {exc.message}"]) from None
        except RecursionError:
            raise RecipeError([f"{source}: nested too deeply"]) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
            raise RecipeError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
        finally:
            if loader is not None:
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
        passes = [get_pass(s.name)(s.args) for s in self.passes]
        for p, spec in zip(passes, self.passes):
            p.location = spec.location
        return passes


class _Validator:
    def __init__(self, source: str, marks: Marks):
        self.source, self.marks, self.problems = source, marks, []
        self.base_dir: Path | None = None

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
                if not loc:  # a check across keys (a model validator): the input is the whole mapping
                    self.error(base, f"{what}: {msg}")
                    continue
                # the value, unless our own check's message quotes it already ("greater than 0" shows the bound,
                # not a user's 0: a substring test left that input out)
                quoted = err["type"] == "value_error" and repr(err.get("input")) in msg
                got = "" if quoted else f" (got {err.get('input')!r})"
                self.error(base + loc, f"{what}: {'.'.join(map(str, loc))}: {msg}{got}"
                           f"{_yaml_hint(err.get('input'), base + loc + ('__quoted__',) in self.marks)}")

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
        elif isinstance(model, str) and not model.strip():
            self.error(("model",), "model is empty; give a local folder path or builtin:NAME")
        elif isinstance(model, str) and model.startswith("builtin:"):  # known without loading anything
            from .models import resolve_model_path

            try:
                resolve_model_path(model)
            except CompressError as exc:
                self.error(("model",), str(exc))
        output = data.get("output")
        if output is not None and not isinstance(output, str):
            self.error(("output",), f"output must be a folder path (got {output!r})")
        elif isinstance(output, str) and not output.strip():
            self.error(("output",), "output is empty; give a folder path, e.g. out/NAME")
        if "calibration" in data and data["calibration"] is None:  # (passed, then apply said to add the section)
            self.error(("calibration",), "calibration is empty; give e.g. `{source: builtin:calibration}`, or "
                                         "remove the key")
        for key in ("model", "output"):
            self.check_path((key,), data.get(key), key)
        if isinstance(data.get("calibration"), dict):
            self.check_path(("calibration", "source"), data["calibration"].get("source"), "calibration source")
        elif isinstance(data.get("calibration"), str):
            self.check_path(("calibration",), data["calibration"], "calibration source")
        self.base_dir = base_dir  # relative calibration paths resolve against the recipe's folder too
        calibration = self.calibration(data.get("calibration"))
        passes = self.passes(data.get("passes"))
        if "calibration" not in data:
            for spec, instance in zip(passes, self._instances):
                if instance.needs_calibration_for():
                    self.error(spec.path, f"pass {spec.name!r} with these arguments needs calibration data: add "
                                          "`calibration: {source: builtin:calibration}` to the recipe", key=True)
        export_format = self.export(data.get("export"), passes)
        if self.problems:
            raise RecipeError(self.problems)
        return Recipe(model=model, passes=passes, calibration=calibration, output=output, text=text,
                      source=self.source, base_dir=base_dir, export_format=export_format)

    def export(self, raw: Any, passes: list[PassSpec]) -> str | None:
        """`export: {format: compressed-tensors}`; a pass that format cannot express is reported at its line."""
        from .errors import ExportError
        from .export import FORMATS

        if raw is None:
            return None
        if not isinstance(raw, dict) or set(raw) - {"format"}:
            self.error(("export",), f"export is a mapping with one key, format ({' or '.join(FORMATS)})")
            return None
        fmt = raw.get("format")
        if fmt not in FORMATS:
            self.error(("export", "format"), f"export format must be one of {', '.join(FORMATS)} (got {fmt!r})")
            return None
        if fmt == "compressed-tensors":
            from .export.compressed_tensors import check_passes

            for spec in passes:
                try:
                    check_passes([(spec.name, spec.args)])
                except ExportError as exc:
                    self.error(spec.path, str(exc), key=True)
        return fmt

    def check_path(self, where: tuple, value: Any, what: str) -> None:
        """A path no file system accepts is reported here, with its line, instead of failing when it is opened."""
        if not isinstance(value, str):
            return
        longest = max((len(part.encode()) for part in value.split("/")), default=0)
        if len(value.encode()) > PATH_MAX or longest > NAME_MAX:
            limit = f"{PATH_MAX} bytes" if len(value.encode()) > PATH_MAX else f"{NAME_MAX} bytes per folder or file name"
            self.error(where, f"{what}: path too long ({len(value)} characters; file systems accept {limit})")
        elif "\x00" in value:
            self.error(where, f"{what}: a path cannot contain a NUL character")

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
            spec = CalibrationSpec(**raw)
        except ValidationError as exc:
            self.pydantic_errors(("calibration",), exc, "calibration")
            return None
        spec._location = self.where(("calibration", "seq_len") if "seq_len" in raw else ("calibration",),
                                    key="seq_len" in raw)
        if spec.source.startswith("builtin:"):
            if spec.source not in BUILTIN_TEXTS:
                self.error(("calibration", "source"), f"unknown built-in corpus {spec.source!r}; use one of "
                                                      f"{', '.join(BUILTIN_TEXTS)}")
            self.unused_calibration_keys(raw, spec, None)
            return spec
        if any("calibration source:" in p for p in self.problems):
            return spec  # a path check_path already refused
        try:
            path = source_path(spec.source, self.base_dir)
        except CalibrationError as exc:
            self.error(("calibration", "source"), str(exc))
            return spec
        self.unused_calibration_keys(raw, spec, path)
        return spec

    def unused_calibration_keys(self, raw: dict, spec: CalibrationSpec, path: Path | None) -> None:
        """`text_field` is read from JSON and datasets sources, `split` from datasets folders: set for another
        source they did nothing, silently."""
        json_like = path is not None and (path.is_dir() or path.suffix.lower() in (".json", ".jsonl", ".ndjson"))
        for key, used in (("text_field", json_like), ("split", path is not None and path.is_dir())):
            if key in raw and not used:
                self.error(("calibration", key), f"calibration.{key} does nothing for {spec.source} (it is read "
                                                 f"from {'JSON and ' if key == 'text_field' else ''}datasets-folder "
                                                 "sources); remove it")

    def passes(self, raw: Any) -> list[PassSpec]:
        self._instances = []
        if raw is None:
            self.error((), "the recipe has no `passes:` list; add at least one pass, e.g. `- prune: {sparsity: 0.5}`")
            return []
        if not isinstance(raw, list) or not raw:
            self.error(("passes",), "passes must be a non-empty list of `- pass_name: {arguments}` items")
            return []
        registered = pass_names()
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
            cls = get_pass(name)
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
            if cls.once_per_model and any(spec.name == name for spec in specs):
                self.error(path + (name,), f"pass {name!r} appears twice; the second would replace the first: keep "
                                           "one", key=True)
                continue
            specs.append(PassSpec(name=name, args=args, path=path + (name,),
                                  location=self.where(path + (name,), key=True)))
            self._instances.append(instance)
        return specs
