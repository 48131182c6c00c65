"""Where each chunk of an array lies, for reads that locate all their chunks at once.

Locating a chunk through :meth:`ChunkReader.locate <annbatch._core.chunks.reader.ChunkReader.locate>`
costs a few Python calls (its shard's index, the entry, the file's name); a window of an atlas
locates thousands, in dozens of arrays. A :class:`ChunkTable` holds every chunk's file, offset
and size as arrays, made once from the shard indexes (read and checked by the reader as
always), so that a read locates all its chunks in a few numpy steps and borrows each of
their files once (:func:`descriptors`). Small 1-D reads
(:mod:`~annbatch._core.chunks.small`) and the local transport's tasks
(:mod:`~annbatch._core.chunks.local`) use it; chunks a table cannot place (never written, or
files gone since) go the per-chunk way, which reads, fills or names them as before.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import TYPE_CHECKING

import numpy as np

from annbatch._core.chunks.descriptors import OPEN_FILES, Pinned
from annbatch._core.chunks.reader import MISSING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch._core.chunks.descriptors import Borrowed
    from annbatch._core.chunks.reader import ChunkReader

TABLE_MAX_CHUNKS = 1 << 21
"""Chunks of an array or stack beyond which it gets no :class:`ChunkTable` (24 bytes a chunk:
48 MiB at most; an atlas of 100 million cells has ~100,000 chunks of 1,024 rows per obs
column)."""

TABLE_MAX_SHARDS = 1 << 14
"""Shard indexes beyond which an array or stack gets no :class:`ChunkTable`: a table reads
all of them at once, when a read first needs it (~20 us each), and a first read should not
wait seconds for indexes it may never need."""

_TABLES_KEPT = 8
"""Stack tables kept per first array: a Loader's obs columns and CSR arrays are stacked once
(all its datasets); stacks of a window's own datasets (where the Loader's cannot be made)
may differ from one window to the next."""

_TABLES_LOCK = threading.Lock()  # around the stack tables kept (threads may share readers)


def _after_fork_in_child() -> None:
    global _TABLES_LOCK  # one of the parent's threads may have held it at the fork
    _TABLES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)

NEVER = -1  # size in a chunk table of a chunk never written


class Cursor:
    """The chunks of one read of a stack
    (:func:`~annbatch._core.chunks.small.read_stacked`): the array each is in and its chunk
    there, and the one being located or read (what errors name). While a table is made, the
    array and chunk whose shard index is read."""

    __slots__ = ("array", "chunk", "local", "owner", "readers")

    def __init__(self, readers: Sequence[ChunkReader], owner: list[int], local: list[int]) -> None:
        self.readers, self.owner, self.local = readers, owner, local
        self.array, self.chunk = 0, 0

    def at(self, k: int) -> str:
        """Chunk ``k`` of the read is being read: its name, for errors."""
        self.array, self.chunk = self.owner[k], self.local[k]
        return self.where()

    def where(self) -> str:
        return self.readers[self.array].where(self.chunk)


class Readers(tuple):
    """The arrays of a stack that a Loader reads every window (an obs column of every
    dataset, their row pointers), which never change: it keeps its
    :class:`ChunkTable` once :meth:`ChunkTable.of` has made it (the readers do not refer
    to it, so nothing keeps them alive in a cycle)."""

    table: ChunkTable | None = None

    def __reduce__(self) -> tuple[type[Readers], tuple[tuple[object, ...]]]:
        return Readers, (tuple(self),)  # the table (arrays, descriptors) stays here


class ChunkTable:
    """Where each chunk of an array, or of a stack of arrays, lies (file, offset, size; size
    :data:`NEVER`: never written), so that a read locates all its chunks in one vectorised
    step (see :func:`~annbatch._core.chunks.small.read_stacked`). An array's table is made
    from all its shard indexes (read and checked by its reader) when a read first needs it,
    and kept with the reader; a stack's is its arrays' tables one after another. Files are
    named by the readers' descriptor tokens; their descriptors are borrowed once, when a
    read first needs each, and kept with the table (:attr:`pinned`, :func:`pinned_of`).
    """

    __slots__ = ("file", "files", "nbytes", "offset", "pinned")

    def __init__(
        self, offset: np.ndarray, nbytes: np.ndarray, file: np.ndarray, files: list[tuple[int, str]]
    ) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.file = file  # index into files
        self.files = files  # (descriptor token, path) of each file
        # Their descriptors once a read asks (pinned_of); or, where the process could pin no
        # more, (pool generation, pins ended) then: asked again only once pins have ended.
        self.pinned: Pinned | tuple[int, int] | None = None

    @staticmethod
    def of(readers: Sequence[ChunkReader], cursor: Cursor) -> ChunkTable | None:
        """The table of the stack of ``readers``
        (:func:`~annbatch._core.chunks.stacked.stack_bases`), or None where an array is not
        sharded (a file per chunk: nothing to index) or the stack has more than
        :data:`TABLE_MAX_CHUNKS` chunks or :data:`TABLE_MAX_SHARDS` shards. ``cursor`` is
        set to the array and chunk whose shard index is being read, for errors. A
        :class:`Readers` keeps its table; other stacks' tables are kept, a few, by their
        first array."""
        if len(readers) == 1 and readers[0].chunk_table is not None:
            return readers[0].chunk_table or None  # (False: it has none, see table_of)
        if isinstance(readers, Readers) and readers.table is not None:
            return readers.table  # a Loader's stack, read every window: no key to make
        key = tuple(r.owner for r in readers)  # tokens are never reused within a process
        kept = readers[0].chunk_tables
        with _TABLES_LOCK:
            table = kept.pop(key, None)
        if table is None:
            rows = readers[0].layout.rows_per_chunk
            total = sum(-(-int(r.shape[0]) // rows) for r in readers)
            if not all(r.layout.index_entries for r in readers):
                return None
            shards = sum(-(-int(r.shape[0]) // (rows * r.layout.chunks_per_shard)) for r in readers)
            if total > TABLE_MAX_CHUNKS or shards > TABLE_MAX_SHARDS:
                return None
            if len(readers) == 1:
                return ChunkTable._of_array(readers[0], 0, cursor)
            tables = [ChunkTable._of_array(r, k, cursor) for k, r in enumerate(readers)]
            first_file = np.cumsum([0, *(len(t.files) for t in tables[:-1])])
            table = ChunkTable(
                np.concatenate([t.offset for t in tables]),
                np.concatenate([t.nbytes for t in tables]),
                np.concatenate(
                    [t.file + f for t, f in zip(tables, first_file.tolist(), strict=True)]
                ),
                [name for t in tables for name in t.files],
            )
        with _TABLES_LOCK:
            kept[key] = table  # most recently used last
            while len(kept) > _TABLES_KEPT:
                kept.pop(next(iter(kept)))
        if isinstance(readers, Readers):
            readers.table = table
        return table

    @staticmethod
    def _of_array(reader: ChunkReader, k: int, cursor: Cursor) -> ChunkTable:
        table = reader.chunk_table
        if isinstance(table, ChunkTable):
            return table
        layout = reader.layout
        n = -(-int(reader.shape[0]) // layout.rows_per_chunk)
        per_shard, stride = layout.chunks_per_shard, layout.index_stride
        offset = np.zeros(n, dtype=np.int64)
        nbytes = np.full(n, NEVER, dtype=np.int64)
        file = np.zeros(n, dtype=np.int64)
        files: list[tuple[int, str]] = []
        for shard in range(-(-n // per_shard)):
            lo = shard * per_shard
            hi = min(lo + per_shard, n)
            cursor.array, cursor.chunk = k, lo
            index = reader.shard_index(shard)  # read and checked (entries inside the file)
            if index is None:  # never written
                continue
            entries = index[: (hi - lo) * stride : stride]
            missing = entries[:, 0] == MISSING
            values = entries.astype(np.int64)  # inside the file, but for missing ones
            offset[lo:hi] = np.where(missing, 0, values[:, 0])
            nbytes[lo:hi] = np.where(missing, NEVER, values[:, 1])
            file[lo:hi] = len(files)
            files.append((reader.owner_of(lo), reader.shard_path(shard)))
        table = reader.chunk_table = ChunkTable(offset, nbytes, file, files)
        return table


def pinned_of(table: ChunkTable) -> Pinned | None:
    """The :class:`~annbatch._core.chunks.descriptors.Pinned` descriptors of ``table``'s files,
    made on first use (and again in a forked child); None where the process may pin no more
    (the table's reads then borrow per read)."""
    pinned = table.pinned
    if isinstance(pinned, Pinned):
        if pinned.generation == OPEN_FILES.generation:
            return pinned
    elif pinned == (OPEN_FILES.generation, OPEN_FILES.unpinned):
        return None  # refused, and no pins have ended since
    with _TABLES_LOCK:  # one per table: a second would pin the same files twice
        pinned = table.pinned
        if not isinstance(pinned, Pinned) or pinned.generation != OPEN_FILES.generation:
            refused = (OPEN_FILES.generation, OPEN_FILES.unpinned)
            made = Pinned.of(table.files)
            table.pinned = pinned = refused if made is None else made
    return pinned if isinstance(pinned, Pinned) else None


def descriptors(
    table: ChunkTable,
    files: Borrowed,
    file: list[int],
    wanted: list[bool],
    cursor: Cursor | None,
) -> list[int]:
    """The descriptor of the file of each chunk (``file``: its index in ``table.files``), -1
    where not ``wanted`` or the file has gone since its shard index was read; each file
    borrowed once (for good, where the table's files are pinned: :func:`pinned_of`). Lists,
    not numpy steps: a read locates a few to a few hundred chunks, and numpy's per-call
    cost made a few chunks slower to locate than one by one. If a file fails to open, the
    chunks' files are opened again one by one with ``cursor`` (if given) set to each, so
    that the error names the first chunk in the failing file."""
    pinned = pinned_of(table)
    try:
        if pinned is not None:  # the table's files, borrowed once for all reads
            files.hold(pinned)
            fds = pinned.open(itertools.compress(file, wanted))
            return [
                got if w and (got := fds[f]) >= 0 else -1 for f, w in zip(file, wanted, strict=True)
            ]
        ids = list(dict.fromkeys(itertools.compress(file, wanted)))
        opened = files.open_all([table.files[i] for i in ids])  # shards stay open
    except OSError:
        if cursor is not None:
            for k, (f, w) in enumerate(zip(file, wanted, strict=True)):
                if w:
                    cursor.at(k)
                    files.open(*table.files[f])
        raise
    fd_of = dict(zip(ids, opened, strict=True))
    return [
        -1 if not w or (fd := fd_of[f]) is None else fd for f, w in zip(file, wanted, strict=True)
    ]


LOCATE_MIN_CHUNKS = 8
"""Chunks from which :func:`located` finds a read's chunks in its table: fewer are located
one by one as quickly (measured: 2 chunks 7.5 against 3.9 us, 10 chunks 13 against 15 us,
40 chunks 13 against 35 us)."""

_NO_TABLE = False  # kept as a reader's table where it has none (not sharded, too large, failed)


def table_of(reader: ChunkReader) -> ChunkTable | None:
    """The table of ``reader``'s chunks (of a stack's arrays, for a
    :class:`~annbatch._core.chunks.stacked.StackedReader`), made on first use and kept with
    the reader; None where it has none (see :meth:`ChunkTable.of`) or one could not be made:
    a shard index that cannot be read or is damaged is then met, and named, by the per-chunk
    path of the read that needs it, as without tables. Threads that ask at once may each
    make it; they make the same table."""
    table = reader.chunk_table
    if table is not None:
        return table or None
    readers = getattr(reader, "readers", None) or [reader]
    cursor = Cursor(readers, [0], [0])
    try:
        made = ChunkTable.of(readers, cursor)
    except Exception:  # the per-chunk path raises it, named, where a read needs that shard
        made = None
    # Kept, failures too: a damaged index would otherwise be read again by every task.
    reader.chunk_table = _NO_TABLE if made is None else made
    return made


def located(
    reader: ChunkReader, chunks: np.ndarray, files: Borrowed
) -> tuple[list[int], list[int], list[int]] | None:
    """The file descriptor (borrowed from ``files``), offset and size of each of ``chunks``
    (in ``reader``'s chunk numbers) from its :func:`table_of`; descriptor -1 for a chunk the
    table cannot place (never written, its file gone): the caller reads it the per-chunk way.
    None: no table, fewer than :data:`LOCATE_MIN_CHUNKS` chunks, or a file failed to open
    (the per-chunk way names its chunk)."""
    if chunks.size < LOCATE_MIN_CHUNKS:
        return None
    table = table_of(reader)
    if table is None:
        return None
    nbytes = table.nbytes[chunks].tolist()
    try:
        fds = descriptors(
            table, files, table.file[chunks].tolist(), [n != NEVER for n in nbytes], None
        )
    except OSError:
        return None
    return fds, table.offset[chunks].tolist(), nbytes
