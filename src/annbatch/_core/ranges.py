"""Row ranges as flat index arrays, without a Python loop."""

from __future__ import annotations

import numpy as np


def expand_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, b) for a, b in zip(starts, stops)])``, without the loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
