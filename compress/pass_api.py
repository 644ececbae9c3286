"""The contract every pass implements.

A pass is a class registered under a name (`@register_pass`), with a pydantic `Config` (unknown keys are errors),
`apply(model, ctx) -> PassReport` that rewrites the model in place, and `restore(model, entry)` that rebuilds the
compressed module structure from a checkpoint's `compression` entry before the state dict loads."""
from __future__ import annotations

import inspect
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from pydantic import ConfigDict, Field, field_validator
from torch import nn

from .errors import CalibrationError, CompressError, ConfigError, TargetError, UnsupportedModelError
from .strict_config import StrictConfig
from .module_swap import UNTIED_NOTE, head_shares_embedding, replace_module, untie_output_head  # noqa: F401
from .targets import DEFAULT_IGNORE, check_patterns, match_modules


_RESTORING: ContextVar[bool] = ContextVar("compress_restoring", default=False)


def restoring() -> bool:
    """Whether the pass being built restores a checkpoint's record (Pass.from_record), not a new run's recipe."""
    return _RESTORING.get()


class PassConfig(StrictConfig):
    """Base of every pass's arguments: validated, unknown keys rejected, serializable to the checkpoint."""

    model_config = ConfigDict(validate_assignment=True)  # strict, unknown keys refused: StrictConfig

    targets: list[str] = Field(default_factory=lambda: ["Linear"], description="modules to compress: a class name "
                               "(Linear), a regex (re:.*mlp.*) or a dotted module name")
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE),
                              description="modules to leave alone (same forms as targets; ignore wins)")

    def __setattr__(self, name: str, value: Any) -> None:
        """`pass.config.field = value` is checked as the constructor checks it, and fails as a ConfigError."""
        from pydantic import ValidationError

        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            from .registry import _PASSES

            # the pass as recipes and other errors name it ("pass 'gear_kv'"), not its class ("GearKV")
            owner = next((f"pass {n!r}" for n, cls in _PASSES.items() if getattr(cls, "Config", None) is type(self)),
                         type(self).__qualname__.removesuffix(".Config"))
            raise ConfigError("\n".join(f"{owner}: {name} = {value!r}: {e['msg'].removeprefix('Value error, ')}"
                                         for e in exc.errors())) from exc

    @field_validator("targets", "ignore", "train_modules", mode="before", check_fields=False)
    @classmethod
    def _one_pattern(cls, patterns):
        """`targets: Linear` as written in a recipe: one pattern, a list of one (as llm-compressor reads it)."""
        return [patterns] if isinstance(patterns, str) else patterns

    @field_validator("targets", "ignore", "train_modules", check_fields=False)
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        try:
            return check_patterns(patterns)
        except TargetError as exc:  # found by `compress validate`, with no model loaded
            raise ValueError(str(exc)) from None


@dataclass
class PassReport:
    """What a pass did: modules touched, parameter bytes before/after, seconds, and pass-specific figures."""

    name: str
    modules: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    # the whole model's stored tensors at the checkpoint's dtype, before and after this pass (what the checkpoint
    # holds; `bytes_before/after` are the touched modules' tensors in memory, at the compute dtype)
    stored_bytes_before: int | None = None
    stored_bytes_after: int | None = None
    # modules the pass's targets matched but it left alone, and why (e.g. already quantized by an earlier pass)
    skipped: dict[str, str] = field(default_factory=dict)
    # what a user should know of this pass's figures after the later passes ran (`Pass.note_on_later`)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "modules": self.modules, "num_modules": len(self.modules),
            "skipped": self.skipped, "notes": self.notes,
            "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
            "stored_bytes_before": self.stored_bytes_before, "stored_bytes_after": self.stored_bytes_after,
            "seconds": round(self.seconds, 3), "details": self.details,
        }


