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

from annbatch._core.ranges import expand_ranges

if TYPE_CHECKING:
    from collections.abc import Sequence


class ChunkGrid(Protocol):
    """What the planner needs to know of a dataset's on-disk layout."""

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        """Whether reading rows ``row_a..row_b`` together decodes no chunk beyond theirs."""


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """The reads that fill one window, and where each requested row lands in memory."""

    datasets: np.ndarray
    """Dataset of each read; reads are in the order their rows lie in memory (disk order)."""
    starts: np.ndarray
    """First row of each read, local to its dataset."""
    stops: np.ndarray
    """One past the last row of each read."""
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


def _split_at_datasets(
    chunks: Sequence[slice], offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dataset, local start, local stop) of each piece of each chunk, in request order."""
    starts = np.array([c.start for c in chunks], dtype=np.int64)
    stops = np.array([c.stop for c in chunks], dtype=np.int64)
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    # side="right" skips datasets with no rows, whose offsets repeat.
    first = np.searchsorted(offsets, starts, side="right") - 1
    last = np.searchsorted(offsets, stops - 1, side="right") - 1
    if np.array_equal(first, last):  # no chunk crosses a dataset boundary
        return first, starts - offsets[first], stops - offsets[first]
    pieces = []
    for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        while start < stop:
            ds = int(np.searchsorted(offsets, start, side="right")) - 1
            end = min(stop, int(offsets[ds + 1]))
            pieces.append((ds, start - int(offsets[ds]), end - int(offsets[ds])))
            start = end
    ds_, lo, hi = (np.array(col, dtype=np.int64) for col in zip(*pieces, strict=True))
    return ds_, lo, hi


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
    ds, start, stop = _split_at_datasets(chunks, offsets)
    if ds.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return ReadPlan(datasets=empty, starts=empty, stops=empty, index=empty, positions=empty)
    order = np.lexsort((start, ds))
    s_ds, s_start, s_stop = ds[order], start[order], stop[order]
    # Furthest row reached so far within the dataset (datasets are sorted, so offsetting each
    # by its position keeps one running maximum from leaking into the next dataset).
    shift = s_ds * (int(offsets[-1]) + 1)
    reach = np.maximum.accumulate(s_stop + shift) - shift
    new = np.ones(s_ds.size, dtype=bool)
    new[1:] = (s_ds[1:] != s_ds[:-1]) | (s_start[1:] > reach[:-1])
    for i in np.flatnonzero(new[1:]).tolist():  # a gap: merge it if a chunk spans it
        i += 1
        d = int(s_ds[i])
        grid = grids[d] if d < len(grids) else None
        if (
            grid is not None
            and s_ds[i - 1] == d
            and grid.shares_chunk(int(reach[i - 1]) - 1, int(s_start[i]))
        ):
            new[i] = False
    segment = np.cumsum(new) - 1
    heads = np.flatnonzero(new)
    tails = np.concatenate([heads[1:], [s_ds.size]]) - 1
    seg_ds, seg_start, seg_stop = s_ds[heads], s_start[heads], reach[tails]
    seg_base = np.concatenate([[0], np.cumsum(seg_stop - seg_start)])
    read_of_piece = np.empty(ds.size, dtype=np.int64)
    read_of_piece[order] = segment
    shifts = seg_base[read_of_piece] - seg_start[read_of_piece]
    positions = expand_ranges(start, stop) + np.repeat(shifts, stop - start)
    index = expand_ranges(seg_start + offsets[seg_ds], seg_stop + offsets[seg_ds])
    return ReadPlan(
        datasets=seg_ds, starts=seg_start, stops=seg_stop, index=index, positions=positions
    )


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
    stops = np.array([c.stop for c in chunks], dtype=np.int64)
    return expand_ranges(starts, np.maximum(starts, stops))


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
