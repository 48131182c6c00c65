"""The local transport: chunks of a zarr array in a local directory, read with ``os.pread``.

A task opens each file it needs once and reads as it goes. Compressed chunks (and any chunk
that does not hold whole rows) are read whole and handed to the reader's decode loop.
Uncompressed chunks of whole rows are read in part, straight into the output: only the wanted
rows' bytes (see :func:`_rows`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._core.chunks.descriptors import Borrowed
from annbatch._core.chunks.pieces import copy_pieces, thread_scratch
from annbatch._core.chunks.table import located
from annbatch.errors import CorruptChunkError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch._core.chunks.reader import ChunkReader
    from annbatch._core.chunks.transport import Work

_SPAN_MIN_PIECES = 4
"""Wanted pieces of one uncompressed chunk from which its span is read once, not piece by piece."""


class LocalTransport:
    """Chunks in files of a local directory (see the module docstring)."""

    def read_index(self, path: str, nbytes: int, *, at_end: bool) -> tuple[bytes, int] | None:
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                offset = size - nbytes if at_end else 0
                return os.pread(f.fileno(), nbytes, max(0, offset)), size
        except FileNotFoundError:
            return None

    def task(self, reader: ChunkReader, work: Work) -> ReadTask:
        return ReadTask(reader, work)


@dataclass(frozen=True, slots=True)
class ReadTask:
    """Read ``work`` from local files, on the calling thread."""

    reader: ChunkReader
    work: Work

    @property
    def local_bytes(self) -> int:
        """Bytes the task decodes or copies (whole chunks of a compressed array, else the
        wanted rows): the work it could do on another core while its thread has released
        the GIL (see :func:`annbatch._core.reader.worth_threads`)."""
        reader, work = self.reader, self.work
        if reader.layout.compressor is None:
            return int(np.sum(work.src_hi - work.src_lo)) * reader.row_bytes
        chunks = 1 + int(np.count_nonzero(np.diff(work.chunk)))
        return chunks * reader.layout.rows_per_chunk * reader.row_bytes

    def __call__(self) -> None:
        reader, work = self.reader, self.work
        layout = reader.layout
        with Borrowed() as files, reader.read_errors(work):
            if (
                layout.compressor is None
                and layout.chunk_shape[1:] == reader.shape[1:]  # chunks hold whole rows
                and work.out.flags.c_contiguous
            ):  # (casts rows to out's dtype if need be)
                reader.decode(work, _rows(reader, work, files))
            else:
                reader.decode(work, _chunks(reader, work, files))
        work.check_filled()


def _open(
    reader: ChunkReader, files: Borrowed, where: tuple[str, int, int], chunk: int
) -> int | None:
    """A read-only descriptor of ``where``'s file (see :meth:`ChunkReader.locate`), that of
    chunk ``chunk``: kept open between reads if it is a shard (a file of one chunk, ``nbytes``
    -1, is not: a window may touch thousands); None: the file does not exist (a chunk never
    written)."""
    return files.open(reader.owner_of(chunk), where[0], keep=where[2] >= 0)


def _chunks(
    reader: ChunkReader, work: Work, files: Borrowed
) -> Iterator[tuple[int, int, int, bytes | None]]:
    """Each chunk of ``work`` read whole, for the decode loop."""
    chunk = work.chunk
    firsts, lasts = work.chunk_bounds()
    table = located(reader, chunk[firsts], files)
    for k, (i, j) in enumerate(zip(firsts, lasts, strict=True)):
        c = int(chunk[i])
        if table is not None and table[0][k] >= 0:  # located by the array's chunk table
            fd, offset, nbytes = table[0][k], table[1][k], table[2][k]
        else:
            where = reader.locate(c)
            opened = None if where is None else _open(reader, files, where, c)
            if where is None or opened is None:
                yield i, j, c, None
                continue
            fd = opened
            _, offset, nbytes = where
            if nbytes < 0:
                nbytes = os.fstat(fd).st_size
        encoded = os.pread(fd, nbytes, offset)
        if len(encoded) != nbytes:
            msg = f"{reader.where(c)} ends after {len(encoded)} of its {nbytes} bytes; the store is damaged or truncated"
            raise CorruptChunkError(msg)
        yield i, j, c, encoded


def _rows(
    reader: ChunkReader, work: Work, files: Borrowed
) -> Iterator[tuple[int, int, int, memoryview | None]]:
    """Uncompressed chunks of whole rows: the wanted rows' bytes read straight into place;
    only chunks read whole, and chunks never written, go to the decode loop.

    A chunk with few wanted pieces has each piece read straight into ``out`` (pieces that
    follow each other both in the file and in ``out`` are one read). A chunk with many (rows
    scattered to batch order) has the span from its first to its last wanted row read once,
    into a scratch buffer, and the pieces copied out in one step: a read per row measured 2x
    slower on dense rows of 8 KB. A chunk that carries a checksum and is wanted whole (or any
    chunk, with ``verify_checksums``) is read whole with its checksum, for the decode loop to
    verify and copy out.
    """
    out, chunk, src_lo, src_hi, dst = work.out, work.chunk, work.src_lo, work.src_hi, work.dst
    layout = reader.layout
    dtype, tail = reader.dtype, reader.shape[1:]
    row_bytes = reader.row_bytes
    stored_bytes = layout.rows_per_chunk * row_bytes + (4 if layout.checksum else 0)
    run: list[Any] = []  # [fd, file offset, first row in out, rows, chunk]

    def read(fd: int, into: np.ndarray, offset: int, c: int) -> None:
        if into.size and os.preadv(fd, [into.data], offset) != into.nbytes:
            msg = f"{reader.where(c)} ends before the rows it stores (the file is truncated); the store is damaged"
            raise CorruptChunkError(msg)

    def flush() -> None:
        if run:
            fd, offset, at, n, c = run
            if out.dtype == dtype:
                read(fd, out[at : at + n], offset, c)
            else:  # narrow values (annbatch._narrow): read, then widen into place
                rows = thread_scratch(n * row_bytes).view(dtype).reshape(n, *tail)
                read(fd, rows, offset, c)
                out[at : at + n] = rows
            run.clear()

    firsts, lasts = work.chunk_bounds()
    # Which chunks are wanted whole (read whole, to verify their checksum): one vectorised
    # pass, not numpy calls per chunk (a window at chunk 32 touches about a thousand).
    read_whole = [reader.verify_checksums] * len(firsts)
    if layout.checksum and not reader.verify_checksums:
        wanted = np.add.reduceat(src_hi - src_lo, firsts)
        read_whole = (wanted == reader.chunk_rows(chunk[firsts])).tolist()
    table = located(reader, chunk[firsts], files)
    for k, (i, j) in enumerate(zip(firsts, lasts, strict=True)):
        c = int(chunk[i])
        fd = None
        if table is not None and table[0][k] >= 0:  # located by the array's chunk table
            where = None
            fd, base, nbytes = table[0][k], table[1][k], table[2][k]
            if nbytes != stored_bytes:
                msg = (
                    f"{reader.where(c)} holds {nbytes} bytes, not the {stored_bytes} of "
                    "an uncompressed chunk; the store is damaged or truncated"
                )
                raise CorruptChunkError(msg)
        else:
            where = reader.locate(c)
        if where is not None:
            _, base, nbytes = where
            if nbytes >= 0 and nbytes != stored_bytes:
                msg = (
                    f"{reader.where(c)} holds {nbytes} bytes, not the {stored_bytes} of "
                    "an uncompressed chunk; the store is damaged or truncated"
                )
                raise CorruptChunkError(msg)
            fd = _open(reader, files, where, c)
            if fd is not None and nbytes < 0 and os.fstat(fd).st_size != stored_bytes:
                # A file of another size: metadata that does not fit the data (another
                # dtype or chunk shape) or a damaged file. zarr writes edge chunks whole.
                msg = (
                    f"{reader.where(c)} is a file of {os.fstat(fd).st_size} bytes, not the "
                    f"{stored_bytes} of an uncompressed chunk; the store is damaged or its "
                    "metadata does not fit its data"
                )
                raise CorruptChunkError(msg)
        if fd is None:  # never written: the fill value
            yield i, j, c, None
            continue
        if layout.checksum and read_whole[k]:
            flush()
            whole = thread_scratch(stored_bytes)
            read(fd, whole, base, c)
            yield i, j, c, memoryview(whole.data)
            continue
        if j - i >= _SPAN_MIN_PIECES:
            flush()
            first, last = int(src_lo[i:j].min()), int(src_hi[i:j].max())
            span = thread_scratch((last - first) * row_bytes)
            span = span.view(dtype).reshape(last - first, *tail)
            read(fd, span, base + first * row_bytes, c)
            copy_pieces(span, out, src_lo[i:j] - first, src_hi[i:j] - first, dst[i:j], tail)
            continue
        for lo, hi, at in zip(
            src_lo[i:j].tolist(), src_hi[i:j].tolist(), dst[i:j].tolist(), strict=True
        ):
            offset = base + lo * row_bytes
            if (
                run
                and run[0] == fd
                and run[1] + run[3] * row_bytes == offset
                and run[2] + run[3] == at
            ):
                run[3] += hi - lo
            else:
                flush()
                run.extend([fd, offset, at, hi - lo, c])
    flush()
