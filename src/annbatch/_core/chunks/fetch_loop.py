"""The process's fetch loop: one asyncio event loop in a daemon thread that every request to
object storage is awaited on, and the gates that bound the requests in flight.

A forked child has no fetch thread: it starts a loop of its own on first use (whether it may
use object storage at all is :mod:`annbatch._core.fork_guard`'s question).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING, Any

from annbatch._core.fork_guard import note_remote_use

if TYPE_CHECKING:
    from collections.abc import Coroutine, Sequence
    from concurrent.futures import Future


class _FetchLoop:
    """An asyncio event loop in a daemon thread, one per process, and its gates."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.gates: dict[tuple[str, int], asyncio.Semaphore] = {}  # touched on the loop only
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="annbatch-fetch", daemon=True
        )
        self.thread.start()


_LOCK = threading.Lock()
_CURRENT: list[_FetchLoop] = []


def _after_fork() -> None:  # the child has no fetch thread, and the lock may have been held
    global _LOCK
    _LOCK = threading.Lock()
    _CURRENT.clear()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork)


def submit(coroutine: Coroutine[Any, Any, Any]) -> Future[Any]:
    """Start ``coroutine`` on this process's fetch loop."""
    note_remote_use()
    with _LOCK:
        if not _CURRENT or _CURRENT[0].pid != os.getpid():
            _CURRENT[:] = [_FetchLoop()]
        loop = _CURRENT[0].loop
    return asyncio.run_coroutine_threadsafe(coroutine, loop)


def on_fetch_thread() -> bool:
    """Whether the caller runs on the fetch loop's own thread (where blocking on the loop
    would never end)."""
    return bool(_CURRENT) and threading.current_thread() is _CURRENT[0].thread


def _gate(limit: int, kind: str) -> asyncio.Semaphore:
    """The process's gate for ``limit`` requests of ``kind`` in flight (on the fetch loop).
    Shard indexes have a gate of their own, so that a task's index never waits behind the
    data requests of tasks planned after it."""
    gates = _CURRENT[0].gates
    if (kind, limit) not in gates:
        gates[kind, limit] = asyncio.Semaphore(limit)
    return gates[kind, limit]


async def gather(
    jobs: Sequence[Coroutine[Any, Any, Any]], limit: int, kind: str = "data"
) -> list[Any]:
    """Await ``jobs``, at most ``limit`` of ``kind`` at a time in the process, results in
    order (on the fetch loop). The first failure cancels the jobs still running or waiting
    (their requests stop), then is raised."""
    gate = _gate(limit, kind)

    async def one(job: Coroutine[Any, Any, Any]) -> Any:
        try:
            async with gate:
                return await job
        finally:
            job.close()  # never started (cancelled while waiting): not "never awaited"

    running = [asyncio.ensure_future(one(job)) for job in jobs]
    try:
        return await asyncio.gather(*running)
    except BaseException:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        raise
