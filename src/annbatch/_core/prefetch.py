"""Read-ahead: produce the next windows in a background thread while batches are consumed.

The producer thread runs the read pipeline up to ``depth`` windows ahead of the consumer, so
reading (decompression releases the GIL) overlaps with the training step. Memory is bounded
by ``depth`` ready windows plus the one being read and the one being consumed.

An exception in the producer reaches the consumer as the same exception object, with the
producer's frames in its traceback. Closing the consumer (``break``, an exception in the
training step, or dropping the iterator) stops the producer and joins its thread.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterator

T = TypeVar("T")

_POLL_S = 0.05  # how often a blocked producer checks whether it was asked to stop


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_DONE = object()


class Prefetcher(Generic[T]):
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead.

    Parameters
    ----------
    source
        The iterator to run in the background. It is only touched by the producer thread.
    depth
        Number of finished items that may wait for the consumer (>= 1).
    name
        Name of the producer thread (shows up in debuggers and ``threading.enumerate()``).
    """

    def __init__(
        self, source: Iterator[T], depth: int, *, name: str = "annbatch-read-ahead"
    ) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(source,), name=name, daemon=True
        )
        self._thread.start()

    def _produce(self, source: Iterator[T]) -> None:
        try:
            for item in source:
                if not self._put(item) or self._stop.is_set():
                    return
        except BaseException as e:
            self._put(_Failed(e))
        else:
            self._put(_DONE)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
            except queue.Full:
                continue
            return True
        return False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the producer, drop what it read ahead, and wait for its thread to end."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue, and free its items
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()
        while not self._queue.empty():  # an item the producer put while we were draining
            self._queue.get_nowait()

    @property
    def alive(self) -> bool:
        """Whether the producer thread is still running."""
        return self._thread.is_alive()
