"""The plumbing of the merge's I/O threads: a worker fed through a bounded queue, whose errors
surface in the caller, and the signal that stops a thread when the merge is abandoned."""

from __future__ import annotations

import queue
import threading

from loratool.errors import OutputError

QUEUE_DEPTH = 6  # items waiting in each queue between the reader, the math and the writers


class _Stop(Exception):
    """Raised inside an I/O thread told to stop (the merge failed or was interrupted)."""


class _Worker:
    """A thread fed through a bounded queue; errors surface in the caller at the next put/close."""

    _END = object()

    def __init__(self, name: str, depth: int = QUEUE_DEPTH):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "_Worker":
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is self._END or self.stop.is_set():
                    return
                self.handle(item)
        except BaseException as e:  # handed to the main thread
            self.error = e
            self.stop.set()

    def handle(self, item) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                self.check_alive()

    def check_alive(self) -> None:
        """Raise the thread's error, or an internal error if it stopped without one. The error is
        read after the thread is found dead: it sets ``error`` before it ends, so a look before
        could miss an error raised in between (and report the thread stopped instead)."""
        if not self.thread.is_alive():
            if self.error is not None:
                raise self.error
            raise OutputError("internal error: the writer thread stopped")

    def close(self) -> None:
        self.put(self._END)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        self.stop.set()
        while True:  # unblock the thread and let it see the stop flag
            try:
                self.q.get_nowait()
            except queue.Empty:
                break
        try:
            self.q.put_nowait(self._END)
        except queue.Full:
            pass
        self.thread.join(timeout=10)
