"""Planner: map a load request over the global row space to reads of individual datasets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence


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
    """The reads that fill one window, in the order their rows lie in memory."""

    segments: list[Segment]
    """Row ranges to read, in memory order; adjacent ranges of one dataset are merged."""
    index: np.ndarray
    """Global row position of each row in memory, in memory order."""

    @property
    def n_rows(self) -> int:
        """Number of rows in the window."""
        return int(self.index.size)


def dataset_offsets(n_rows: Sequence[int]) -> np.ndarray:
    """Global position of each dataset's first row, plus the total at the end."""
    return np.concatenate([[0], np.cumsum(n_rows, dtype=np.int64)])


def plan_reads(chunks: Sequence[slice], offsets: np.ndarray) -> ReadPlan:
    """Split global row ranges at dataset boundaries into per-dataset segments.

    Parameters
    ----------
    chunks
        Global row ranges, in the order their rows should land in memory.
    offsets
        Output of :func:`dataset_offsets`.
    """
    segments: list[Segment] = []
    for chunk in chunks:
        start, stop = int(chunk.start), int(chunk.stop)
        while start < stop:
            # side="right" skips datasets with no rows, whose offsets repeat.
            ds = int(np.searchsorted(offsets, start, side="right")) - 1
            end = min(stop, int(offsets[ds + 1]))
            local = Segment(ds, start - int(offsets[ds]), end - int(offsets[ds]))
            prev = segments[-1] if segments else None
            if prev is not None and prev.dataset == ds and prev.stop == local.start:
                segments[-1] = Segment(ds, prev.start, local.stop)
            else:
                segments.append(local)
            start = end
    index = (
        np.concatenate([np.arange(c.start, c.stop, dtype=np.int64) for c in chunks])
        if chunks
        else np.empty(0, dtype=np.int64)
    )
    return ReadPlan(segments=segments, index=index)
