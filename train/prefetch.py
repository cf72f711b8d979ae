"""Batches drawn and put on the device ahead of the step that uses them, on a background thread.

The host's share of a step (drawing a batch, copying it to the device) then overlaps the device's work on
earlier steps. The sampler runs ahead of training, so its state after a batch travels with that batch:
the loop checkpoints the state after the last batch it *used*, and a resumed run draws exactly the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from omnimoe_jax._config_fields import is_int

_DONE = object()


class BatchPrefetcher:
    """`next()` -> (device batch, sampler state after it), `depth` batches ahead of the caller.

    `draw()` returns the next host batch, `put(batch)` the device array for it, and `state()` (optional)
    the sampler state after the batch just drawn. An exception in the thread is raised by the `next()` that
    would have returned its batch. Use as a context manager (or call `close()`) so the thread stops.
    """

    def __init__(
        self,
        draw: Callable[[], Any],
        *,
        put: Callable[[Any], Any],
        state: Callable[[], Any] | None = None,
        depth: int = 2,
    ):
        if not is_int(depth) or depth < 1:
            raise ValueError(f"depth={depth!r} must be an int >= 1")
        self._draw, self._put, self._state = draw, put, state or (lambda: None)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = (self._put(self._draw()), self._state())
            except BaseException as error:  # handed to the consumer, which raises it
                item = error
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> tuple[Any, Any]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
