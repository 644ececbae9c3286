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


class RegistrationError(ConfigError, ValueError):
    """A pass name another class holds (a ValueError too, as it was before it became a CompressError)."""


class ExportError(CompressError):
    """A model that the chosen export format cannot express (e.g. a VQ head in compressed-tensors): names the pass."""


class OutputError(CheckpointError):
    """An output location that cannot or must not be written (a file, the source model, a folder not ours)."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one line for a one-line error: its first line, joined with the next when the
    first only announces it ("Class validation error for validator 'validate_architecture':" then the reason)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return ""
    text = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return text[:limit]


def disk_full_error(exc: BaseException, where) -> OSError | None:
    """A full disk (or quota) however the writer reports it (an OSError from Python, or the text of a Rust io::Error
    from safetensors (SafetensorError) and tokenizers (a plain Exception)) as the OSError that `user_error` prints in
    one line, naming `where`; None for anything else."""
    import errno
    import os

    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    else:
        marks = (f"os error {errno.ENOSPC}", f"code: {errno.ENOSPC},", "No space left on device",
                 f"os error {errno.EDQUOT}", "Disk quota exceeded")
        full = any(mark in str(exc) for mark in marks)
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) if full else None


def user_error(exc: BaseException) -> CompressError | None:
    """The one-line user error for an OS failure that the user's paths or disk caused (the CLI prints it and exits
    2), or None for anything else (a bug: the CLI lets its traceback through)."""
    import errno

    if isinstance(exc, CompressError):
        return exc
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    shown = str(where) if len(str(where)) <= 120 else str(where)[:60] + "..." + str(where)[-40:]
    messages = {
        errno.ENAMETOOLONG: f"path too long ({len(str(where))} characters): {shown}; use a shorter path",
        errno.ENOSPC: f"no space left on the device while writing {shown}; free some space or write elsewhere",
        errno.EACCES: f"permission denied: {shown}",
        errno.EPERM: f"operation not permitted: {shown}",
        errno.EROFS: f"read-only file system: {shown}; write somewhere else",
        errno.ENOTDIR: f"not a folder: {shown}",
        errno.EISDIR: f"is a folder, expected a file: {shown}",
        errno.ENOENT: f"no such file or folder: {shown}",
    }
    message = messages.get(exc.errno)
    return CompressError(message) if message else None
