"""Progress bars (rich), on stderr so that `--json` output on stdout stays clean."""
from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def progress_bar(items: Iterable[T], description: str = "", total: int | None = None, enabled: bool = True):
    if not enabled:
        return items
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, total=total, console=Console(stderr=True), transient=True)
