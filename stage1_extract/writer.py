"""A background writer: shards are assembled and written while the teacher runs the next batch."""

from __future__ import annotations

import queue
import threading
from typing import Callable


class BackgroundWriter:
    """Runs `fn(item)` for each submitted item on one thread, with at most `max_pending` waiting.

    `submit` blocks when the queue is full (the disk is the bottleneck) and re-raises an error
    the writer hit; `close` writes everything already submitted, then re-raises any error.
    """

    def __init__(self, fn: Callable, max_pending: int = 2):
        self._fn = fn
        self._q: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kava-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while (item := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._fn(item)
                except BaseException as e:  # handed to the main thread by submit/close
                    self._error = e

    def _raise(self):
        if self._error is not None:
            raise RuntimeError(f"the shard writer failed: {self._error}") from self._error

    def submit(self, item) -> None:
        self._raise()
        self._q.put(item)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._raise()
