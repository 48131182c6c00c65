"""CSR row pointers (``indptr``): held in memory, or read per window from disk.

Held whole, ``indptr`` costs 8 bytes per row in every process that reads the dataset (800 MB
for 100 million rows, in the main process and again in each DataLoader worker), and opening a
dataset reads and checks all of it. An ``indptr`` that the chunk reader reads in part (an
uncompressed zarr array, as in annbatch collections) is therefore not held: each window reads
the pointers of its own row ranges (one small read per range), checks them and uses them.
Opening reads two entries (the first and the last); a pickled source carries no per-row data.

Both kinds answer one question, :meth:`Indptr.pieces`: the pointers of some row ranges.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

from annbatch._core.chunks.small import read_rows, read_stacked, stack_bases
from annbatch._core.chunks.table import Readers
from annbatch._core.failures import store_errors
from annbatch._core.ranges import expand_ranges
from annbatch._core.validate import check_indptr
from annbatch.errors import CorruptDataError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch._core.chunks import ChunkReader


class Indptr(Protocol):
    """The row pointers of a CSR matrix of :attr:`n_obs` rows."""

    n_obs: int

    def pieces(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """``concatenate([indptr[a : b + 1] for a, b in zip(starts, stops)])`` as int64, checked:
        within each piece non-decreasing and inside ``[0, nnz]``."""
        ...


def piece_bounds(starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of each range's first and last pointer in :meth:`Indptr.pieces`' result."""
    lengths = np.asarray(stops, dtype=np.int64) - np.asarray(starts, dtype=np.int64) + 1
    last = np.cumsum(lengths) - 1
    return last - lengths + 1, last


