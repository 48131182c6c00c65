"""Arrays of one layout read as one: a window's rows of every dataset it touches in one plan.

A window of an atlas draws its rows from dozens of datasets, and each array of each dataset
(``data``, ``indices``, ``indptr``, every obs column) was read by a plan of its own: per
dataset and array, the vectorised planning, the task objects and the Python calls of a read,
which at 20 datasets cost more than reading the bytes. The datasets of a collection store each
array with the same layout (rows per chunk, dtype, codecs), only in other files; stacked, they
are one row space in which array ``k``'s row ``i`` is row ``bases[k] + i`` (each array starts
at a chunk of its own, so no chunk holds rows of two arrays), and one plan reads a window's
ranges of all of them.

:class:`StackedReader` is that row space as a :class:`~annbatch._core.chunks.ChunkReader`:
planning and decoding are the reader's; where a chunk is, how it is named in errors, and what a
chunk never written reads as are asked of the array it belongs to. Local files only (object
storage prefetches shard indexes per array: it keeps one plan per array).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING, Any

import numcodecs
import numpy as np

from annbatch._core.chunks.local import LocalTransport
from annbatch._core.chunks.reader import ChunkReader

if TYPE_CHECKING:
    from collections.abc import Sequence


def _codec(compressor: Any) -> Any:
    """What decoding with ``compressor`` depends on: blosc, zstd and gzip frames describe
    themselves (any settings decode them); other codecs (zarr v2 filters used as compressors,
    e.g. ``Shuffle(elementsize=...)``) decode by their settings."""
    if compressor is None or isinstance(
        compressor, numcodecs.Blosc | numcodecs.Zstd | numcodecs.GZip
    ):
        return type(compressor)
    return (type(compressor), repr(sorted(compressor.get_config().items())))


def _key(reader: ChunkReader) -> tuple[Any, ...]:
    """What arrays read as one must share."""
    layout = reader.layout
    return (
        layout.rows_per_chunk,
        layout.chunk_shape,
        _codec(layout.compressor),
        layout.checksum,
        reader.dtype,
        reader.shape[1:],
        reader.verify_checksums,
    )


def stack_bases(readers: Sequence[ChunkReader]) -> np.ndarray | None:
    """Where each of ``readers``' arrays begins when they are read as one: array ``k``'s row
    ``i`` is row ``bases[k] + i``, each array from a chunk of its own. None when they cannot be
    read so (not all in local files, or layouts, dtypes or checksum policies differ)."""
    if not readers or not all(isinstance(r.transport, LocalTransport) for r in readers):
        return None
    key = _key(readers[0])
    if any(_key(r) != key for r in readers[1:]):
        return None
    rows = readers[0].layout.rows_per_chunk
    chunks = [-(-int(r.shape[0]) // rows) for r in readers]
    return np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64) * rows


class StackedReader(ChunkReader):
    """Arrays of one layout as one :class:`ChunkReader` (see the module docstring).

    Parameters
    ----------
    readers
        The arrays, in the order of their rows in the stack.
    bases
        Where each begins (:func:`stack_bases`).
    """

    def __init__(self, readers: Sequence[ChunkReader], bases: np.ndarray) -> None:
        first = readers[0]
        rows = first.layout.rows_per_chunk
        n = int(bases[-1]) + int(readers[-1].shape[0])
        super().__init__(
            first.layout,
            (n, *first.shape[1:]),
            first.dtype,
            first._fill,
            first.transport,
            verify_checksums=first.verify_checksums,
        )
        self._readers = list(readers)
        self._first_chunks = (np.asarray(bases, dtype=np.int64) // rows).tolist()
        self._lengths = np.array([r.shape[0] for r in readers], dtype=np.int64)
        self._bases = np.asarray(self._first_chunks, dtype=np.int64) * rows

    @classmethod
    def of(cls, readers: Sequence[ChunkReader]) -> StackedReader | None:
        """The stack of ``readers``, or None where they cannot be read as one."""
        bases = stack_bases(readers)
        return None if bases is None else cls(readers, bases)

    @property
    def readers(self) -> list[ChunkReader]:
        """The arrays, in the order of their rows in the stack."""
        return self._readers

    @property
    def bases(self) -> np.ndarray:
        """Where each array begins in the stack."""
        return self._bases

    def _owner(self, chunk: int) -> tuple[ChunkReader, int]:
        """The array chunk ``chunk`` of the stack belongs to, and its chunk there."""
        k = bisect_right(self._first_chunks, chunk) - 1
        return self._readers[k], chunk - self._first_chunks[k]

    def chunk_rows(self, chunks: np.ndarray) -> np.ndarray:
        rows = self.layout.rows_per_chunk
        first = np.asarray(self._first_chunks, dtype=np.int64)
        k = np.searchsorted(first, chunks, side="right") - 1
        return np.minimum(rows, self._lengths[k] - (chunks - first[k]) * rows)

    def _own_files(self) -> None:  # a stack's files are its arrays'
        self.owner = -1

    def owner_of(self, chunk: int) -> int:
        reader, local = self._owner(chunk)
        return reader.owner_of(local)

    def locate(self, chunk: int) -> tuple[str, int, int] | None:
        reader, local = self._owner(chunk)
        return reader.locate(local)

    def where(self, chunk: int) -> str:
        reader, local = self._owner(chunk)
        return reader.where(local)

    def chunk_name(self, chunk: int) -> str:
        reader, local = self._owner(chunk)
        return reader.chunk_name(local)

    def fill(
        self,
        out: np.ndarray,
        src_lo: np.ndarray,
        src_hi: np.ndarray,
        dst: np.ndarray,
        chunk: int,
    ) -> None:
        reader, local = self._owner(chunk)
        reader.fill(out, src_lo, src_hi, dst, local)

    def shard_path(self, shard: int) -> str:  # chunks are located through their own array
        raise NotImplementedError

    def shard_index(self, shard: int) -> np.ndarray | None:
        raise NotImplementedError