@dataclass
class PassContext:
    """Everything a pass may ask for while it runs. There is no global state: one context per `apply` call.

    `calibration` is a `compress.calibration.CalibrationSpec` or None; `tokenizer` is needed to turn its text
    into token ids. Batches are built once, on first request, and shared by the passes of a recipe."""

    calibration: Any = None
    tokenizer: Any = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    base_dir: Any = None  # the recipe's folder: relative calibration sources resolve from there
    # a frozen CPU copy of the model as it was before the recipe's first pass (e.g. the teacher of a distillation
    # loss); `compress.apply` makes it only when some pass's `needs_original_model_for()` says so
    original_model: nn.Module | None = None
    _batches: torch.Tensor | None = None
    # a sketch of every text the passes calibrate or train on (compress.calibration.text_sketch), with the earlier
    # applies' (the checkpoint keeps it: an evaluation on that text is told its numbers are flattered)
    calibration_sketch: dict | None = None

    def saw_text(self, ids: torch.Tensor, covered: torch.Tensor | None = None) -> None:
        """Add token ids a pass calibrates or trains on (`covered`: the tokens of 1-D `ids` it uses) to the sketch."""
        from .calibration import text_sketch

        self.calibration_sketch = text_sketch(ids, self.calibration_sketch, covered)

    def calibration_batches(self, pass_name: str = "this pass") -> torch.Tensor:
        """Token ids [num_samples, seq_len] (LongTensor), deterministic by the calibration seed."""
        if self._batches is None:
            if self.calibration is None:
                raise CalibrationError(
                    f"{pass_name} needs calibration data: add a `calibration:` section to the recipe "
                    "(e.g. `calibration: {source: builtin:calibration}`)"
                )
            if self.tokenizer is None:
                raise CompressError(f"{pass_name} needs calibration text, but the model has no tokenizer to encode it: "
                                    "save the tokenizer's files with the model (or pass tokenizer= to apply)")
            from .calibration import build_batches

            say = (lambda line: print(f"note: {line}", file=sys.stderr, flush=True)) if self.progress else None
            self._batches = build_batches(self.calibration, self.tokenizer, self.base_dir, say=say)
            self.saw_text(self._batches)
        return self._batches

    def run_sequential(self, model: nn.Module, on_layer, pass_name: str = "this pass", batch_size: int = 8) -> None:
        """Run `on_layer(step)` for each decoder layer in order, with calibration activations (see sequential.py)."""
        from .sequential import run_sequential

        run_sequential(
            model, self.calibration_batches(pass_name), on_layer,
            device=self.device, batch_size=batch_size, progress=self.progress, description=pass_name,
        )


class _Computed:
    def __repr__(self) -> str:
        return "<computed>"


_COMPUTED = _Computed()


def _signature(config: Any) -> inspect.Signature | None:
    """`Name(config=None, *, setting=default, ...)`, a pass's settings as keyword arguments; None (the plain
    signature) where they do not make one (a Config that is not pydantic's, a setting named `config`)."""
    fields = getattr(config, "model_fields", None)
    if not isinstance(fields, dict) or "config" in fields:
        return None

    def default(field):
        if field.is_required():
            return inspect.Parameter.empty
        if field.default_factory is None:
            return field.default
        if not getattr(field, "default_factory_takes_data", False):
            try:
                return field.default_factory()
            except Exception:  # (a plugin's factory: whatever it raises, the signature shows it as computed)
                pass
        return _COMPUTED

    try:
        settings = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=field.annotation,
                                      default=default(field)) for name, field in fields.items()]
        return inspect.Signature([inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
                                  *settings])
    except (TypeError, ValueError):  # a name that is not an identifier
        return None


