"""Planner: map a load request over the global row space to the fewest reads per dataset.

The rows of a request are read in disk order, not request order: segments are sorted per
dataset, and overlapping or adjacent ones, or ones whose boundary rows share an on-disk
chunk, are merged into one read. So each on-disk chunk that the window touches is fetched
and decoded once. The plan then records where each requested row landed in memory, and
batches are cut by those positions; rows that a merged read brought in without being
requested (the gap inside a shared chunk) are never yielded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence


class ChunkGrid(Protocol):
    """What the planner needs to know of a dataset's on-disk layout."""

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        """Whether reading rows ``row_a..row_b`` together decodes no chunk beyond theirs."""


@dataclass(frozen=True, slots=True)
class Segment:
    """A contiguous row range of one dataset."""

    dataset: int
    """Position of the dataset in the Loader."""
    start: int
    """First row, local to the dataset."""
    stop: int
    """One past the last row, local to the dataset."""

    @property
    def n_rows(self) -> int:
        """Number of rows in the range."""
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """The reads that fill one window, and where each requested row lands in memory."""

    segments: list[Segment]
    """Row ranges to read, in the order their rows are laid out in memory (disk order)."""
    index: np.ndarray
    """Global row position of each row in memory."""
    positions: np.ndarray
    """For each requested row, in request order, its row in memory."""

    @property
    def n_rows(self) -> int:
        """Number of rows the request asked for."""
        return int(self.positions.size)


def dataset_offsets(n_rows: Sequence[int]) -> np.ndarray:
    """Global position of each dataset's first row, plus the total at the end."""
    return np.concatenate([[0], np.cumsum(n_rows, dtype=np.int64)])


def _split_at_datasets(chunks: Sequence[slice], offsets: np.ndarray) -> list[tuple[int, int, int]]:
    """(dataset, local start, local stop) for each piece of each chunk, in request order."""
    pieces = []
    for chunk in chunks:
        start, stop = int(chunk.start), int(chunk.stop)
        while start < stop:
            # side="right" skips datasets with no rows, whose offsets repeat.
            ds = int(np.searchsorted(offsets, start, side="right")) - 1
            end = min(stop, int(offsets[ds + 1]))
            pieces.append((ds, start - int(offsets[ds]), end - int(offsets[ds])))
            start = end
    return pieces


def plan_reads(
    chunks: Sequence[slice], offsets: np.ndarray, grids: Sequence[ChunkGrid | None] = ()
) -> ReadPlan:
    """Turn global row ranges into merged per-dataset reads.

    Parameters
    ----------
    chunks
        Global row ranges, in request order.
    offsets
        Output of :func:`dataset_offsets`.
    grids
        Per dataset, its on-disk chunk layout (None: merge only touching ranges).
    """
    pieces = _split_at_datasets(chunks, offsets)
    if not pieces:
        empty = np.empty(0, dtype=np.int64)
        return ReadPlan(segments=[], index=empty, positions=empty)
    order = sorted(range(len(pieces)), key=lambda i: pieces[i][:2])
    reads: list[Segment] = []
    read_of_piece = np.empty(len(pieces), dtype=np.int64)
    for i in order:
        ds, start, stop = pieces[i]
        prev = reads[-1] if reads else None
        grid = grids[ds] if ds < len(grids) else None
        if (
            prev is not None
            and prev.dataset == ds
            and (
                start <= prev.stop or (grid is not None and grid.shares_chunk(prev.stop - 1, start))
            )
        ):
            reads[-1] = Segment(ds, prev.start, max(prev.stop, stop))
        else:
            reads.append(Segment(ds, start, stop))
        read_of_piece[i] = len(reads) - 1
    read_base = np.concatenate([[0], np.cumsum([r.n_rows for r in reads])])
    positions = np.concatenate(
        [
            np.arange(start, stop, dtype=np.int64) - reads[r].start + read_base[r]
            for (_, start, stop), r in zip(pieces, read_of_piece, strict=True)
        ]
    )
    index = np.concatenate(
        [np.arange(r.start, r.stop, dtype=np.int64) + offsets[r.dataset] for r in reads]
    )
    return ReadPlan(segments=reads, index=index, positions=positions)


@dataclass(frozen=True, slots=True)
class Runs:
    """Rows of one dataset that a window wants, as runs that are contiguous both on disk and
    in the window's output (which holds the rows in batch order)."""

    dataset: int
    """Position of the dataset in the Loader."""
    starts: np.ndarray
    """First row of each run, local to the dataset; sorted."""
    stops: np.ndarray
    """One past the last row of each run."""
    dest: np.ndarray
    """Output row of each run's first row."""


@dataclass(frozen=True, slots=True)
class Placement:
    """A window read straight into batch order: which rows go where, and the batches."""

    rows: np.ndarray
    """Global row position of each output row; batch after batch."""
    bounds: np.ndarray
    """Batch ``b`` is output rows ``bounds[b]:bounds[b + 1]``."""
    runs: list[Runs]
    """Per dataset with wanted rows, the rows to read and where they go."""


def requested_rows(chunks: Sequence[slice]) -> np.ndarray:
    """Global row positions of a request's chunks, in request order."""
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    lengths = np.array([c.stop - c.start for c in chunks], dtype=np.int64)
    if lengths.sum() <= 0:
        return np.empty(0, dtype=np.int64)
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())


def plan_placement(
    chunks: Sequence[slice], splits: Sequence[np.ndarray], offsets: np.ndarray
) -> Placement | None:
    """Plan reading a request straight into batch order, or None if a row would be yielded
    more than once in the window (then the window must be read first and batches cut from it).

    Parameters
    ----------
    chunks
        Global row ranges, in request order.
    splits
        Positions into the request's rows (``chunks`` one after another), one array per batch.
    offsets
        Output of :func:`dataset_offsets`.
    """
    order = np.concatenate(splits) if splits else np.empty(0, dtype=np.int64)
    rows = requested_rows(chunks)[order]
    by_row = np.argsort(rows, kind="stable")
    sorted_rows = rows[by_row]
    if sorted_rows.size > 1 and not bool(np.all(np.diff(sorted_rows) > 0)):
        return None
    dataset = np.searchsorted(offsets, sorted_rows, side="right") - 1
    breaks = (
        np.flatnonzero(
            (np.diff(sorted_rows) != 1) | (np.diff(by_row) != 1) | (np.diff(dataset) != 0)
        )
        + 1
    )
    first = np.concatenate([[0], breaks]).astype(np.int64)
    last = np.concatenate([breaks, [sorted_rows.size]]).astype(np.int64)
    runs = []
    if sorted_rows.size:
        run_dataset = dataset[first]
        for ds in np.unique(run_dataset).tolist():
            mine = run_dataset == ds
            starts = sorted_rows[first[mine]] - offsets[ds]
            runs.append(Runs(ds, starts, starts + (last - first)[mine], by_row[first[mine]]))
    bounds = np.concatenate([[0], np.cumsum([s.size for s in splits])]).astype(np.int64)
    return Placement(rows=rows, bounds=bounds, runs=runs)
