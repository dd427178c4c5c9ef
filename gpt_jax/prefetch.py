"""Batches built ahead of the step that needs them, by a background thread.

The training loop asks for step k's batch (`get(k)`) right after dispatching step k - 1; by
then a thread has usually built it, placed on the devices, while step k - 1 ran. Batches stay
a pure function of (seed, step): the thread calls the same `batch_of(step)` in step order, so
which thread built a batch, and when, changes nothing.
"""

import queue
import threading
from collections.abc import Callable
from typing import Any

_POLL_S = 0.05  # how often a blocked producer looks for close()


class Prefetcher:
    """Yields batch_of(step) for step = start, start + 1, ..., stop - 1, in that order.

    depth: batches built ahead of the one asked for (a bounded queue between the thread and
    the loop); 0 builds each batch when it is asked for, in the caller's thread. An exception
    raised by batch_of is raised again by the get() of its step. Use it as a context manager,
    or call close(), so the thread stops with the loop, whichever way the loop ends.
    """

    def __init__(self, batch_of: Callable[[int], Any], start: int, stop: int, depth: int):
        self._batch_of, self._depth = batch_of, depth
        self._closed = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0 and start < stop:
            self._thread = threading.Thread(target=self._produce, args=(start, stop),
                                            name="gpt_jax-prefetch", daemon=True)
            self._thread.start()

    def get(self, step: int):
        """Returns step `step`'s batch: the next one, since steps are asked for in order."""
        if self._thread is None:
            return self._batch_of(step)
        built, batch, error = self._queue.get()
        if error is not None:
            raise error
        if built != step:
            raise RuntimeError(f"prefetch: step {step} was asked for, but the next batch built "
                               f"is step {built}'s (steps must be asked for in order)")
        return batch

    def _produce(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            try:
                item = (step, self._batch_of(step), None)
            except BaseException as err:  # noqa: BLE001 (handed to the loop's thread)
                item = (step, None, err)
            if not self._put(item) or item[2] is not None:
                return

    def _put(self, item) -> bool:
        """Puts `item` once the queue has room; returns False when closed first."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        """Stops the thread and waits for it (its batch in hand, if any, is dropped)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
        while not self._queue.empty():  # the built batches' buffers, freed now
            self._queue.get_nowait()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
