"""Small reads of small 1-D arrays (obs columns, CSR row pointers), on the calling thread.

A window of an atlas touches a few hundred ranges of each obs column and of ``indptr`` in
dozens of datasets. Through :meth:`ChunkReader.tasks <annbatch._core.chunks.reader.ChunkReader.tasks>`
each chunk costs ~70 us of Python (a task, the general decode loop, scratch buffers, copies
sized for large chunks): more than reading X. This module reads the same bytes with the same
checks in a plain loop, ~10x cheaper per chunk: chunks are located in one vectorised step per
shard, shard files stay open between calls (:mod:`~annbatch._core.chunks.descriptors`), and
each chunk is either

- read whole (the reader verifies checksums, or its checksum covers a chunk wanted whole),
  its size and CRC32C checked, and the wanted entries copied out; or
- read in part: each piece's bytes straight into its place in the output (no checksum).

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
from annbatch._core.chunks.reader import chunk_pieces
from annbatch._core.failures import store_errors
from annbatch.errors import AnnbatchError, ChecksumMismatchError, CorruptChunkError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from annbatch._core.chunks.reader import ChunkReader

_MISSING = np.iinfo(np.uint64).max  # shard index entry of an inner chunk that was never written


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
    cursor = [0]  # the chunk being located or read, as named in errors
    with (
        Borrowed() as files,
        _named(names, lambda: owner_l[cursor[0]]),
        store_errors(lambda: f"reading {readers[owner_l[cursor[0]]].where(local_l[cursor[0]])}"),
    ):
        last: tuple[int, int] = (-1, -1)
        entries: list[list[int]] | None = None
        path: str | None = None
        for k, (i, j) in enumerate(zip(firsts.tolist(), lasts.tolist(), strict=True)):
            cursor[0] = k
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
                    offset, nbytes = entries[inner * own.index_stride]
                    if offset != _MISSING:
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
