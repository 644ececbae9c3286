"""Progress on stderr (so that `--json` output on stdout stays clean): a rich progress bar on a terminal, and log
lines (start, then at most every few seconds, and the end) when stderr is a file or a pipe, so that a long run in
CI or under nohup shows it is alive."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
LOG_EVERY_SECONDS = 10.0


def progress_bar(items: Iterable[T], description: str = "", total: int | None = None, enabled: bool = True):
    if not enabled:
        return items
    if not sys.stderr.isatty():
        return log_lines(items, description, total)
    from rich.console import Console
    from rich.progress import track

    return track(items, description=description, total=total, console=Console(stderr=True), transient=True)


def log_lines(items: Iterable[T], description: str, total: int | None = None,
              every: float = LOG_EVERY_SECONDS) -> Iterator[T]:
    """Yield `items`, printing `description: i/total (s)` lines to stderr."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    of = f"/{total}" if total is not None else ""
    start = last = time.monotonic()
    print(f"{description}: 0{of}", file=sys.stderr, flush=True)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every or done == total:
            print(f"{description}: {done}{of} ({now - start:.0f} s)", file=sys.stderr, flush=True)
            last = now
