"""Rows of one chunk to their places in the output: the copy, and the scratch memory it uses."""

from __future__ import annotations

import math
import threading

import numpy as np

# Copying pieces of a decoded chunk: a slice per piece when pieces hold at least this many
# values on average, else one fancy index for all (measured on 1-D float32 chunks of 131,072).
_SLICE_MIN_VALUES = 128

_scratch = threading.local()


def thread_scratch(nbytes: int) -> np.ndarray:
    """``nbytes`` bytes that the calling thread reuses from one call to the next."""
    buffer: np.ndarray | None = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = _scratch.buffer = np.empty(nbytes, dtype=np.uint8)
    return buffer[:nbytes]


def copy_pieces(
    chunk: np.ndarray,
    out: np.ndarray,
    src_lo: np.ndarray,
    src_hi: np.ndarray,
    dst: np.ndarray,
    trailing: tuple[int, ...],
) -> None:
    """Copy rows ``src_lo[k]:src_hi[k]`` of a decoded chunk to ``out[dst[k]:...]``."""
    if chunk.shape[1:] != trailing:  # chunk padded beyond the array's columns
        chunk = chunk[(slice(None), *(slice(0, n) for n in trailing))]
    n = src_hi - src_lo
    total = int(n.sum())
    if total == src_lo.size and len(trailing):
        # Single rows (rows of a dense chunk scattered to batch order): one row-indexed copy,
        # from a view of the chunk when the rows are consecutive there (no temporary). For a
        # chunk of 256 rows of 8 KB: 160 us, against 275 us for a slice per row.
        first, last = int(src_lo[0]), int(src_lo[-1]) + 1
        consecutive = last - first == total and bool(np.all(np.diff(src_lo) == 1))
        out[dst] = chunk[first:last] if consecutive else chunk[src_lo]
        return
    if total * math.prod(trailing) >= _SLICE_MIN_VALUES * src_lo.size:
        # Long pieces: one slice assignment each (~0.5 us of Python per piece, then memcpy).
        for lo, hi, at in zip(src_lo.tolist(), src_hi.tolist(), dst.tolist(), strict=True):
            out[at : at + hi - lo] = chunk[lo:hi]
        return
    # Many short pieces: one fancy-indexed copy (~3 ns per row, whatever the piece count).
    step = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
    out[np.repeat(dst, n) + step] = chunk[np.repeat(src_lo, n) + step]
