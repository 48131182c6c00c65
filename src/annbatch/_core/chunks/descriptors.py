"""Read-only file descriptors of local shards, kept open between windows.

A window of an atlas reads a few hundred small ranges from the shard files of dozens of
datasets (obs columns, ``indptr``, X's values and column indices). Opening and closing each
file for every window cost ~12 us a file on the window's critical path (the GIL held; ~8% of
the CPU of a 20M-cell stream). :data:`OPEN_FILES` keeps them open, bounded and shared by the
process's readers:

- A descriptor belongs to one :class:`~annbatch._core.chunks.reader.ChunkReader` (its
  ``owner`` token), never to a path alone: a reader opened later on a path whose file was
  replaced (a collection rebuilt in place) opens the new file. As before, a reader assumes
  that its files are not replaced while it lives: it caches their shard indexes, and a
  descriptor it gets after an eviction opens whatever file is at the path then.
- A read *borrows* descriptors (:class:`Borrowed`) and gives them back when done; only a
  descriptor nobody borrows is ever closed, so a read never sees its descriptor closed (and
  the number reused for another file) under it, whichever thread evicts.
- At most :data:`CAPACITY` idle descriptors stay open (least recently used closed first);
  a reader's are closed when it is garbage collected (at the pool's next use if its lock
  is taken then: the garbage collector may run on a thread that holds it); a forked child
  closes its copies; out of descriptors (EMFILE), the idle ones are closed and the open
  tried again.
- A chunk table's files (:class:`Pinned`) are borrowed once, when a read first needs each,
  and given back when the table is garbage collected (a reader's files pinned by a table
  are closed only then): a window of an atlas then finds its few hundred descriptors by
  number, with no bookkeeping per file (borrowing and giving back each for every read cost
  ~8% of the CPU of a 100M-cell stream). Tables reserve at most half of :data:`CAPACITY`
  descriptors per process (one per file; a file in two tables counts twice); a table
  beyond that borrows per read as before.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import threading
import weakref
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence


MOST = 4096
"""The most idle descriptors kept open: a window of a 100-million-cell collection of 96
datasets touches ~400 files and an epoch all of its ~3,000 (benchmarks/scale.py); with 256
kept, every window closed and reopened most of them."""


def _capacity() -> int:
    try:
        import resource  # POSIX

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 128
    if soft == resource.RLIM_INFINITY:
        return MOST
    return max(16, min(MOST, soft // 4))  # leave most of the process's limit to others


CAPACITY = _capacity()
"""Idle descriptors kept open per process: a quarter of ``RLIMIT_NOFILE``, at most
:data:`MOST`."""

_owners = itertools.count()


def new_owner() -> int:
    """A token for the descriptors of one reader (see :meth:`OpenFiles.forget`)."""
    return next(_owners)


class _Entry:
    __slots__ = ("fd", "forgotten", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 1  # reads that borrow it now
        self.forgotten = False  # its reader is gone: close it once nobody borrows it


class OpenFiles:
    """Descriptors kept open, keyed by ``(owner, path)``; thread-safe (see the module docstring).

    Parameters
    ----------
    capacity
        Idle descriptors kept open; borrowed ones are never closed, however many.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, str], _Entry] = OrderedDict()  # LRU first
        # Owners forgotten while the lock was taken: a reader's finalizer may run in the
        # garbage collector on a thread that holds the lock (any allocation can start it).
        self._forgotten: deque[int] = deque()
        # Pinned files given back (Pinned's finalizer), for the same reason.
        self._unpinned: deque[tuple[list[tuple[int, str]], int, int]] = deque()
        self.pinned = 0  # descriptors reserved by live Pinned objects (one per file of each)
        self.unpinned = 0  # Pinned objects ended so far (a refused table asks again after)
        self.generation = 0  # changes in a forked child, whose descriptors are all new

    def __len__(self) -> int:
        return len(self._entries)

    def borrow(self, owner: int, path: str) -> int | None:
        """A read-only descriptor of ``path`` for ``owner``, until :meth:`give_back`.

        Returns
        -------
        The descriptor, or None if there is no such file (nothing is kept then).
        """
        key = (owner, path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.users += 1
                self._entries.move_to_end(key)
                return entry.fd
        try:
            fd = _open(path)  # outside the lock: a slow disk stalls no one
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.clear()  # out of descriptors: give back the idle ones, then try once more
            fd = _open(path)
        if fd is None:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:  # another thread opened it meanwhile: use theirs
                entry.users += 1
                self._entries.move_to_end(key)
                closing = [fd]
                fd = entry.fd
            else:
                self._entries[key] = _Entry(fd)
                closing = self._drain() + self._evict()
        _close(closing)
        return fd

    def borrow_all(self, keys: Sequence[tuple[int, str]]) -> list[int | None]:
        """:meth:`borrow` of each ``(owner, path)`` in ``keys``: those open already in one pass
        under one lock (a window's read of an atlas borrows hundreds), the others one by
        one."""
        out: list[int | None] = []
        missed: list[int] = []
        with self._lock:
            get, to_end = self._entries.get, self._entries.move_to_end
            for key in keys:
                entry = get(key)
                if entry is None:
                    missed.append(len(out))
                    out.append(None)
                else:
                    entry.users += 1
                    to_end(key)
                    out.append(entry.fd)
        if missed:
            borrowed = [key for key, fd in zip(keys, out, strict=True) if fd is not None]
            try:
                for i in missed:
                    if (fd := self.borrow(*keys[i])) is not None:
                        borrowed.append(keys[i])
                        out[i] = fd
            except BaseException:  # give back what was borrowed: none of it reaches the caller
                self.give_back_all(borrowed)
                raise
        return out

    def give_back(self, owner: int, path: str) -> None:
        """End one :meth:`borrow` of ``path`` by ``owner``."""
        self.give_back_all([(owner, path)])

    def give_back_all(self, keys: Iterable[tuple[int, str]]) -> None:
        """End one :meth:`borrow` of each ``(owner, path)`` in ``keys`` (one lock for all: a
        window's read of an atlas gives back dozens)."""
        with self._lock:
            closing = self._drain()
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:  # (None: cleared by a fork in between)
                    entry.users -= 1
                    if entry.users == 0 and entry.forgotten:
                        del self._entries[key]
                        closing.append(entry.fd)
            closing += self._evict()
        _close(closing)

    def reserve(self, n: int) -> int | None:
        """Reserve ``n`` pinned descriptors (:class:`Pinned`): the pool's generation, or None
        if that would pin more than half of :attr:`capacity`."""
        with self._lock:
            closing = self._drain()  # pins ended meanwhile make room
            if self.pinned + n > self.capacity // 2:
                generation = None
            else:
                self.pinned += n
                generation = self.generation
        _close(closing)
        return generation

    def unpin(self, held: list[tuple[int, str]], n: int, generation: int) -> None:
        """End a :class:`Pinned`: give back each of ``held`` and its reservation of ``n``
        (nothing if it was made before a fork: the child's pool never lent them). Safe to
        call from a finalizer, like :meth:`forget`."""
        self._unpinned.append((held, n, generation))
        self._drain_unless_locked()

    def forget(self, owner: int) -> None:
        """Close ``owner``'s descriptors (those borrowed now, once given back). Safe to call
        from a finalizer: where the lock is taken, the work waits for the next call."""
        self._forgotten.append(owner)
        self._drain_unless_locked()

    def _drain_unless_locked(self) -> None:
        """:meth:`_drain` now, unless the lock is taken: then by the next call that takes it
        (a finalizer may run in the garbage collector on a thread that holds it)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            closing = self._drain()
        finally:
            self._lock.release()
        _close(closing)

    def clear(self) -> None:
        """Close every descriptor nobody borrows."""
        with self._lock:
            closing = self._drain()
            idle = [k for k, e in self._entries.items() if not e.users]
            closing += [self._entries.pop(k).fd for k in idle]
        _close(closing)

    def _drain(self) -> list[int]:
        """Entries of forgotten owners removed, or marked if borrowed (the lock held); the
        descriptors to close once it is released."""
        closing: list[int] = []
        while self._unpinned:
            held, n, generation = self._unpinned.popleft()
            if generation != self.generation:
                continue
            self.pinned -= n
            self.unpinned += 1
            for key in held:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.users -= 1
                    if entry.users == 0 and entry.forgotten:
                        del self._entries[key]
                        closing.append(entry.fd)
        while self._forgotten:
            owner = self._forgotten.popleft()
            for key in [k for k in self._entries if k[0] == owner]:
                entry = self._entries[key]
                if entry.users:
                    entry.forgotten = True
                else:
                    del self._entries[key]
                    closing.append(entry.fd)
        return closing

    def _evict(self) -> list[int]:
        """Idle entries over capacity, least recently used first, removed (the lock held);
        their descriptors, for the caller to close once the lock is released."""
        excess = len(self._entries) - self.capacity
        if excess <= 0:
            return []
        idle: list[tuple[int, str]] = []
        busy: list[tuple[int, str]] = []
        for key, entry in self._entries.items():  # least recently used first: stop early
            if entry.users:
                busy.append(key)
            else:
                idle.append(key)
                if len(idle) == excess:
                    break
        for key in busy:  # (pinned ones, used for good) not walked past again next time
            self._entries.move_to_end(key)
        return [self._entries.pop(k).fd for k in idle]

    def _after_fork_in_child(self) -> None:
        # The child's copies: its threads are gone, so nothing is borrowed any more.
        self._lock = threading.Lock()
        self._forgotten = deque()
        self._unpinned = deque()
        self.pinned = self.unpinned = 0
        self.generation += 1  # the parent's Pinned objects hold none of the child's
        entries, self._entries = list(self._entries.values()), OrderedDict()
        _close([e.fd for e in entries])


def _open(path: str) -> int | None:
    """A read-only descriptor of ``path``; None: there is no such file."""
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _close(fds: list[int]) -> None:
    """Close ``fds``, each: an error closing one (EIO from a network file system) stops
    neither the others nor the read that evicted them. Nothing was written through these
    read-only descriptors, and the descriptor is released whatever close reports."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


OPEN_FILES = OpenFiles(CAPACITY)
"""The process's descriptors of local shards."""

if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=OPEN_FILES._after_fork_in_child)


