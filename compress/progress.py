"""Progress on stderr (so that `--json` output on stdout stays clean): a rich progress bar on a terminal, and log
lines (start, then at most every few seconds, and the end) when stderr is a file or a pipe, so that a long run in
CI or under nohup shows it is alive."""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
LOG_EVERY_SECONDS = 10.0


def _shown(enabled: bool) -> bool:
    """Under a launcher the main process alone shows progress (each rank drew its own bars and spinners)."""
    from .environment import is_main_process

    return enabled and is_main_process()


def progress_bar(items: Iterable[T], description: str = "", total: int | None = None, enabled: bool = True):
    if not _shown(enabled):
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
    start = last = time.monotonic()
    print(status_line(description, 0, total, start), file=sys.stderr, flush=True)
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every or done == total:
            print(status_line(description, done, total, start, now=now), file=sys.stderr, flush=True)
            last = now


def status_line(description: str, done: int, total: int | None, start: float, first: int = 0,
                now: float | None = None) -> str:
    """`description: done/total (elapsed s, ~left s left)`; the estimate from the pace since `first` (a resumed
    count starts above zero)."""
    of = f"/{total}" if total is not None else ""
    if done <= first:
        return f"{description}: {done}{of}"
    elapsed = (time.monotonic() if now is None else now) - start
    left = f", ~{elapsed / (done - first) * (total - done):.0f} s left" if total is not None and done < total else ""
    return f"{description}: {done}{of} ({elapsed:.0f} s{left})"


@contextmanager
def phase(description: str, enabled: bool = True, after: float = 2.0):
    """A step with nothing to count (loading a model, timing generation, writing a checkpoint): a spinner on a
    terminal; elsewhere a line once it has taken `after` seconds and one when it ends (quick steps print nothing).
    Nothing inside may show a progress bar of its own (one live display at a time)."""
    if not _shown(enabled):
        yield
        return
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(description):
            yield
        return
    start, said = time.monotonic(), threading.Event()

    def say() -> None:
        said.set()
        print(f"{description} ...", file=sys.stderr, flush=True)

    timer = threading.Timer(after, say)
    timer.daemon = True
    timer.start()
    ended = "stopped"  # (an error follows, or an interrupt: not "done")
    try:
        yield
        ended = "done"
    finally:
        timer.cancel()
        timer.join()
        if said.is_set():
            print(f"{description}: {ended} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)


class Ticker:
    """Progress of work counted by hand (training steps), on stderr like `progress_bar`: a rich bar on a terminal,
    log lines otherwise; `note` prints a line above the bar (a training log line)."""

    def __init__(self, description: str, total: int | None = None, done: int = 0, every: float = LOG_EVERY_SECONDS):
        self.description, self.total, self.done, self.every = description, total, done, every
        self.first = done
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

    def _line(self, now: float | None = None) -> None:
        print(status_line(self.description, self.done, self.total, self.start, self.first, now), file=sys.stderr,
              flush=True)

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self._line(now)
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


class GenerationProgress:
    """A `generate` streamer (put: the prompt, then each new token): once generating has taken `after` seconds, the
    prompt's forward as a line or spinner, then the new tokens counted by a Ticker (a 32k prompt read for 27 s and
    64 tokens decoded for minutes said nothing until the text came out). Quick generations print nothing."""

    def __init__(self, prompt_tokens: int, new_tokens: int, enabled: bool = True, after: float = 2.0) -> None:
        self.prompt_tokens, self.new_tokens, self.after = prompt_tokens, new_tokens, after
        self.enabled = _shown(enabled)
        self.start = time.monotonic()
        self.tokens = -1  # (the first put is the prompt)
        self.ticker: Ticker | None = None
        self._reading = None  # the prompt's phase, while it is read

    def put(self, value) -> None:
        self.tokens += 1
        if not self.enabled:
            return
        if self.tokens == 0:  # the prompt's forward starts
            self._reading = phase(f"reading the {self.prompt_tokens}-token prompt", after=self.after)
            self._reading.__enter__()
            return
        if self._reading is not None:
            self._reading.__exit__(None, None, None)
            self._reading = None
        if self.ticker is not None:
            self.ticker.advance()
        elif time.monotonic() - self.start >= self.after:
            self.ticker = Ticker(f"generating {self.new_tokens} tokens", total=self.new_tokens, done=self.tokens)

    def end(self, error: BaseException | None = None) -> None:
        """generate calls it when done; call it again with the `error` that stopped generating, if one did (the
        prompt's line then says "stopped", not "done"). Twice is harmless."""
        if self._reading is not None:
            self._reading.__exit__(type(error) if error else None, error, None)
            self._reading = None
        if self.ticker is not None:
            self.ticker.close()
