"""Read-ahead: produce the next windows in a background thread while batches are consumed.

The producer thread runs the read pipeline up to ``depth`` windows ahead of the consumer, so
reading (decompression releases the GIL) overlaps with the training step. Memory is bounded
by ``depth`` windows being read or waiting, plus the one being consumed.

An exception in the producer reaches the consumer as the same exception object, with the
producer's frames in its traceback. Closing the consumer (``break``, an exception in the
training step, or dropping the iterator) stops the producer and joins its thread.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from annbatch._core.cancel import POLL_S

if TYPE_CHECKING:
    from collections.abc import Iterator

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_DONE = object()

_EXIT_JOIN_S = 10.0  # how long the exit hook waits for each producer to finish its item

_live: weakref.WeakSet[Prefetcher[Any]] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop every producer still running when the interpreter exits, and join its thread.

    A consumer that breaks out of an epoch without closing its iterator (a DataLoader worker
    told to shut down, a script that ends mid-epoch) leaves the producer running. Its thread is
    a daemon: if it were still inside a compiled decoder when finalization kills daemon threads,
    the process could abort. atexit runs before that, so the producers end on their own.
    """
    for prefetcher in list(_live):
        prefetcher.close(timeout=_EXIT_JOIN_S)


class Prefetcher(Generic[T]):
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead.

    The producer takes a slot before it asks ``source`` for the next item, and the consumer
    gives the slot back when it receives that item. So at most ``depth`` items exist that
    the consumer has not received yet (being produced or waiting), plus the one it holds.

    Parameters
    ----------
    source
        The iterator to run in the background. It is only touched by the producer thread.
    depth
        Number of items that may be produced ahead of the consumer (>= 1).
    name
        Name of the producer thread (shows up in debuggers and ``threading.enumerate()``).
    stop
        The event that :meth:`close` sets; pass one that ``source`` also watches, so that an
        item being produced can be abandoned instead of finished.
    """

    def __init__(
        self,
        source: Iterator[T],
        depth: int,
        *,
        name: str = "annbatch-read-ahead",
        stop: threading.Event | None = None,
    ) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)
        self._stop = threading.Event() if stop is None else stop
        self._thread = threading.Thread(
            target=self._produce, args=(source,), name=name, daemon=True
        )
        self._thread.start()
        _live.add(self)

    def _produce(self, source: Iterator[T]) -> None:
        try:
            while self._take_slot():
                try:
                    item = next(source)
                except StopIteration:
                    self._queue.put(_DONE)
                    return
                self._queue.put(item)
        except BaseException as e:
            self._queue.put(_Failed(e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _take_slot(self) -> bool:
        """Wait for a free slot; False once the consumer has asked the producer to stop."""
        while not self._stop.is_set():
            if self._slots.acquire(timeout=POLL_S):
                return not self._stop.is_set()
        return False

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if item is not _DONE and not isinstance(item, _Failed):
            self._slots.release()
            return item  # type: ignore[return-value]
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        raise AssertionError  # pragma: no cover

    def close(self, timeout: float | None = None) -> None:
        """Stop the producer, wait for its thread to end (at most ``timeout`` seconds, if
        given), and drop what it read ahead."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
