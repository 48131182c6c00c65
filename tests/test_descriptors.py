"""Shard files kept open between windows (``annbatch._core.chunks.descriptors``): a read never
has its descriptor closed under it, idle ones are bounded, a reader's go with it, a collection
rebuilt in place is read anew by a new Loader, and a forked child keeps none."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import numpy as np
import pytest
import scipy.sparse as sp

from annbatch import DatasetCollection, Loader
from annbatch._core.chunks.descriptors import OPEN_FILES, Borrowed, OpenFiles, new_owner

if TYPE_CHECKING:
    from pathlib import Path


def _files(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"f{i}"
        path.write_bytes(f"file {i:04d}".encode())
        paths.append(str(path))
    return paths


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_borrowed_descriptor_is_kept_and_shared(tmp_path):
    files = OpenFiles(capacity=4)
    (path,) = _files(tmp_path, 1)
    owner = new_owner()
    fd = files.borrow(owner, path)
    assert fd is not None
    assert files.borrow(owner, path) == fd  # a second read shares it
    files.give_back(owner, path)
    files.give_back(owner, path)
    assert len(files) == 1
    assert _is_open(fd)
    assert files.borrow(owner, path) == fd
    files.give_back(owner, path)
    assert files.borrow(new_owner(), path) != fd  # another reader: its own descriptor
    assert files.borrow(owner, str(tmp_path / "missing")) is None
    assert len(files) == 2  # nothing kept for a missing file


def test_idle_descriptors_are_bounded_and_borrowed_ones_never_closed(tmp_path):
    files = OpenFiles(capacity=2)
    owner = new_owner()
    paths = _files(tmp_path, 5)
    held = [files.borrow(owner, p) for p in paths]  # five borrowed: over capacity, all open
    assert len(files) == 5
    assert all(fd is not None and _is_open(fd) for fd in held)
    for p in paths:
        files.give_back(owner, p)
    assert len(files) == 2  # the two most recently used stay
    assert files.borrow(owner, paths[-1]) == held[-1]
    files.give_back(owner, paths[-1])


def test_eviction_closes_the_least_recently_used_idle_descriptors(tmp_path):
    files = OpenFiles(capacity=3)
    owner = new_owner()
    paths = _files(tmp_path, 6)
    first = files.borrow(owner, paths[0])  # held throughout: never closed
    fds = [files.borrow(owner, p) for p in paths[1:]]
    files.give_back_all([(owner, p) for p in paths[1:]])
    # Six open, one borrowed: the three least recently used idle ones were closed.
    assert len(files) == 3
    assert _is_open(first)
    kept = [files.borrow(owner, p) for p in paths[4:]]
    assert kept == fds[3:]  # the two most recently used idle ones stayed open
    files.give_back_all([(owner, p) for p in [paths[0], *paths[4:]]])
    assert len(files) == 3


def test_a_readers_descriptors_are_closed_when_forgotten(tmp_path):
    files = OpenFiles(capacity=8)
    mine, other = new_owner(), new_owner()
    a, b = _files(tmp_path, 2)
    idle = files.borrow(mine, a)
    files.give_back(mine, a)
    busy = files.borrow(mine, b)
    kept = files.borrow(other, a)
    files.forget(mine)
    assert idle is not None
    assert busy is not None
    assert len(files) == 2  # the borrowed one waits for its read to end
    assert os.pread(busy, 9, 0) == b"file 0001"
    files.give_back(mine, b)
    assert len(files) == 1
    assert kept is not None
    assert _is_open(kept)


def test_threads_read_their_own_files_under_eviction(tmp_path):
    """Many threads borrowing more files than the capacity: every read reads the file it asked
    for (a descriptor closed and its number reused under a read would read another)."""
    files = OpenFiles(capacity=3)
    paths = _files(tmp_path, 24)
    owner = new_owner()
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(400):
            i = int(rng.integers(len(paths)))
            fd = files.borrow(owner, paths[i])
            try:
                if fd is None or os.pread(fd, 9, 0) != f"file {i:04d}".encode():
                    errors.append(paths[i])
            finally:
                files.give_back(owner, paths[i])

    threads = [threading.Thread(target=work, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(files) <= 3


def test_borrowed_files_are_given_back_together(tmp_path):
    a, b = _files(tmp_path, 2)
    owner = new_owner()
    with Borrowed() as read:
        fd = read.open(owner, a)
        assert read.open(owner, a) == fd
        chunk = read.open(owner, b, keep=False)  # a file of its own: closed with the read
        assert chunk is not None
    assert _is_open(fd)  # kept for later reads
    assert chunk != fd
    assert not _is_open(chunk)
    OPEN_FILES.forget(owner)


def test_a_failed_borrow_of_many_gives_back_the_others(tmp_path):
    """One file of a read's many fails to open: those borrowed with it are given back (an
    idle pool closes them when asked to), none stays borrowed for ever."""
    a, b = _files(tmp_path, 2)
    pool = OpenFiles(capacity=8)
    owner = new_owner()
    assert pool.borrow(owner, a) is not None
    pool.give_back(owner, a)  # open and idle
    with pytest.raises(ValueError, match="null"):
        pool.borrow_all([(owner, a), (owner, b), (owner, "bad\0name")])
    assert [pool._entries[(owner, p)].users for p in (a, b)] == [0, 0]
    fds = [pool._entries[(owner, p)].fd for p in (a, b)]
    pool.clear()
    assert not any(_is_open(fd) for fd in fds)


def _collection(path: Path, value: float) -> None:
    x = sp.csr_matrix(np.full((300, 5), value, dtype=np.float32))
    import anndata as ad

    source = path.parent / f"in-{value}.h5ad"
    ad.AnnData(X=x).write_h5ad(source)
    DatasetCollection(path).add_adatas([source], dataset_size=100, progress=False)


def test_a_collection_rebuilt_in_place_is_read_anew(tmp_path):
    path = tmp_path / "coll.zarr"
    _collection(path, 1.0)
    first = Loader(batch_size=50, chunk_size=10, preload_nchunks=5, to=None)
    first.use_collection(DatasetCollection(path, mode="r"))
    assert all(np.all(b["X"].data == 1.0) for b in first)  # its shard files are kept open
    shutil.rmtree(path)
    _collection(path, 2.0)
    second = Loader(batch_size=50, chunk_size=10, preload_nchunks=5, to=None)
    second.use_collection(DatasetCollection(path, mode="r"))
    assert all(np.all(b["X"].data == 2.0) for b in second)
    del first, second
    gc.collect()


_FORK_CHILD = """
import os, sys
from annbatch import DatasetCollection, Loader
from annbatch._core.chunks.descriptors import OPEN_FILES
loader = Loader(batch_size=50, chunk_size=10, preload_nchunks=5, to=None)
loader.use_collection(DatasetCollection(sys.argv[1], mode="r"))
for _ in loader:
    pass
