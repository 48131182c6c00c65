"""Small reads of small 1-D arrays (obs columns, CSR row pointers), on the calling thread.

A window of an atlas touches a few hundred ranges of each obs column and of ``indptr`` in
dozens of datasets. Through :meth:`ChunkReader.tasks <annbatch._core.chunks.reader.ChunkReader.tasks>`
each chunk costs ~70 us of Python (a task, the general decode loop, scratch buffers, copies
sized for large chunks): more than reading X. This module reads the same bytes with the same
checks, ~10x cheaper per chunk: chunks are located in one vectorised step (a
:class:`~annbatch._core.chunks.table.ChunkTable` per stack of arrays, made from all their
shard indexes when a read first needs it), shard files stay open between calls
(:mod:`~annbatch._core.chunks.descriptors`), and each chunk is either

- read whole (the reader verifies checksums, or its checksum covers a chunk wanted whole),
  its size and CRC32C checked, and the wanted entries copied out; or
- read in part: each piece's bytes straight into its place in the output (no checksum), all
  of a read's pieces in one loop of ``preadv`` calls.

It takes local, uncompressed arrays whose chunks are 1-D (:func:`reads_small`); anything else
goes through the general path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING

import google_crc32c
import numpy as np

from annbatch._core.chunks import stacked
from annbatch._core.chunks.descriptors import Borrowed
from annbatch._core.chunks.local import LocalTransport
from annbatch._core.chunks.reader import MISSING, chunk_pieces
from annbatch._core.chunks.table import ChunkTable, Cursor, descriptors
from annbatch._core.failures import store_errors
from annbatch._core.ranges import expand_ranges
from annbatch.errors import AnnbatchError, ChecksumMismatchError, CorruptChunkError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Sequence

    from annbatch._core.chunks.reader import ChunkReader


def reads_small(reader: ChunkReader) -> bool:
    """Whether :func:`read_small` reads ``reader``'s array: local, uncompressed, 1-D."""
    layout = reader.layout
    return (
        isinstance(reader.transport, LocalTransport)
        and layout.compressor is None
        and len(reader.shape) == 1
        and layout.chunk_shape == (layout.rows_per_chunk,)
    )


def stack_bases(readers: Sequence[ChunkReader]) -> np.ndarray | None:
    """Where each of ``readers``' arrays begins when :func:`read_stacked` reads them as one
    (:func:`annbatch._core.chunks.stacked.stack_bases`); None when it cannot: each must be an
    array :func:`reads_small` reads, and all of one layout."""
    if not readers or not all(reads_small(r) for r in readers):
        return None
    return stacked.stack_bases(readers)


def read_small(reader: ChunkReader, starts: np.ndarray, stops: np.ndarray, out: np.ndarray) -> None:
    """Entries ``starts[i]:stops[i]`` (sorted, disjoint) of ``reader``'s array into ``out``
    (C-contiguous, the array's dtype), one range after another (see the module docstring)."""
    read_stacked([reader], np.zeros(1, dtype=np.int64), starts, stops, out)