def row_lengths(pieces: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Stored entries of every row of the ranges, in order, from their :meth:`Indptr.pieces`."""
    steps = np.diff(pieces)
    if len(starts) <= 1:
        return steps
    _, last = piece_bounds(starts, stops)
    return np.delete(steps, last[:-1])  # the step from one range's last pointer to the next's


class HeldIndptr:
    """``indptr`` in memory, checked whole when the source is made."""

    def __init__(self, indptr: np.ndarray, *, n_obs: int, nnz: int, exact: bool, where: str):
        self.array = check_indptr(indptr, n_obs=n_obs, nnz=nnz, exact=exact, where=where)
        self.n_obs = n_obs

    def pieces(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        return self.array[expand_ranges(np.asarray(starts), np.asarray(stops) + 1)]


class StoredIndptr:
    """``indptr`` read per call through the chunk reader (see the module docstring).

    Parameters
    ----------
    reader
        The chunk reader over the stored ``indptr`` (it must read chunks in part).
    n_obs, nnz
        Rows of the matrix; entries stored in its data and indices.
    where
        The dataset, as named in errors.
    """

    def __init__(self, reader: ChunkReader, *, n_obs: int, nnz: int, where: str) -> None:
        self._reader = reader
        self.n_obs = n_obs
        self._nnz = nnz
        self._where = where
        shape, dtype = reader.shape, reader.dtype
        if len(shape) != 1 or dtype.kind not in "iu":
            msg = f"{where}: indptr must be a 1-D integer array, got {dtype} of shape {shape}"
            raise CorruptDataError(msg)
        if shape[0] != n_obs + 1:
            msg = f"{where}: indptr has {shape[0]} entries; a CSR matrix of {n_obs} rows needs {n_obs + 1}"
            raise CorruptDataError(msg)
        (read,) = stacked_pieces(
            [self], [(np.array([0, n_obs]), np.array([0, n_obs]))], check=False
        )
        ends = read[[0, -1]]
        if ends[0] != 0:
            msg = f"{where}: indptr starts at {int(ends[0])}, not 0; the store is damaged"
            raise CorruptDataError(msg)
        if ends[-1] != nnz:
            msg = (
                f"{where}: indptr ends at {int(ends[-1])} but {nnz} entries are stored in data "
                "and indices; the store is damaged or was written by a tool that does not "
                "follow anndata's CSR encoding"
            )
            raise CorruptDataError(msg)

    @staticmethod
    def usable(reader: ChunkReader | None) -> bool:
        """Whether ``reader`` reads ``indptr`` in part (uncompressed, checksums not forced),
        so that reading it per window costs no more than the pointers wanted."""
        return (
            reader is not None
            and reader.layout.compressor is None
            and not reader.verify_checksums
            and reader.layout.rows_per_chunk > 1
        )

    def pieces(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        return stacked_pieces([self], [(starts, stops)])[0]

    def check(self, pieces: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
        """Raise unless every piece is non-decreasing and inside ``[0, nnz]``: the row slices
        taken from it must stay inside data and indices."""
        if pieces.size and (int(pieces.min()) < 0 or int(pieces.max()) > self._nnz):
            bad = int(np.flatnonzero((pieces < 0) | (pieces > self._nnz))[0])
            msg = (
                f"{self._where}: indptr holds {int(pieces[bad])}, outside [0, {self._nnz}] "
                "(the entries stored); the store is damaged"
            )
            raise CorruptDataError(msg)
        steps = row_lengths(pieces, starts, stops)
        if steps.size and int(steps.min()) < 0:
            rows = expand_ranges(starts, stops)
            row = int(rows[int(np.argmax(steps < 0))])
            msg = f"{self._where}: indptr decreases at row {row}; the store is damaged"
            raise CorruptDataError(msg)


def stacked_pieces(
    indptrs: Sequence[StoredIndptr],
    ranges: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    check: bool = True,
) -> list[np.ndarray]:
    """:meth:`Indptr.pieces` of ``ranges[k]`` (``starts``, ``stops``) of each of ``indptrs``:
    read in one pass where their arrays can be read as one (:class:`IndptrStack`), else one
    by one; checked (unless ``check`` is false)."""
    return IndptrStack(indptrs).pieces(range(len(indptrs)), ranges, check=check)


class IndptrStack:
    """Row pointers of several datasets read as one
    (:func:`~annbatch._core.chunks.small.read_stacked`: a window's pointers in every dataset
    it touches in one pass). Made once for all of a Loader's datasets
    (:mod:`annbatch._core.sources.stack`), its chunk table is made once too;
    :func:`stacked_pieces` makes one per call, over the datasets it is given.

    Parameters
    ----------
    indptrs
        The datasets' row pointers, in the order of their rows in the stack.
    """

    def __init__(self, indptrs: Sequence[StoredIndptr]) -> None:
        self.indptrs = list(indptrs)
        self.readers = Readers(p._reader for p in self.indptrs)  # keeps its chunk table
        self.bases = stack_bases(self.readers)
        self.names = [f"indptr of {p._where}" for p in self.indptrs]
        self.nnz = np.array([p._nnz for p in self.indptrs], dtype=np.int64)

    def pieces(
        self,
        members: Sequence[int],
        ranges: Sequence[tuple[np.ndarray, np.ndarray]],
        *,
        check: bool = True,
    ) -> list[np.ndarray]:
        """:meth:`Indptr.pieces` of ``ranges[k]`` of dataset ``members[k]`` of the stack
        (members in row order), checked (unless ``check`` is false)."""
        ranges = [(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) for a, b in ranges]
        members = list(members)
        bases = self.bases
        if bases is None and len(self.readers) > 1:
            return [
                IndptrStack([self.indptrs[m]]).pieces([0], [r], check=check)[0]
                for m, r in zip(members, ranges, strict=True)
            ]
        # The pointers of rows a..b-1 are entries a..b of indptr; in the stack, from bases[k].
        # Every dataset's ranges at once (a window of an atlas touches dozens of datasets).
        sizes = np.array([a.size for a, _ in ranges], dtype=np.int64)
        all_starts = np.concatenate([a for a, _ in ranges])
        all_stops = np.concatenate([b for _, b in ranges])
        shift = 0 if bases is None else np.repeat(bases[members], sizes)
        lo = all_starts + shift
        hi = all_stops + 1 + shift
        if lo.size == 0:
            return [np.empty(0, dtype=np.int64) for _ in members]
        # The union of the ranges, sorted and disjoint, is what is read.
        order = np.argsort(lo, kind="stable")
        s_lo, s_hi = lo[order], hi[order]
        reach = np.maximum.accumulate(s_hi)
        new = np.ones(s_lo.size, dtype=bool)
        new[1:] = s_lo[1:] > reach[:-1]
        heads = np.flatnonzero(new)
        m_lo = s_lo[heads]
        m_hi = reach[np.concatenate([heads[1:], [s_lo.size]]) - 1]
        readers = self.readers
        values = np.empty(int(np.sum(m_hi - m_lo)), dtype=readers[0].dtype)
        names = self.names
        with store_errors(lambda: f"reading {names[members[0]]}"):
            if bases is None:  # one array the stacked read does not take (object storage)
                read_rows(readers[0], m_lo, m_hi, values)
            else:
                read_stacked(readers, bases, m_lo, m_hi, values, names=names, checked=True)
        if values.dtype.kind == "u" and values.size and int(values.max()) >= 2**63:
            at_bad = int(np.flatnonzero(values >= 2**63)[0])  # in the stack: its dataset
            merged = int(np.searchsorted(np.cumsum(m_hi - m_lo), at_bad, side="right"))
            entry = int(m_lo[merged]) + at_bad - int(np.sum((m_hi - m_lo)[:merged]))
            k = 0 if bases is None else int(np.searchsorted(bases, entry, side="right")) - 1
            msg = f"{self.indptrs[k]._where}: indptr holds values beyond the int64 range; the store is damaged"
            raise CorruptDataError(msg)
        values = values.astype(np.int64, copy=False)
        offset = np.concatenate([[0], np.cumsum(m_hi - m_lo)])[:-1]
        wanted = expand_ranges(lo, hi)
        run = np.searchsorted(m_lo, wanted, side="right") - 1
        flat = values[wanted - m_lo[run] + offset[run]]
        dataset = np.repeat(np.arange(sizes.size), sizes)  # of each range
        counts = np.bincount(dataset, weights=hi - lo, minlength=sizes.size).astype(np.int64)
        out = np.split(flat, np.cumsum(counts)[:-1])  # entries of each dataset
        if check:  # every dataset at once; a failure is named by the dataset's own check
            nnz = np.repeat(self.nnz[members], counts)
            steps = row_lengths(flat, all_starts, all_stops)
            if bool(np.any((flat < 0) | (flat > nnz))) or (steps.size and int(steps.min()) < 0):
                for m, piece, (a, b) in zip(members, out, ranges, strict=True):
                    self.indptrs[m].check(piece, a, b)
        return out
