"""The contract between the chunk reader and what moves bytes: :class:`Transport`.

The reader (:class:`~annbatch._core.chunks.reader.ChunkReader`) plans a read as
:class:`Work` (whole chunks per task) and turns bytes into rows; a transport gets the bytes,
from local files (:mod:`~annbatch._core.chunks.local`) or from object storage
(:mod:`~annbatch._core.chunks.object_store`), and hands them to the reader's decode loop as
:data:`Fetched` items.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from annbatch._core.chunks.reader import ChunkReader

Fetched: TypeAlias = "Iterable[tuple[int, int, int, bytes | memoryview | None]]"
"""What a transport hands the decode loop, chunk after chunk in the work's order:
(first piece, one past its last piece, chunk, the chunk's encoded bytes as stored, checksum
included; None: the chunk was never written)."""


@dataclass(frozen=True, slots=True)
class Work:
    """What one read task fills: pieces of whole chunks, each piece rows of one chunk."""

    out: np.ndarray
    """Where the rows go."""
    chunk: np.ndarray
    """Chunk of each piece; pieces of one chunk follow each other."""
    src_lo: np.ndarray
    """First row of each piece in its chunk."""
    src_hi: np.ndarray
    """One past the last row of each piece in its chunk."""
    dst: np.ndarray
    """Row of ``out`` where each piece lands."""
    check: Callable[[np.ndarray], None] | None = None
    """Called on the parts of ``out`` the task filled (runs of consecutive rows)."""

    def chunk_bounds(self) -> tuple[list[int], list[int]]:
        """First and one-past-last piece of each chunk."""
        bounds = (np.flatnonzero(np.diff(self.chunk)) + 1).tolist()
        return [0, *bounds], [*bounds, self.chunk.size]

    def check_filled(self) -> None:
        """Run :attr:`check` on what the task filled."""
        if self.check is not None:
            dst = self.dst
            ends = dst + self.src_hi - self.src_lo
            breaks = np.flatnonzero(dst[1:] != ends[:-1]) + 1
            for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), dst.size], strict=True):
                self.check(self.out[int(dst[a]) : int(ends[b - 1])])


class Transport(Protocol):
    """How the bytes of one array's chunks and shard indexes are read."""

    def read_index(self, path: str, nbytes: int, *, at_end: bool) -> tuple[bytes, int] | None:
        """(the ``nbytes`` bytes of the shard index at the end or the start of shard ``path``,
        the shard's size), or None: no such shard."""

    def task(self, reader: ChunkReader, work: Work) -> Callable[[], None]:
        """A task that reads ``work``: it gets the bytes, gives them to
        :meth:`ChunkReader.decode <annbatch._core.chunks.reader.ChunkReader.decode>` (or,
        for uncompressed rows, puts them in place itself) and runs :meth:`Work.check_filled`.
        Its failures name the first chunk (:meth:`ChunkReader.read_errors`). A transport may
        start getting the bytes now; a task dropped unrun then stops (``cancel()`` if it has
        one)."""
