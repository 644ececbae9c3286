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


def with_usual_mode(path) -> None:
    """Give a file made by tempfile.mkstemp (owner-only, 0600) the mode a new file gets (0666 less the umask), for
    the files it becomes at the user's paths."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