class Borrowed:
    """The descriptors one read uses: shard files borrowed from :data:`OPEN_FILES` (kept open
    for later reads), other files opened for this read only; all given back or closed by
    :meth:`close` (or at the end of a ``with`` block)."""

    __slots__ = ("_borrowed", "_files", "_pinned")

    def __init__(self) -> None:
        self._borrowed: dict[tuple[int, str], int | None] = {}
        self._files: dict[str, int | None] = {}
        self._pinned: list[Pinned] = []

    def hold(self, pinned: Pinned) -> None:
        """Keep ``pinned`` (and so its descriptors) alive until :meth:`close`: a read uses
        them after it has let go of the table that holds ``pinned``, which may be dropped
        meanwhile (a stack's table kept among a few, a Loader collected on another thread)."""
        if not self._pinned or self._pinned[-1] is not pinned:
            self._pinned.append(pinned)

    def open(self, owner: int, path: str, *, keep: bool = True) -> int | None:
        """A read-only descriptor of ``path`` (None: no such file), opened at most once per
        read. ``keep``: borrowed from :data:`OPEN_FILES` for reader ``owner`` (shard files);
        otherwise opened and closed with this read (a file per chunk: a window may touch
        thousands)."""
        if keep:
            key = (owner, path)
            if key in self._borrowed:
                return self._borrowed[key]
            fd = self._borrowed[key] = OPEN_FILES.borrow(owner, path)
            return fd
        if path in self._files:
            return self._files[path]
        fd = self._files[path] = _open(path)
        return fd

    def open_all(self, keys: Sequence[tuple[int, str]]) -> list[int | None]:
        """:meth:`open` of each ``(owner, path)`` in ``keys`` (shard files, kept open)."""
        borrowed = self._borrowed
        new = [key for key in dict.fromkeys(keys) if key not in borrowed]
        borrowed.update(zip(new, OPEN_FILES.borrow_all(new), strict=True))
        return [borrowed[key] for key in keys]

    def close_others(self, path: str) -> None:
        """Close the files opened for this read only (``keep=False``), but ``path``."""
        for other in [p for p in self._files if p != path]:
            if (fd := self._files.pop(other)) is not None:
                os.close(fd)

    def close(self) -> None:
        """Give back every borrowed descriptor and close the others."""
        borrowed, self._borrowed = self._borrowed, {}
        files, self._files = self._files, {}
        self._pinned = []
        try:
            OPEN_FILES.give_back_all([key for key, fd in borrowed.items() if fd is not None])
        finally:
            _close([fd for fd in files.values() if fd is not None])

    def __enter__(self) -> Borrowed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


