"""Object storage in forked processes: an error at once instead of a read that never ends.

obstore runs every request on one tokio runtime per process, whose threads start with the
process's first request. ``fork()`` copies only the thread that calls it: a child forked after
its parent used object storage inherits a runtime without threads, and each of its requests,
through an inherited store or a new one (the runtime is the process's, not the store's), waits
forever. This is the case of DataLoader workers started with "fork" (torch's default on Linux)
after the main process opened a remote collection. Processes started with "spawn" or
"forkserver" start their own runtime and read normally.

The process that first used object storage is remembered (:func:`note_remote_use`); a process
with another pid that holds that memory was forked from it, and :func:`check_not_forked` raises
:class:`~annbatch.errors.ForkedRemoteReadError` there before any request is made.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from annbatch.errors import ForkedRemoteReadError

if TYPE_CHECKING:
    from collections.abc import Callable

_USED_BY: int | None = None
"""The pid of the process that first used object storage (its runtime's threads run there)."""
_IMPORTED_BY = os.getpid()
"""The pid of the process that imported annbatch (another pid here: a forked process)."""


def note_remote_use() -> None:
    """Record that this process uses object storage (opens a store, reads an array's metadata
    or chunks through obstore). The first process to do so is kept: a forked child that calls
    this still knows its parent's runtime is the one it inherited."""
    global _USED_BY
    if _USED_BY is None:
        _USED_BY = os.getpid()


def forked_after_remote_use() -> bool:
    """Whether this process was forked from one that had used object storage."""
    return _USED_BY is not None and os.getpid() != _USED_BY


def forked_after_import() -> bool:
    """Whether this process was forked from one that had imported annbatch."""
    return os.getpid() != _IMPORTED_BY


def check_not_forked(url: Callable[[], str]) -> None:
    """Raise :class:`~annbatch.errors.ForkedRemoteReadError` naming ``url()`` if this process
    was forked after its parent used object storage (its reads would never finish)."""
    if forked_after_remote_use():
        msg = (
            f"cannot read {url()} in process {os.getpid()}: it was forked from process "
            f"{_USED_BY} after that process read object storage, and obstore's runtime does not "
            "survive fork() (every request would wait forever). Start DataLoader workers with "
            'the "spawn" or "forkserver" start method: DataLoader(..., '
            'multiprocessing_context="spawn"), or torch.multiprocessing.set_start_method("spawn") '
            "before the DataLoader is made"
        )
        raise ForkedRemoteReadError(msg)


SPAWN_HINT = (
    'if this process is a DataLoader worker started with "fork" (torch\'s default on Linux), '
    'start the workers with "spawn": DataLoader(..., multiprocessing_context="spawn")'
)
"""Added to a remote read's timeout in a forked process (a fork that :func:`check_not_forked`
could not see: object storage used by the parent other than through annbatch)."""
