"""compress: make pretrained causal language models smaller and faster from one YAML recipe."""
from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging

# PEFT imports bitsandbytes, which on AVX512-BF16 CPUs looks for an optional hub kernel and logs a warning on every
# run without it (a CPU fallback is used; compress never needs that kernel): keep it off users' screens.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
# LLM.int8 layers (quantize method int8) compute in fp16 as bitsandbytes designed them; it logs so at every call of
# every layer (42 lines per decoding step of builtin:tiny), which buries a run's own output
_logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: not record.getMessage().startswith("MatMul8bitLt: inputs will be cast"))


def _require_transformers(minimum: tuple[int, int] = (5, 24)) -> None:
    """Every model call here passes the cache as `cache=`, the name transformers took in 5.24; an older 5.x ignores
    the unknown keyword and decodes without it (wrong tokens, no error), so refuse it at import instead."""
    import sys
    from importlib.metadata import version
    from pathlib import Path

    from packaging.version import Version

    found = version("transformers")
    if Version(found).release[:2] >= minimum:
        return
    message = (f"compress needs transformers >= {minimum[0]}.{minimum[1]} (models take `cache=`), found {found}: "
               f"pip install -U 'transformers>={minimum[0]}.{minimum[1]},<6'")
    if sys.argv and Path(sys.argv[0]).stem in ("compress", "-m"):  # the CLI: one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    raise ImportError(message)


_require_transformers()

from .api import ApplyReport, apply
from .calibration import CalibrationSpec
from .checkpoint import save
from .errors import (CalibrationError, CheckpointError, CompressError, ConfigError, RecipeError, TargetError,
                     UnsupportedModelError)
from .models import load, load_tokenizer
from .pass_api import Pass, PassConfig, PassContext, PassReport
from .recipe import Recipe
from .registry import available_passes, get_pass, register_pass

__all__ = [
    "ApplyReport", "CalibrationError", "CalibrationSpec", "CheckpointError", "CompressError", "ConfigError", "Pass",
    "PassConfig", "PassContext", "PassReport", "Recipe", "RecipeError", "TargetError", "UnsupportedModelError",
    "apply", "available_passes", "get_pass", "load", "load_tokenizer", "register_pass", "save",
]


def __getattr__(name: str):
    # `compress.passes.Prune(...)`: the built-in passes, imported on first use.
    if name == "passes":
        import importlib

        return importlib.import_module(".passes", __name__)
    raise AttributeError(name)
