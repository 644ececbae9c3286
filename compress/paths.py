"""Paths the user typed (recipes, command lines): `~` and `~name` expanded, an unknown `~name` a user error."""
from __future__ import annotations

from pathlib import Path

from .errors import CompressError


def user_path(text) -> Path:
    """`text` as a Path with `~` expanded; CompressError (not pathlib's RuntimeError traceback) when `~name` names no
    user on this machine, or no home folder can be found."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise CompressError(f"{text}: cannot expand {str(text).split('/', 1)[0]!r} (no such user or home folder "
                            "here); give the full path") from None