assert len(OPEN_FILES) > 0, "the parent keeps no descriptors"
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, str(len(OPEN_FILES)).encode())
    os._exit(0)
os.close(write)
print(os.read(read, 16).decode())
assert os.waitpid(pid, 0)[1] == 0
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_keeps_no_descriptors(tmp_path):
    """In a process of its own (a test process may hold threads and libraries that object to
    fork): after an epoch the parent keeps descriptors; its forked child none."""
    path = tmp_path / "coll.zarr"
    _collection(path, 3.0)
    done = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_a_reader_collected_while_the_pool_is_in_use_does_not_deadlock(tmp_path):
    """A reader's finalizer (forget) may run in the garbage collector on a thread that holds
    the pool's lock: it must not wait for that lock (found in review: a hang)."""
    import weakref

    files = OpenFiles(capacity=4)
    paths = _files(tmp_path, 8)

    class Cyclic:  # a reader that only the cyclic garbage collector frees
        def __init__(self, owner: int) -> None:
            self.me = self
            weakref.finalize(self, files.forget, owner)

    done = threading.Event()

    def churn() -> None:
        old = gc.get_threshold()
        gc.set_threshold(1)  # collect at nearly every allocation
        try:
            for i in range(20_000):
                Cyclic(new_owner())
                owner = i % 3
                files.borrow(owner, paths[i % 8])
                files.give_back(owner, paths[i % 8])
        finally:
            gc.set_threshold(*old)
        done.set()

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert done.is_set(), "borrow / give_back deadlocked in a finalizer"
    gc.collect()
    files.clear()
    assert len(files) == 0


def test_an_error_closing_an_evicted_descriptor_stops_no_read(tmp_path, monkeypatch):
    """close() may report EIO on network file systems (the descriptor is released anyway):
    the read that evicted it goes on, and every descriptor it borrowed is given back."""
    import errno

    from annbatch._core.chunks import descriptors

    real_close = os.close
    failed = []

    def failing_close(fd: int) -> None:
        real_close(fd)
        failed.append(fd)
        raise OSError(errno.EIO, "close failed")

    files = OpenFiles(capacity=1)
    a, b, c = _files(tmp_path, 3)
    owner = new_owner()
    files.borrow(owner, a)
    files.give_back(owner, a)
    monkeypatch.setattr(descriptors.os, "close", failing_close)
    fd = files.borrow(owner, b)  # evicts a: its close fails
    assert fd is not None
    assert os.pread(fd, 9, 0) == b"file 0001"
    files.give_back(owner, b)
    assert len(failed) == 1
    assert len(files) == 1
    # A read's borrowed files are all given back, whatever closing its own files reports.
    with Borrowed() as read:
        read.open(owner, b)
        read.open(owner, c, keep=False)
    monkeypatch.setattr(descriptors.os, "close", real_close)
    assert all(e.users == 0 for e in OPEN_FILES._entries.values() if e is not None)
    OPEN_FILES.forget(owner)


