"""User-facing errors. Anything raised as a `CompressError` is a user mistake: the CLI prints its message in one or
two lines and exits 2, with no traceback. Every message says what to fix."""
from __future__ import annotations


class CompressError(Exception):
    """A user mistake (bad recipe, missing file, unsupported model, impossible shapes)."""


class RecipeError(CompressError):
    """One or more problems in a recipe; each problem carries its FILE:LINE:COLUMN."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class TargetError(CompressError):
    """A target or ignore pattern that matches nothing, or is malformed."""


class CheckpointError(CompressError):
    """A checkpoint that cannot be read: missing, newer format, wrong tensors, pickle refused."""


class UnsupportedModelError(CompressError):
    """An architecture or module layout that a pass cannot handle."""


class CalibrationError(CompressError):
    """Calibration data missing, unreadable, or too short."""


class ConfigError(CompressError):
    """Pass arguments that are individually valid but impossible together or for this model."""