UNOPENED = -2
"""A :class:`Pinned` file not opened yet, or that did not exist when last asked for."""


class Pinned:
    """The descriptors of a fixed list of shard files (a chunk table's), each borrowed from
    :data:`OPEN_FILES` the first time a read asks for it and kept until this object is
    garbage collected. Reads find them by number in :attr:`fds`, with no lock once opened; a
    read holds the object (:meth:`Borrowed.hold`) while it uses them.

    Made by :meth:`of`, which reserves one descriptor per file (so that pinned descriptors
    stay within the pool's bound). Made before a fork, it holds none of the child's
    descriptors: :attr:`generation` then differs from the pool's, and the child makes its own.

    Parameters
    ----------
    keys
        ``(owner, path)`` of each file, as :meth:`OpenFiles.borrow` takes them.
    generation
        The pool's :attr:`OpenFiles.generation` when the reservation was made.
    """

    __slots__ = ("__weakref__", "_held", "_keys", "_lock", "fds", "generation")

    def __init__(self, keys: Sequence[tuple[int, str]], generation: int) -> None:
        self._keys = keys
        self.fds: list[int] = [UNOPENED] * len(keys)
        """Each file's descriptor; :data:`UNOPENED` until :meth:`open`."""
        self._held: list[tuple[int, str]] = []  # given back by the finalizer
        self.generation = generation
        self._lock = threading.Lock()
        ending = weakref.finalize(self, OPEN_FILES.unpin, self._held, len(keys), generation)
        # Not at exit: daemon read threads may still be reading; the process closes them.
        ending.atexit = False

    @classmethod
    def of(cls, keys: Sequence[tuple[int, str]]) -> Pinned | None:
        """Pinned descriptors of the files ``keys`` (``(owner, path)``), or None where the
        process pins as many as it may already."""
        generation = OPEN_FILES.reserve(len(keys))
        return None if generation is None else cls(keys, generation)

    def open(self, ids: Iterable[int]) -> list[int]:
        """:attr:`fds`, with files ``ids`` opened (those that exist). Raises what opening a
        file raises (other than that it does not exist)."""
        fds = self.fds
        new = [i for i in ids if fds[i] == UNOPENED]  # (a missing file: asked again)
        if new:
            with self._lock:
                for i in dict.fromkeys(new):
                    if fds[i] == UNOPENED:
                        key = self._keys[i]
                        fd = OPEN_FILES.borrow(*key)
                        if fd is not None:
                            self._held.append(key)
                            fds[i] = fd
        return fds
