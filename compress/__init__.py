"""compress: make pretrained causal language models smaller and faster from one YAML recipe."""
from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging

# PEFT imports bitsandbytes, which on AVX512-BF16 CPUs looks for an optional hub kernel and logs a warning on every
# run without it (a CPU fallback is used; compress never needs that kernel): keep it off users' screens.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

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
