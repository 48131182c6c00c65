"""Window buffers: memory that a Loader's windows are read into, kept and reused.

A window of sparse rows is read into two arrays (values and column indices) that live only
until its batches are cut from them: the batches are copies, the user's to keep. glibc hands
allocations of more than 32 MiB back to the kernel as soon as they are freed, so without
reuse every window of every epoch was read into fresh memory (page faults, the kernel
zeroing pages). A :class:`BufferPool` keeps those arrays' memory and hands it out again:
each window takes a :class:`Lease`, reads into arrays from :meth:`Lease.allocate`, and gives
them back with :meth:`Lease.release` once every batch has been cut. An epoch takes its leases
through a :class:`Scope`, which gives back those of windows abandoned mid-epoch (a ``break``)
once the epoch's read threads have stopped. Measured
(``benchmarks/first_epoch.py``, 200,000 x 20,000, 1,500 values per row, a collection): later
epochs 1.13-1.35x the rows/s without the pool.

Pool memory is a private anonymous mapping in ordinary pages (not huge pages, which numpy
asks for from 4 MiB on): on our virtual machines the first touch of fresh huge pages cost
~3.2 s per GiB against ~0.7 s in ordinary pages, and memory the pool reuses costs nothing
either way; pages of a buffer's headroom that a window never writes are never touched.
Private, so that a process forked after an epoch (a DataLoader worker under ``fork``) writes
into copies of its own; the child also starts with every pool empty.

Only memory that no batch can point into is pooled: the roles ``"data"`` and ``"indices"``
(CSR batches are cut by copying rows). Dense windows, whose batches may be views of the
window, always get new memory.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from annbatch._core.types import Role

POOLED_ROLES: frozenset[str] = frozenset({"data", "indices"})
"""Roles of window arrays that batches never alias (see the module docstring)."""

_HEADROOM = 1.25  # a new buffer is this much larger than asked, so that windows of a few
# percent more entries than the first reuse it instead of growing the pool


class BufferPool:
    """Free byte buffers for window arrays, shared by the windows of one Loader.

    Thread-safe. At most ``capacity`` buffers are kept while free; a window that needs more
    memory than any free buffer holds gets a new one (a larger buffer replaces the smallest
    when the pool is full). Buffers are held until the pool is garbage collected or
    :meth:`clear` is called. A forked child process starts with the pool empty.

    Parameters
    ----------
    capacity
        Free buffers kept: two per window that can be in flight at once (values and column
        indices, for the one being consumed plus the ones read ahead).
    """

    def __init__(self, capacity: int = 6) -> None:
        self._capacity = capacity
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()
        empty_in_forked_children(self)

    @property
    def nbytes(self) -> int:
        """Bytes held in free buffers."""
        with self._lock:
            return sum(b.nbytes for b in self._free)

    def scope(self) -> Scope:
        """Leases for one epoch (see :class:`Scope`)."""
        return Scope(self)

    def lease(self) -> Lease:
        """A new lease: the buffers one window reads into."""
        return Lease(self)

    def take(self, nbytes: int) -> np.ndarray:
        """A byte buffer of at least ``nbytes``: the smallest free one that fits, else new."""
        with self._lock:
            fitting = [i for i, b in enumerate(self._free) if b.nbytes >= nbytes]
            if fitting:
                best = min(fitting, key=lambda i: self._free[i].nbytes)
                return self._free.pop(best)
        return anonymous(int(nbytes * _HEADROOM) + 64)

    def give(self, buffers: list[np.ndarray]) -> None:
        """Put ``buffers`` back; the smallest are dropped beyond :attr:`capacity`."""
        with self._lock:
            self._free.extend(buffers)
            self._free.sort(key=lambda b: b.nbytes, reverse=True)
            del self._free[self._capacity :]

    def clear(self) -> None:
        """Drop every free buffer (their memory goes back to the kernel)."""
        with self._lock:
            self._free = []

    def _after_fork(self) -> None:
        # The parent's lock may have been held by one of its threads at the fork.
        self._lock = threading.Lock()
        self._free = []

    def __getstate__(self) -> dict[str, object]:
        # A copy of a Loader (pickled to a DataLoader worker) starts with an empty pool.
        return {"_capacity": self._capacity}

    def __setstate__(self, state: dict[str, object]) -> None:
        self._capacity = int(state["_capacity"])  # type: ignore[call-overload]
        self._free = []
        self._lock = threading.Lock()
        empty_in_forked_children(self)


class Lease:
    """The pooled buffers of one window: an :data:`~annbatch._core.types.Allocate` that
    takes from the pool, and :meth:`release` to give everything back at once.

    Release only when nothing reads or writes the arrays any more (every batch cut); a
    lease never released just leaves its buffers to the garbage collector.
    """

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self._taken: list[np.ndarray] = []
        self._lock = threading.Lock()

    def allocate(self, role: Role, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``; pooled memory for
        the roles in :data:`POOLED_ROLES`, new memory for the others."""
        dtype = np.dtype(dtype)
        if role not in POOLED_ROLES:
            return np.empty(shape, dtype=dtype)
        count = 1
        for n in shape:
            count *= int(n)
        nbytes = count * dtype.itemsize
        buffer = self._pool.take(nbytes)
        with self._lock:
            self._taken.append(buffer)
        return buffer[:nbytes].view(dtype).reshape(shape)

    def release(self) -> None:
        """Give every buffer taken back to the pool (once; later calls do nothing)."""
        with self._lock:
            taken, self._taken = self._taken, []
        if taken:
            self._pool.give(taken)


class Scope:
    """The leases of one epoch: :meth:`lease` as :class:`BufferPool` has it, and
    :meth:`close` to give back every lease not yet released (windows abandoned mid-epoch,
    whose batch cutting was cancelled).

    Close only once the epoch's read threads have stopped (nothing can still write into or
    cut from its windows). Leases of other epochs over the same pool are left alone.
    """

    def __init__(self, pool: BufferPool) -> None:
        self._pool = pool
        self._leases: list[Lease] = []
        self._lock = threading.Lock()

    def lease(self) -> Lease:
        """A new lease of the pool, given back by :meth:`close` at the latest."""
        lease = self._pool.lease()
        with self._lock:
            self._leases.append(lease)
        return lease

    def close(self) -> None:
        """Release every lease of this scope (those released already give nothing)."""
        with self._lock:
            leases, self._leases = self._leases, []
        for lease in leases:
            lease.release()


class _ForkReset(Protocol):
    def _after_fork(self) -> None: ...


_POOLS: weakref.WeakSet[_ForkReset] = weakref.WeakSet()
"""Every pool of memory (window buffers here, batch memory in :mod:`~annbatch._core.lent`):
emptied in a forked child (:func:`empty_in_forked_children`)."""


def empty_in_forked_children(pool: _ForkReset) -> None:
    """Have ``pool._after_fork()`` run in every child forked from now on, while it lives."""
    _POOLS.add(pool)


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def anonymous(nbytes: int) -> np.ndarray:
    """``nbytes`` of new memory: a private anonymous mapping, in ordinary pages (where the
    platform has no such mappings, numpy's memory)."""
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows
        return np.empty(max(nbytes, 1), dtype=np.uint8)
    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=np.uint8)
