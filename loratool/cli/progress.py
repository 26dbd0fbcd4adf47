"""Progress of long work on stderr: a rich bar on a terminal, plain lines elsewhere.

``progress(quiet, what)`` yields ``advance(n, total)`` (or None when quiet), which the library
calls from its worker threads with each number of bytes done and the total. On a terminal it
drives a transient rich bar. When stderr is not a terminal (CI logs, files) it prints one plain
line every ``interval`` seconds, and a last one at the end::

    loratool: merging: 42% (1.2 GiB of 2.9 GiB), 310.0 MiB/s, ETA 6 s

With ``unit`` other than "bytes" it counts things of that unit (compose counts modules)::

    loratool: composing: 7% (12 of 154 modules), 5.2 modules/s, ETA 27 s

so that a long run in CI is not silent and its log stays readable.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator, TextIO

from loratool.cli.render import human_bytes

Advance = Callable[[int, int], None]


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


class PlainProgress:
    """Periodic plain lines: percent, amount done (bytes, or a count of ``unit``), rate and ETA
    (thread-safe; ``clock`` for tests)."""

    def __init__(self, what: str, stream: TextIO, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, unit: str = "bytes"):
        self.what, self.stream, self.interval, self.clock, self.unit = what, stream, interval, clock, unit
        self.done = 0
        self.total = 0
        self.start = clock()
        self.last = self.start
        self.lines = 0
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = []
        if self.unit == "bytes":
            done, total, per_s = human_bytes(self.done), human_bytes(self.total), f"{human_bytes(int(rate))}/s"
        else:
            done, total, per_s = f"{self.done}", f"{self.total} {self.unit}", f"{rate:.1f} {self.unit}/s"
        if self.total:
            parts.append(f"{min(100, int(100 * self.done / self.total))}% ({done} of {total})")
        else:
            parts.append(done if self.unit == "bytes" else f"{done} {self.unit}")
        parts.append(per_s)
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        elif self.total and self.done >= self.total:
            parts.append(f"done in {_duration(elapsed)}")
        return f"loratool: {self.what}: " + ", ".join(parts)

    def advance(self, n: int, total: int) -> None:
        with self._lock:
            self.done += n
            self.total = total or self.total
            now = self.clock()
            if now - self.last >= self.interval:
                self.last = now
                self._emit()

    def finish(self) -> None:
        with self._lock:
            if self.done:
                self._emit()

    def _emit(self) -> None:
        self.lines += 1
        self.stream.write(self.line() + "\n")
        self.stream.flush()


@contextlib.contextmanager
def progress(quiet: bool, what: str, interval: float = 10.0, unit: str = "bytes") -> Iterator[Advance | None]:
    """A progress callback over bytes (or a count of ``unit``) for the duration of the block (see
    the module docstring); None when ``quiet``."""
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        plain = PlainProgress(what, sys.stderr, interval, unit=unit)
        ok = False
        try:
            yield plain.advance
            ok = True
        finally:
            if ok:
                plain.finish()
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from loratool.cli.render import console

    amount = (DownloadColumn(binary_units=True), TransferSpeedColumn()) if unit == "bytes" else \
        (MofNCompleteColumn(), TextColumn(unit))
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), *amount, TimeRemainingColumn(),
                  console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)

        def advance(n: int, total: int) -> None:  # called from the writer thread
            bar.update(task, advance=n, total=total)

        yield advance