def test_pinned_files_are_opened_once_and_given_back_with_their_owner(tmp_path):
    """A chunk table's files (``Pinned``): each borrowed the first time a read asks for it,
    kept for later reads, a missing file retried; all given back when the object is
    collected, also when that happens while the pool's lock is taken (a finalizer in the
    garbage collector)."""
    from annbatch._core.chunks.descriptors import UNOPENED, Pinned

    paths = _files(tmp_path, 3)
    missing = str(tmp_path / "not-yet")
    owner = new_owner()
    keys = [(owner, p) for p in [*paths, missing]]
    before = OPEN_FILES.pinned
    pinned = Pinned.of(keys)
    assert pinned is not None
    assert OPEN_FILES.pinned == before + 4
    fds = pinned.open([0, 2, 0, 3])
    assert fds[1] == UNOPENED  # not asked for
    assert fds[3] == UNOPENED  # no such file
    assert os.pread(fds[0], 9, 0) == b"file 0000"
    assert os.pread(fds[2], 9, 0) == b"file 0002"
    first = fds[0]
    assert pinned.open([0, 1])[0] == first  # kept
    with open(missing, "wb") as f:
        f.write(b"file late")
    assert os.pread(pinned.open([3])[3], 9, 0) == b"file late"  # a missing file is retried
    entries = [OPEN_FILES._entries[k] for k in keys]
    assert all(e.users == 1 for e in entries)
    with OPEN_FILES._lock:  # the garbage collector runs the finalizer on a thread holding it
        del pinned
        gc.collect()
    OPEN_FILES.give_back_all([])  # the next use of the pool gives them back
    assert OPEN_FILES.pinned == before
    assert all(e.users == 0 for e in entries)
    OPEN_FILES.forget(owner)
    OPEN_FILES.give_back_all([])
    assert not _is_open(first)


def test_no_more_than_half_the_pool_is_pinned(tmp_path, monkeypatch):
    from annbatch._core.chunks.descriptors import Pinned

    monkeypatch.setattr(OPEN_FILES, "capacity", 2 * OPEN_FILES.pinned + 8)  # room for 4 more
    owner = new_owner()
    keys = [(owner, p) for p in _files(tmp_path, 5)]
    assert Pinned.of(keys) is None  # 5 > 4
    first = Pinned.of(keys[:3])
    assert first is not None
    assert Pinned.of(keys[3:]) is None  # 3 + 2 > 4
    del first
    gc.collect()
    assert Pinned.of(keys[3:]) is not None


def test_a_read_keeps_pinned_descriptors_open_after_its_table_is_dropped(tmp_path):
    """A read holds the Pinned descriptors it was given (Borrowed.hold) until it closes:
    its table may be dropped meanwhile (a stack's table kept among a few, a Loader
    collected on another thread), with its reader forgotten."""
    from annbatch._core.chunks.table import ChunkTable, descriptors

    paths = _files(tmp_path, 3)
    owner = new_owner()
    table = ChunkTable(
        np.zeros(3, dtype=np.int64),
        np.full(3, 9, dtype=np.int64),
        np.arange(3),
        [(owner, p) for p in paths],
    )
    before = OPEN_FILES.pinned
    read = Borrowed()
    fds = descriptors(table, read, [0, 1, 2, 1], [True, True, False, True], None)
    assert fds[2] == -1  # not wanted
    assert OPEN_FILES.pinned == before + 3
    del table
    OPEN_FILES.forget(owner)  # its reader is gone too
    gc.collect()
    assert os.pread(fds[0], 9, 0) == b"file 0000"
    assert os.pread(fds[3], 9, 0) == b"file 0001"
    read.close()  # the Pinned goes, and with it the forgotten owner's descriptors
    OPEN_FILES.give_back_all([])
    assert OPEN_FILES.pinned == before
    assert not _is_open(fds[0])
    assert not _is_open(fds[1])
    assert not any(key[0] == owner for key in OPEN_FILES._entries)


def test_threads_pinning_one_table_at_once_borrow_each_file_once(tmp_path):
    from annbatch._core.chunks.descriptors import Pinned

    paths = _files(tmp_path, 40)
    owner = new_owner()
    keys = [(owner, p) for p in paths]
    pinned = Pinned.of(keys)
    assert pinned is not None
    start = threading.Barrier(4)
    seen: list[list[int]] = []

    def read(files: Pinned) -> None:
        start.wait()
        seen.append(list(files.open(range(40))))

    threads = [threading.Thread(target=read, args=(pinned,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s == seen[0] for s in seen)
    assert all(OPEN_FILES._entries[k].users == 1 for k in keys)
    del pinned, threads
    gc.collect()
    OPEN_FILES.give_back_all([])
    assert all(OPEN_FILES._entries[k].users == 0 for k in keys)
    OPEN_FILES.forget(owner)
    OPEN_FILES.give_back_all([])


_TABLES_LOCK_AT_FORK = """
import os, threading, time
from annbatch._core.chunks import table
held = threading.Event()
def hold():
    with table._TABLES_LOCK:
        held.set()
        time.sleep(5)
threading.Thread(target=hold, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    os._exit(0 if table._TABLES_LOCK.acquire(timeout=2) else 1)
assert os.waitpid(pid, 0)[1] == 0, "the child found the tables' lock taken"
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_can_take_the_tables_lock():
    """A thread of the parent may hold the chunk tables' lock at the fork; the child, where
    that thread does not exist, gets a new lock."""
    done = subprocess.run(
        [sys.executable, "-c", _TABLES_LOCK_AT_FORK],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