def read_stacked(
    readers: Sequence[ChunkReader],
    bases: np.ndarray,
    starts: np.ndarray,
    stops: np.ndarray,
    out: np.ndarray,
    names: Sequence[str] | None = None,
    *,
    checked: bool = False,
) -> None:
    """Entries ``starts[i]:stops[i]`` (sorted, disjoint) of the stack of ``readers``' arrays
    (see :func:`stack_bases`, which gives ``bases``) into ``out`` (C-contiguous, their dtype),
    one range after another: one pass for a window's rows of every dataset. ``names``, if
    given, name each array in errors (their message starts with it). ``checked``: ``bases``
    came from :func:`stack_bases` of these readers, which checked each (checking a hundred
    readers again for every window cost as much as reading their chunks).

    Raises what the chunk reader raises for the same damage: a checksum that does not match,
    a chunk of the wrong size, a file shorter than its chunks, a missing chunk of an array that
    records every chunk as written; other failures become a ``StoreReadError`` naming the chunk.
    """
    if not checked and not all(reads_small(r) for r in readers):  # local files: reads_small
        msg = "read_stacked reads local, uncompressed 1-D arrays only"
        raise ValueError(msg)
    first = readers[0]
    layout = first.layout
    rows = layout.rows_per_chunk
    chunk, src_lo, src_hi, dst = chunk_pieces(starts, stops, rows)
    if chunk.size == 0:
        return
    bounds = np.flatnonzero(np.diff(chunk)) + 1
    firsts = np.concatenate([[0], bounds])
    lasts = np.concatenate([bounds, [chunk.size]])
    chunks = chunk[firsts]  # chunks of the stack
    # Each chunk's array and its chunk there.
    chunk_bases = np.asarray(bases, dtype=np.int64) // rows
    owner = np.searchsorted(chunk_bases, chunks, side="right") - 1
    local = chunks - chunk_bases[owner]
    itemsize = first.dtype.itemsize
    checksum = layout.checksum
    stored = rows * itemsize + (4 if checksum else 0)
    if first.verify_checksums:
        whole = [True] * chunks.size
    elif checksum:  # a chunk wanted whole is read whole, to verify its checksum
        wanted = np.add.reduceat(src_hi - src_lo, firsts)
        lengths = np.array([r.shape[0] for r in readers], dtype=np.int64)[owner]
        whole = (wanted == np.minimum(rows, lengths - local * rows)).tolist()  # edge chunks
    else:
        whole = [False] * chunks.size
    src_lo_l, src_hi_l, dst_l = src_lo.tolist(), src_hi.tolist(), dst.tolist()
    owner_l, local_l = owner.tolist(), local.tolist()
    dtype = first.dtype
    cursor = Cursor(readers, owner_l, local_l)
    with (
        Borrowed() as files,
        _named(names, lambda: cursor.array),
        store_errors(lambda: f"reading {cursor.where()}"),
    ):
        slow: Iterable[int] = range(chunks.size)
        try:
            table = ChunkTable.of(readers, cursor)
        except Exception:  # a shard index of the stack that cannot be read: chunk by chunk,
            table = None  # where only the shards this read touches are read (and named)
        if table is not None:
            # Every chunk of the right size, all at once: located in one step; read in part
            # with a preadv per piece straight into place, or whole for its checksum (a
            # pread each, every checksum checked before anything is copied out). The rest
            # (never written, or of the wrong size: an error) go through the loop below.
            ok = table.nbytes[chunks] == stored
            if ok.any():
                file = table.file[chunks].tolist()
                fds = np.array(descriptors(table, files, file, ok.tolist(), cursor))
                read = ok & (fds >= 0)
                offset = table.offset[chunks]
                pieces = (np.repeat(np.arange(chunks.size), lasts - firsts), src_lo, src_hi, dst)
                in_whole = np.asarray(whole, dtype=bool)
                if not checksum:  # no checksum to verify: chunks wanted whole go to the loop
                    read &= ~in_whole
                parts, wholes = read & ~in_whole, read & in_whole
                if parts.any():
                    _read_parts(cursor, fds, parts, offset, pieces, out)
                if wholes.any():
                    _read_wholes(cursor, fds, wholes, offset, pieces, out)
                slow = np.flatnonzero(~read).tolist()
        firsts_l, lasts_l = firsts.tolist(), lasts.tolist()
        last: tuple[int, int] = (-1, -1)
        entries: list[int] | None = None
        path: str | None = None
        for k in slow:
            i, j = firsts_l[k], lasts_l[k]
            cursor.at(k)
            reader, c = readers[owner_l[k]], local_l[k]
            # Where the chunk is: its shard's index (read and checked once per reader).
            where: tuple[str, int, int] | None = None
            own = reader.layout  # shards may differ in size from one array to the next
            if not own.index_entries:  # unsharded: a file per chunk
                where = (reader.shard_path(c), 0, -1)
            else:
                shard, inner = divmod(c, own.chunks_per_shard)
                if (owner_l[k], shard) != last:
                    last = (owner_l[k], shard)
                    entries = reader.shard_entries(shard)
                    path = reader.shard_path(shard)
                if entries is not None and path is not None:
                    at_entry = 2 * inner * own.index_stride
                    offset, nbytes = entries[at_entry], entries[at_entry + 1]
                    if offset != MISSING:
                        where = (path, offset, nbytes)
            if not own.index_entries and where is not None:
                # A file per chunk: keep one open at a time (a window may touch thousands).
                files.close_others(where[0])
            fd = None
            if where is not None:  # shards stay open for later windows
                fd = files.open(reader.owner_of(c), where[0], keep=bool(own.index_entries))
            if where is None or fd is None:  # never written: the fill value (or an error)
                reader.fill(out, src_lo[i:j], src_hi[i:j], dst[i:j], c)
                continue
            _, offset, nbytes = where
            if nbytes < 0:  # a chunk that is a file of its own
                nbytes = os.fstat(fd).st_size
            if nbytes != stored:
                msg = (
                    f"{reader.where(c)} holds {nbytes} bytes, not the {stored} of an "
                    "uncompressed chunk; the store is damaged or truncated"
                )
                raise CorruptChunkError(msg)
            if whole[k]:
                encoded = os.pread(fd, stored, offset)
                if len(encoded) != stored:
                    msg = f"{reader.where(c)} ends after {len(encoded)} of its {stored} bytes; the store is damaged or truncated"
                    raise CorruptChunkError(msg)
                if checksum and (
                    google_crc32c.value(encoded[:-4]) != int.from_bytes(encoded[-4:], "little")
                ):
                    msg = f"{reader.where(c)} does not match its CRC32C checksum; the store is damaged"
                    raise ChecksumMismatchError(msg)
                values = np.frombuffer(encoded, dtype=dtype, count=rows)
                if j == i + 1:  # one piece (an atlas' window: most chunks)
                    lo, at = src_lo_l[i], dst_l[i]
                    out[at : at + src_hi_l[i] - lo] = values[lo : src_hi_l[i]]
                    continue
                for lo, hi, at in zip(src_lo_l[i:j], src_hi_l[i:j], dst_l[i:j], strict=True):
                    out[at : at + hi - lo] = values[lo:hi]
                continue
            for lo, hi, at in zip(src_lo_l[i:j], src_hi_l[i:j], dst_l[i:j], strict=True):
                into = out[at : at + hi - lo]
                if os.preadv(fd, [into.data], offset + lo * itemsize) != into.nbytes:
                    msg = f"{reader.where(c)} ends before the entries it stores (the file is truncated); the store is damaged"
                    raise CorruptChunkError(msg)


