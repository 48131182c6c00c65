"""ChunkSampler: contiguous chunks of rows, grouped into preload windows."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from annbatch._args import parse_bool, parse_mask, parse_positive_int
from annbatch.abc._sampler import ChunkRequest, check_mask, split_batches
from annbatch.errors import InvalidArgumentError
from annbatch.samplers._epochs import EpochSampler

if TYPE_CHECKING:
    from collections.abc import Iterator


class ChunkSampler(EpochSampler):
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
        Source of all randomness; ``numpy.random.default_rng()`` when None. One number is
        drawn from it here: the sampler's seed. Epoch ``e`` is then a pure function of that
        seed, ``e`` and the rank, so a sampler can be resumed (:meth:`state_dict`) and ranks
        agree on one order.
    mask
        Restrict every epoch to these rows: a boolean array over all rows, or a slice. Chunks
        never cross a gap of the mask.
    random_offset
        With ``shuffle``, move the chunk boundaries by a random offset in
        ``[0, chunk_size)`` each epoch, so rows that share a chunk in one epoch are not always
        read together. The first chunk of every masked run is then shorter. Free for CSR
        stores; on dense stores whose on-disk chunks hold ``chunk_size`` rows, each shifted
        chunk touches two on-disk chunks (measured 0.69x), hence off by default.
    rank, world_size
        Split every epoch among ``world_size`` processes (``torch.distributed`` ranks); this
        sampler yields rank ``rank``'s part. Default: read from ``torch.distributed`` when a
        process group is initialized, else 0 and 1. Every rank gets the same number of rows,
        hence of batches: without ``drop_last`` the epoch is padded by repeating its first
        ``world_size - 1`` rows at most; with it, up to ``world_size - 1`` rows are left out
        (different ones each epoch). Give every rank the same ``rng`` seed, and call
        :meth:`set_epoch` before each epoch when DataLoader workers read for the ranks.

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
        mask: slice | np.ndarray | None = None,
        random_offset: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        (self._chunk_size, self._preload_nchunks, self._batch_size, self._window_rows) = (
            parse_window(chunk_size, preload_nchunks, batch_size)
        )
        self._shuffle = parse_bool(shuffle, "shuffle")
        self._drop_last = parse_bool(drop_last, "drop_last")
        self._random_offset = parse_bool(random_offset, "random_offset")
        self._mask = parse_mask(mask)
        super().__init__(rng, rank, world_size)

    def __repr__(self) -> str:
        extra = ""
        if self._mask is not None:
            extra += ", mask=..."
        if self._random_offset:
            extra += ", random_offset=True"
        if self._world_size is not None:
            extra += f", rank={self._rank}, world_size={self._world_size}"
        return (
            f"ChunkSampler(chunk_size={self._chunk_size}, preload_nchunks={self._preload_nchunks}, "
            f"batch_size={self._batch_size}, shuffle={self._shuffle}, drop_last={self._drop_last}{extra})"
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

    # ------------------------------------------------------------------------------- drawing
    def validate(self, n_obs: int) -> None:
        """Check the mask against ``n_obs`` and the ranks' seed."""
        check_mask(self._mask, n_obs)
        self._check_ranks_seeded(needed=self._shuffle)

    def n_batches(self, n_obs: int) -> int:
        """Number of batches per epoch (of this rank) over ``n_obs`` rows."""
        rows = self._rank_rows(self._epoch_rows(self._n_allowed(n_obs)))
        return self._batches_of(rows, self._batch_size, drop_last=self._drop_last)

    def _n_allowed(self, n_obs: int) -> int:
        runs = self._runs(n_obs)
        return int(np.sum(runs[:, 1] - runs[:, 0])) if runs.size else 0

    def _epoch_rows(self, n_allowed: int) -> int:
        """Rows one epoch yields (all ranks together) when ``n_allowed`` rows may be drawn."""
        return n_allowed

    def _draw(self, chunks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The epoch's chunk sequence from the chunks covering the allowed rows (in reading
        order): all of them, each once. Subclasses may draw otherwise."""
        return chunks

    def _rank_rows(self, n_allowed: int) -> int:
        return self._share(n_allowed, drop=self._drop_last)

    def _runs(self, n_obs: int) -> np.ndarray:
        """The allowed rows as ``(start, stop)`` runs."""
        if self._mask is None:
            return np.array([[0, n_obs]] if n_obs else [], dtype=np.int64).reshape(-1, 2)
        if isinstance(self._mask, slice):
            start, stop, _ = self._mask.indices(n_obs)
            return np.array([[start, stop]] if stop > start else [], dtype=np.int64).reshape(-1, 2)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], self._mask.view(np.int8), [0]])))
        return edges.reshape(-1, 2).astype(np.int64)

    def _chunks(self, runs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Chunk ``(start, stop)`` pairs covering the runs, in reading order."""
        offset = int(rng.integers(self._chunk_size)) if self._shuffle and self._random_offset else 0
        pieces = []
        for a, b in runs.tolist():
            cuts = np.arange(a + offset if offset else a, b, self._chunk_size)
            if offset and a < b:
                cuts = np.concatenate([[a], cuts[cuts > a]])
            pieces.append(np.stack([cuts, np.append(cuts[1:], b)], axis=1))
        chunks = np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)
        if self._shuffle:
            # take(axis=0): ~10x faster than indexing an (n, 2) array with a permutation
            # (400k chunks of an atlas' epoch: 0.7 against 9-13 ms)
            chunks = np.take(chunks, rng.permutation(len(chunks)), axis=0)
        return chunks

    def _sample(self, n_obs: int) -> Iterator[ChunkRequest]:
        # Shared by all ranks: chunk order and offset. Per rank: row order within windows.
        shared, own = self._next_epoch()
        rank = self.ranks()[0]
        chunks = self._draw(self._chunks(self._runs(n_obs), shared), shared)
        lengths = chunks[:, 1] - chunks[:, 0]
        n_allowed = int(lengths.sum())
        n_rows = self._rank_rows(n_allowed)
        ranges = take_rows(chunks, rank * n_rows, n_rows) if n_allowed else chunks
        n_keep = n_rows - n_rows % self._batch_size if self._drop_last else n_rows
        emitted = 0
        for window in self._windows(ranges):
            n_window = sum(c.stop - c.start for c in window)
            n_use = min(n_window, n_keep - emitted)
            if n_use <= 0:
                return
            order = own.permutation(n_window) if self._shuffle else np.arange(n_window)
            # Rows past n_use are read but not yielded: they form the dropped short batch.
            order = order[:n_use]
            splits = split_batches(order, self._batch_size)
            emitted += n_use
            yield ChunkRequest(chunks=window, splits=splits)

    def _windows(self, ranges: np.ndarray) -> Iterator[list[slice]]:
        """Cut the ranges into windows of ``self._window_rows`` rows (the last shorter)."""
        window: list[slice] = []
        room = self._window_rows
        # A block of ranges at a time: an atlas' epoch has hundreds of thousands of chunks,
        # which as one list took 0.25 s before the first window (100M cells, chunk 256).
        for block in range(0, len(ranges), _RANGES_BLOCK):
            for start, stop in ranges[block : block + _RANGES_BLOCK].tolist():
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


