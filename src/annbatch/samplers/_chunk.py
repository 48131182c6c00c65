"""ChunkSampler: contiguous chunks of rows, grouped into preload windows."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from annbatch.abc import LoadRequest, Sampler
from annbatch.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Iterator


def parse_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int, or raise naming ``name`` if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        msg = f"{name} must be a positive integer, got {value!r}"
        raise InvalidArgumentError(msg)
    return int(value)


def parse_rng(rng: object) -> np.random.Generator:
    """Return ``rng``, or a fresh generator when it is None."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        msg = f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}"
        raise InvalidArgumentError(msg)
    return rng


class ChunkSampler(Sampler):
    """Read ``chunk_size`` contiguous rows at a time, ``preload_nchunks`` chunks per window.

    The row space is cut into chunks of ``chunk_size`` consecutive rows. Each load request
    holds ``preload_nchunks`` chunks (a random selection when shuffling), and its rows are
    split into batches of ``batch_size`` (a random permutation of them when shuffling).
    Larger chunks read faster; smaller chunks, or more of them per window, mix rows better.

    Parameters
    ----------
    chunk_size
        Number of contiguous rows per chunk.
    preload_nchunks
        Number of chunks read into memory together. ``chunk_size * preload_nchunks`` must be at
        least ``batch_size``.
    batch_size
        Number of rows per batch.
    shuffle
        Draw a random chunk order and a random row order within each window.
    drop_last
        Drop the epoch's last batch if it has fewer than ``batch_size`` rows.
    rng
        Source of all randomness; ``numpy.random.default_rng()`` when None.

    Notes
    -----
    Every window but the epoch's last holds ``chunk_size * preload_nchunks`` rows rounded down
    to a multiple of ``batch_size``, so only the epoch's last batch can be short. When the
    rounding removes rows, the chunk at the end of a window continues at the start of the
    next one (it is read as two ranges, never twice).
    """

    def __init__(
        self,
        chunk_size: int = 512,
        preload_nchunks: int = 32,
        batch_size: int = 1,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        rng: np.random.Generator | None = None,
    ) -> None:
        self._chunk_size = parse_positive_int(chunk_size, "chunk_size")
        self._preload_nchunks = parse_positive_int(preload_nchunks, "preload_nchunks")
        self._batch_size = parse_positive_int(batch_size, "batch_size")
        window = self._chunk_size * self._preload_nchunks
        if self._batch_size > window:
            msg = (
                f"batch_size ({self._batch_size}) is larger than one preload window, chunk_size * "
                f"preload_nchunks ({self._chunk_size} * {self._preload_nchunks} = {window}); "
                "raise preload_nchunks or lower batch_size"
            )
            raise InvalidArgumentError(msg)
        # Every window but the last holds a whole number of batches, so no batch is short
        # mid-epoch; the chunk at a window's edge is split between two windows.
        self._window_rows = window - window % self._batch_size
        self._shuffle = _parse_bool(shuffle, "shuffle")
        self._drop_last = _parse_bool(drop_last, "drop_last")
        self._rng = parse_rng(rng)

    def __repr__(self) -> str:
        return (
            f"ChunkSampler(chunk_size={self._chunk_size}, preload_nchunks={self._preload_nchunks}, "
            f"batch_size={self._batch_size}, shuffle={self._shuffle}, drop_last={self._drop_last})"
        )

    @property
    def chunk_size(self) -> int:
        """Number of contiguous rows per chunk."""
        return self._chunk_size

    @property
    def preload_nchunks(self) -> int:
        """Number of chunks per load request."""
        return self._preload_nchunks

    @property
    def batch_size(self) -> int:
        """Number of rows per batch."""
        return self._batch_size

    @property
    def shuffle(self) -> bool:
        """Whether the order is random."""
        return self._shuffle

    @property
    def drop_last(self) -> bool:
        """Whether a short last batch is dropped."""
        return self._drop_last

    @property
    def rng(self) -> np.random.Generator:
        """The generator that all shuffling draws from."""
        return self._rng

    def n_batches(self, n_obs: int) -> int:
        """Number of batches per epoch over ``n_obs`` rows."""
        if self._drop_last:
            return n_obs // self._batch_size
        return math.ceil(n_obs / self._batch_size)

    def reseed(self, seed: int) -> None:
        """Derive a new generator from ``seed`` and one draw of the current generator."""
        own = int(self._rng.integers(2**63))
        self._rng = np.random.default_rng([seed, own])

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        starts = np.arange(0, n_obs, self._chunk_size)
        if self._shuffle:
            starts = self._rng.permutation(starts)
        n_keep = self.n_batches(n_obs) * self._batch_size if self._drop_last else n_obs
        emitted = 0
        for chunks in self._windows(starts, n_obs):
            n_rows = sum(c.stop - c.start for c in chunks)
            n_use = min(n_rows, n_keep - emitted)
            if n_use <= 0:
                return
            order = self._rng.permutation(n_rows) if self._shuffle else np.arange(n_rows)
            # Rows past n_use are read but not yielded: they form the dropped short batch.
            order = order[:n_use]
            splits = [order[i : i + self._batch_size] for i in range(0, n_use, self._batch_size)]
            emitted += n_use
            yield LoadRequest(chunks=chunks, splits=splits)

    def _windows(self, starts: np.ndarray, n_obs: int) -> Iterator[list[slice]]:
        """Cut the chunk sequence into windows of ``self._window_rows`` rows (the last shorter)."""
        window: list[slice] = []
        room = self._window_rows
        for s in starts:
            start, stop = int(s), min(int(s) + self._chunk_size, n_obs)
            while start < stop:
                end = min(stop, start + room)
                window.append(slice(start, end))
                room -= end - start
                start = end
                if room == 0:
                    yield window
                    window, room = [], self._window_rows
        if window:
            yield window


def _parse_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        msg = f"{name} must be a bool, got {value!r}"
        raise InvalidArgumentError(msg)
    return bool(value)
