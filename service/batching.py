"""Dynamic batching: concurrent requests' items go through one call, as Triton's dynamic batcher and Ray Serve's
`@serve.batch` do. One worker thread per batcher takes the oldest request, adds every request already waiting (and,
with `max_wait_s`, those arriving within it) up to `max_batch` items, makes one call, and hands each request its
own slice. With no wait, a lone client is never delayed: under load, requests queue while a call runs and form the
next batch by themselves.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

_CLOSE = object()


class DynamicBatcher:
    """`batcher(items)` returns `run(all items of the batch)[this request's slice]`, blocking until it is done.

    `run` maps a list of items to a sequence of results of the same length. An exception in `run` is raised in
    every request of that batch, and the batcher goes on with the next one.
    """

    def __init__(self, run: Callable[[list], Sequence], max_batch: int = 64, max_wait_s: float = 0.0,
                 name: str = "batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def __call__(self, items: list) -> list:
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        done: Future = Future()
        self._queue.put((list(items), done))
        return done.result()

    def close(self) -> None:
        """Finish the requests already queued, then stop the worker."""
        self._queue.put(_CLOSE)
        self._thread.join(timeout=30)

    def _collect(self, first) -> tuple[list, bool]:
        """The requests of one call, starting with `first`; and whether close() was asked meanwhile."""
        batch, count = [first], len(first[0])
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_batch:
            try:
                timeout = deadline - time.monotonic()
                nxt = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _CLOSE:
                return batch, True
            batch.append(nxt)
            count += len(nxt[0])
        return batch, False

    def _loop(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is _CLOSE:
                return
            batch, closing = self._collect(first)
            items = [item for request, _ in batch for item in request]
            try:
                results = self.run(items)
            except BaseException as err:  # noqa: BLE001 - handed to the waiting requests, not swallowed
                for _, done in batch:
                    done.set_exception(err)
                continue
            start = 0
            for request, done in batch:
                done.set_result(list(results[start:start + len(request)]))
                start += len(request)