_RANGES_BLOCK = 4096
"""Ranges turned into Python integers at a time by :meth:`ChunkSampler._windows`."""


def parse_window(
    chunk_size: object, preload_nchunks: object, batch_size: object
) -> tuple[int, int, int, int]:
    """``(chunk_size, preload_nchunks, batch_size, window rows)`` checked: a window holds
    ``chunk_size * preload_nchunks`` rows rounded down to whole batches, so that every window
    but an epoch's last holds whole batches (the chunk at a window's edge is then split
    between two windows)."""
    chunk = parse_positive_int(chunk_size, "chunk_size")
    preload = parse_positive_int(preload_nchunks, "preload_nchunks")
    batch = parse_positive_int(batch_size, "batch_size")
    window = chunk * preload
    if batch > window:
        msg = (
            f"batch_size ({batch}) is larger than one preload window, chunk_size * "
            f"preload_nchunks ({chunk} * {preload} = {window}); "
            "raise preload_nchunks or lower batch_size"
        )
        raise InvalidArgumentError(msg)
    return chunk, preload, batch, window - window % batch


def take_rows(chunks: np.ndarray, first: int, count: int) -> np.ndarray:
    """Ranges (``(start, stop)`` pairs) holding rows ``first .. first + count`` of the chunk
    sequence ``chunks``, wrapping around to its start when the sequence is shorter (the
    padding of the last ranks). ``take_rows(chunks, 0, n)``: the chunks of its first ``n``
    rows, the last one cut short."""
    lengths = chunks[:, 1] - chunks[:, 0]
    total = int(lengths.sum())
    if first == 0 and count == total:
        return chunks
    ends = np.cumsum(lengths)
    parts = []
    while count > 0:
        first %= total
        take = min(count, total - first)
        i0 = int(np.searchsorted(ends, first, side="right"))
        i1 = int(np.searchsorted(ends, first + take - 1, side="right"))
        part = chunks[i0 : i1 + 1].copy()
        part[0, 0] += first - (int(ends[i0]) - int(lengths[i0]))
        part[-1, 1] -= int(ends[i1]) - (first + take)
        parts.append(part)
        first, count = first + take, count - take
    return np.concatenate(parts) if parts else chunks[:0]