class Pass:
    """Base class of compression passes. Subclasses set `Config`, and may set `needs_calibration`."""

    name: ClassVar[str] = "unnamed"
    Config: ClassVar[type[PassConfig]] = PassConfig
    needs_calibration: ClassVar[bool] = False
    # True where a second instance would silently replace the first (one KV cache, one output head): a recipe
    # naming it twice is refused at validation
    once_per_model: ClassVar[bool] = False
    location: str = ""  # "recipe.yaml:LINE:COL" when built from a recipe (Recipe.build_passes): errors point there
    # True when the pass reaches decoder layers only through ctx.run_sequential / sequential.for_each_layer, so it
    # runs on a model whose layers are left on disk (compress.load(max_memory=...))
    supports_offload: ClassVar[bool] = False
    # what the refusal adds where supports_offload depends on the settings (e.g. quantize's method)
    offload_hint: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        signature = _signature(cls.Config)  # help(Prune) showed (config=None, **kwargs), not the settings
        if signature is not None:
            cls.__signature__ = signature

    def __init__(self, config: PassConfig | dict | None = None, **kwargs: Any):
        name = type(self).__name__
        if config is not None and kwargs:
            raise ConfigError(f"{name}: pass either a config (object or dict) or keyword arguments, not both")
        if isinstance(config, PassConfig):
            if not isinstance(config, self.Config):
                raise ConfigError(f"{name} takes a {name}.Config, got {type(config).__qualname__}")
            self.config = config
        elif config is not None and not isinstance(config, dict):
            raise ConfigError(f"{name} takes keyword arguments or a dict of its settings, got {config!r:.60} "
                              f"(e.g. {name}(setting=value, ...))")
        elif config is not None and any(not isinstance(key, str) for key in config):
            odd = next(key for key in config if not isinstance(key, str))
            raise ConfigError(f"{name}: the keys of its settings are names, got {odd!r:.40}")
        else:
            from pydantic import ValidationError

            try:
                self.config = self.Config(**(config or kwargs))
            except ValidationError as exc:
                # keep the pydantic error as the cause: recipe validation maps its locations to YAML lines
                raise ConfigError(format_validation_error(self.name, exc)) from exc
        self.validate_config()

    def validate_config(self) -> None:
        """Cross-field checks that pydantic field constraints cannot express; raise ConfigError."""

    def revalidated(self) -> None:
        """The config checked whole again: fields assigned one by one since the constructor (`p.config.sparsity =
        0.7` after `structure="2:4"`) passed only their own checks, and the run failed at the save, after the work."""
        from pydantic import ValidationError

        if not isinstance(self.config, self.Config):  # (`p.config = {...}`: an AttributeError deep in the run)
            raise ConfigError(f"pass {self.name!r}: its config is a {type(self.config).__name__}, not a "
                              f"{type(self).__name__}.Config: build a new pass, e.g. {type(self).__name__}(...)")
        try:
            self.Config.model_validate(self.config.model_dump())
        except ValidationError as exc:
            raise ConfigError(format_validation_error(self.name, exc)) from exc
        self.validate_config()

    @classmethod
    def from_record(cls, args: dict[str, Any]) -> "Pass":
        """The pass a checkpoint's entry recorded, to restore its modules: checks added since that checkpoint was
        written and that concern only new runs (`restoring()` in validate_config) are skipped, so it still loads."""
        token = _RESTORING.set(True)
        try:
            return cls(args)
        finally:
            _RESTORING.reset(token)

    def calibration_bytes(self, model: nn.Module, calibration) -> int:
        """Memory the pass holds for its calibration at once (`CalibrationSpec` sizes), judged from shapes before
        any work; 0 when small or not estimated. `compress.api.check_calibration` refuses a run it would not fit."""
        return 0

    def needs_calibration_for(self) -> bool:
        """Whether this configured instance needs calibration data (some methods of a pass do, others not)."""
        return self.needs_calibration

    def needs_original_model_for(self) -> bool:
        """Whether this configured instance reads `ctx.original_model` (costs a copy of the model's weights)."""
        return False

    def work_folders(self) -> list[Path]:
        """Folders this configured instance writes while it runs (e.g. Trainer checkpoints): the output folder must
        not hold them, since the checkpoint replaces it (checked before any work)."""
        return []

    def target_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return match_modules(model, self.config.targets, self.config.ignore)

    def apply(self, model: nn.Module, ctx: PassContext) -> PassReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def restore(self, model: nn.Module, entry: dict[str, Any]) -> None:
        """Rebuild compressed modules from a checkpoint entry before weights load. Dense-stored passes do nothing."""

    def write_files(self, model: nn.Module, entry: dict[str, Any], state: dict, folder) -> dict:
        """Called by `save` with the state dict about to be written: a pass that keeps tensors outside the main
        weights (e.g. an adapter folder) writes them under `folder` and returns the state without them."""
        return state

    def read_files(self, model: nn.Module, entry: dict[str, Any], folder) -> None:
        """Called by `load` after the main weights are in: read back what `write_files` wrote."""

    def extra_folders(self, entry: dict[str, Any]) -> list[str]:
        """Subfolders of the checkpoint that `write_files` writes for this entry (their bytes count as the
        checkpoint's; loaders that cannot read them refuse)."""
        return []

    # the file names `write_files` puts in each of those folders: `--overwrite` removes such a folder only while it
    # holds nothing else (a file the user added there is theirs)
    extra_folder_files: tuple[str, ...] = ()

    def entry(self, report: PassReport | None = None) -> dict[str, Any]:
        """What the checkpoint's `compression.passes` list records for this pass."""
        out: dict[str, Any] = {"pass": self.name, "args": self.config.model_dump(mode="json")}
        if report is not None and report.details.get("restore"):
            out["restore"] = report.details["restore"]
        if report is not None and report.details.get("untied"):  # the original stored the head once (budget)
            out["untied"] = True
        return out

    def entry_as_held(self, model: nn.Module, entry: dict[str, Any]) -> dict[str, Any]:
        """`entry` (the model's record of this pass) with what the model now holds outside its weights, read
        from its modules at save time (a pass whose restore record carries values the user can change in memory,
        e.g. activation thresholds, overrides this: the record of the pass's run was saved however they changed)."""
        return entry

    def describe(self, model: nn.Module) -> list[str]:
        """Module names this pass would touch (for `--dry-run`)."""
        return list(self.target_modules(model))

    def taken_by(self, earlier: "Pass", model: nn.Module) -> str | None:
        """Why this pass leaves out the modules that `earlier` (a pass before it in the run) replaces, or None when it
        works on them as well (e.g. gear_kv: a layer an earlier linearize converts keeps no KV cache)."""
        return None

    def planned(self, model: nn.Module, earlier: Sequence["Pass"]) -> tuple[list[str], dict[str, str]]:
        """(the modules this pass will touch once `earlier` ran, {module: why left out}), judged on the model before
        any of them runs: what `--dry-run` lists (`describe` alone lists them against the original model)."""
        listed = self.describe(model)
        skipped: dict[str, str] = {}
        for p in earlier:
            why = self.taken_by(p, model)
            if why:
                skipped.update({n: why for n in p.describe(model) if n in listed and n not in skipped})
        return [n for n in listed if n not in skipped], skipped

    def touches(self, model: nn.Module) -> list[str]:
        """Module names whose weights this pass changes (`describe`, plus e.g. what it trains in full)."""
        return self.describe(model)

    def check(self, model: nn.Module) -> None:
        """Raise ConfigError/UnsupportedModelError if this model's shapes cannot take the pass. Runs on a meta model
        (`--dry-run`) and at the start of `compress.apply`, before any pass does expensive work."""
        self.describe(model)

    def check_after(self, model: nn.Module, earlier: Sequence["Pass"]) -> None:
        """Raise ConfigError if the passes that run before this one (`earlier`, in order) leave `model` in a form
        this pass cannot take; checked on the model before any of them runs."""

    def check_later(self, model: nn.Module, later: "Pass") -> None:
        """Raise ConfigError if a pass that runs after this one (`later`) would work on what this one leaves unused
        (the other direction of `check_after`); checked on the model before any pass runs."""

    def note_on_later(self, model: nn.Module, later: "Pass", later_report: PassReport) -> str | None:
        """A line for this pass's report when a later pass of the same run changes what this one measured (e.g. a
        quality budget met on weights that a later pass then pruned), else None."""
        return None

    def check_with_calibration(self, model: nn.Module, ctx: "PassContext") -> None:
        """Raise ConfigError if the arguments do not fit the run's calibration data (`ctx.calibration`); called
        before any work, after the calibration is known to read."""

    def check_not_unused(self, model: nn.Module, unused: dict[str, str]) -> None:
        """Raise ConfigError if this pass targets a module nothing calls any more (`unused`: name -> why), e.g.
        the gate_proj of an MLP that computes its gate from a quantized copy: compressing it would change nothing
        the model computes."""
        if not unused:
            return
        for target in self.touches(model):
            hit = next((name for name in unused if target == name or target.startswith(name + ".")
                        or name.startswith(target + ".")), None)  # the module, one inside it, or its parent
            if hit is not None:
                leaf = hit.rsplit(".", 1)[-1]
                ignore = [*getattr(self.config, "ignore", []), f"re:.*{leaf}"]
                raise ConfigError(f"{self.name} targets {target}, but {unused[hit]}: set {self.name}'s ignore to "
                                  f"{ignore}")

    def checked(self, model: nn.Module, earlier: Sequence["Pass"] = ()) -> None:
        """`check`, `check_after`, the earlier passes' `check_later` and `check_not_unused` against the modules the
        model already leaves unused (`unused_children()` of its modules), an error prefixed with the pass's place in
        the recipe (`location`) when it came from one."""
        self.located(lambda: (self.revalidated(), self.check(model), self.check_after(model, earlier),
                              [p.check_later(model, self) for p in earlier],
                              self.check_not_unused(model, unused_modules(model)),
                              self._check_not_under_adapter(model)))

    def _check_not_under_adapter(self, model: nn.Module) -> None:
        """A checkpoint that keeps a LoRA adapter unmerged (recover, merge: false): no pass may replace a layer under
        it (the new layer went under the wrapper, and the save failed after all the work); recover says its own."""
        from .recover.lora import unmerged_adapter_layers
        from .targets import within

        wrapped = unmerged_adapter_layers(model)
        if not wrapped or self.name == "recover":
            return
        hit = next((n for n in self.touches(model) if any(within(n, w) for w in wrapped)), None)
        if hit is not None:
            raise ConfigError(f"{self.name}: {hit} carries a LoRA adapter kept unmerged (recover with merge: false), "
                              f"and a pass cannot change the layer under it: apply {self.name} to the checkpoint "
                              "before that recover, or to one whose recover merged (merge: true)")

    def located(self, check):
        """`check()`'s result; its ConfigError / UnsupportedModelError / TargetError names the pass's recipe line."""
        try:
            return check()
        except (ConfigError, UnsupportedModelError, TargetError) as exc:
            if not self.location:
                raise
            raise type(exc)(f"{self.location}: {exc}") from None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        return f"{type(self).__name__}({args})"


