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


class Ticker:
    """Progress of work counted by hand (training steps), on stderr like `progress_bar`: a rich bar on a terminal,
    log lines otherwise; `note` prints a line above the bar (a training log line)."""

    def __init__(self, description: str, total: int | None = None, done: int = 0, every: float = LOG_EVERY_SECONDS):
        self.description, self.total, self.done, self.every = description, total, done, every
        self.start = self.last = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, completed=done)
        else:
            self._line()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        took = f" ({time.monotonic() - self.start:.0f} s)" if self.done else ""
        print(f"{self.description}: {self.done}{of}{took}", file=sys.stderr, flush=True)

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self._line()
            self.last = now

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
