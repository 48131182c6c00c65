"""Row ranges as flat index arrays, without a Python loop."""

from __future__ import annotations

import numpy as np


def expand_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(starts, stops)])``, without the loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)


def runs_of(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions (any order, repeats allowed) as the runs of consecutive rows that hold
    them, sorted and disjoint (``starts``, ``stops``), each row once; and each position's place
    in the rows of those runs laid out one after the other."""
    unique, inverse = np.unique(np.asarray(rows), return_inverse=True)
    if unique.size == 0:
        return unique, unique, inverse
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    starts = unique[np.concatenate([[0], breaks])]
    stops = unique[np.concatenate([breaks - 1, [unique.size - 1]])] + 1
    return starts, stops, inverse