def unused_modules(model: nn.Module) -> dict[str, str]:
    """Modules that nothing calls any more, name -> why: what modules' `unused_children()` ({child: why}) say."""
    out = {}
    for name, module in model.named_modules():
        children = getattr(module, "unused_children", None)
        if callable(children):
            out.update({f"{name}.{child}" if name else child: why for child, why in children().items()})
    return out


def left_by_earlier(model: nn.Module, names, earlier: Sequence[Pass], replaces) -> set[str]:
    """`names` less the modules that earlier passes for which `replaces(pass)` holds will replace (their
    `describe`): what a `check_after` still has to work on."""
    left = set(names)
    for p in earlier:
        if replaces(p):
            left -= set(p.describe(model))
    return left


def format_validation_error(pass_name: str, exc) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(arguments)"
        lines.append(f"pass {pass_name!r}: {loc}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


@contextmanager
def timed(report: PassReport):
    """Fill `report.seconds` with the time spent inside the block."""
    t0 = time.perf_counter()
    try:
        yield report
    finally:
        report.seconds = time.perf_counter() - t0


def storage_bytes(tensors) -> int:
    """Bytes held by these tensors' storages, each storage counted once (a meta tensor counts its would-be size)."""
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == "meta":
            total += t.numel() * t.element_size()
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def tensor_bytes(module: nn.Module) -> int:
    """Bytes actually held by the module's parameters and buffers (each storage counted once)."""
    return storage_bytes(list(module.parameters()) + list(module.buffers()))


def stored_parameters(module: nn.Module) -> int:
    """Numbers a model stores: floating tensors of its state dict, each storage once. A packed sparse layer counts
    its kept values (not the zeros, nor its integer indices); a codebook head counts codebook, scales and biases."""
    from .inspection import derived_tensor_names

    seen, total, derived = set(), 0, derived_tensor_names(module)
    for name, t in module.state_dict().items():
        if not t.is_floating_point() or name in derived:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total