def _read_parts(
    cursor: Cursor,
    fds: np.ndarray,
    read: np.ndarray,
    offset: np.ndarray,
    pieces: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    out: np.ndarray,
) -> None:
    """Read the pieces (``pieces``: chunk, first and end entry in it, place in ``out``) of
    the ``read`` chunks of :func:`read_stacked` (in file ``fds[k]`` from byte ``offset[k]``)
    straight into ``out``, a ``preadv`` each."""
    piece_chunk, src_lo, src_hi, dst = pieces
    itemsize = out.itemsize
    take = read[piece_chunk]
    k = piece_chunk[take]
    lo = src_lo[take]
    at = dst[take] * itemsize
    end = at + (src_hi[take] - lo) * itemsize
    where = offset[k] + lo * itemsize
    raw = memoryview(out.view(np.uint8))  # type: ignore[arg-type]
    c = 0
    try:
        for c, fd, pos, a, b in zip(
            k.tolist(), fds[k].tolist(), where.tolist(), at.tolist(), end.tolist(), strict=True
        ):
            if os.preadv(fd, [raw[a:b]], pos) != b - a:
                msg = f"{cursor.at(c)} ends before the entries it stores (the file is truncated); the store is damaged"
                raise CorruptChunkError(msg)
    except OSError:
        cursor.at(c)  # named by the caller's store_errors
        raise


def _read_wholes(
    cursor: Cursor,
    fds: np.ndarray,
    read: np.ndarray,
    offset: np.ndarray,
    pieces: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    out: np.ndarray,
) -> None:
    """Read the ``read`` chunks of :func:`read_stacked` whole, each with its CRC32C (a
    ``pread`` each), check every checksum, then copy every piece out at once."""
    rows = cursor.readers[0].layout.rows_per_chunk
    stored = rows * out.itemsize + 4
    k = np.flatnonzero(read)
    chunks = []
    crcs = []
    value = google_crc32c.value
    c = 0
    try:
        for c, fd, pos in zip(k.tolist(), fds[k].tolist(), offset[k].tolist(), strict=True):
            encoded = os.pread(fd, stored, pos)
            if len(encoded) != stored:
                msg = f"{cursor.at(c)} ends after {len(encoded)} of its {stored} bytes; the store is damaged or truncated"
                raise CorruptChunkError(msg)
            crcs.append(value(encoded[:-4]))
            chunks.append(encoded)
    except OSError:
        cursor.at(c)  # named by the caller's store_errors
        raise
    buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(k.size, stored)
    bad = np.flatnonzero(np.array(crcs, dtype=np.uint32) != buffer[:, -4:].copy().view("<u4")[:, 0])
    if bad.size:
        msg = (
            f"{cursor.at(int(k[bad[0]]))} does not match its CRC32C checksum; the store is damaged"
        )
        raise ChecksumMismatchError(msg)
    piece_chunk, src_lo, src_hi, dst = pieces
    take = read[piece_chunk]
    row = np.searchsorted(k, piece_chunk[take])  # the chunk's row in the buffer
    lo, hi, at = src_lo[take], src_hi[take], dst[take]
    values = buffer[:, : stored - 4].view(out.dtype).reshape(-1)
    out[expand_ranges(at, at + hi - lo)] = values[expand_ranges(row * rows + lo, row * rows + hi)]


@contextmanager
def _named(names: Sequence[str] | None, which: Callable[[], int]) -> Iterator[None]:
    """Errors start with ``names[which()]`` (the array being read), if ``names`` is given."""
    try:
        yield
    except AnnbatchError as e:
        if names is None or str(e).startswith(what := names[which()]):
            raise
        msg = f"{what}: {e}"
        raise type(e)(msg) from e


def read_rows(reader: ChunkReader, starts: np.ndarray, stops: np.ndarray, out: np.ndarray) -> None:
    """Entries ``starts[i]:stops[i]`` (sorted, disjoint) into ``out``, one range after another,
    on the calling thread: by :func:`read_small` where it reads the array, else by the chunk
    reader's tasks."""
    if reads_small(reader) and out.dtype == reader.dtype and out.flags.c_contiguous:
        read_small(reader, starts, stops, out)
        return
    for task in reader.tasks(starts, stops, out, 1):
        task()
