"""SequentialSampler and RandomSampler: the chunk samplers of the reference library's current
API, as :class:`~annbatch.samplers.ChunkSampler` with its shuffle fixed, and (random) a number
of rows per epoch and drawing chunks with replacement."""

from __future__ import annotations

import math

import numpy as np

from annbatch._args import parse_bool, parse_positive_int
from annbatch.errors import InvalidArgumentError
from annbatch.samplers._chunk import ChunkSampler, take_rows


class SequentialSampler(ChunkSampler):
    """Every row once per epoch, in order: ``ChunkSampler(..., shuffle=False)``.

    Parameters
    ----------
    chunk_size, preload_nchunks, batch_size, drop_last, mask
        As for :class:`ChunkSampler`.

    Notes
    -----
    The reference library refuses this sampler under several DataLoader workers; here the
    workers share the windows round-robin, which the DataLoader hands back in order, so the
    rows still come in order.
    """

    def __init__(
        self,
        chunk_size: int,
        preload_nchunks: int,
        batch_size: int,
        *,
        drop_last: bool = False,
        mask: slice | np.ndarray | None = None,
    ) -> None:
        super().__init__(
            chunk_size, preload_nchunks, batch_size, shuffle=False, drop_last=drop_last, mask=mask
        )

    def __repr__(self) -> str:
        return (
            f"SequentialSampler(chunk_size={self.chunk_size}, preload_nchunks={self.preload_nchunks}, "
            f"batch_size={self.batch_size}, drop_last={self.drop_last})"
        )


class RandomSampler(ChunkSampler):
    """Chunks of rows in a random order: ``ChunkSampler(..., shuffle=True)``, plus a number of
    rows per epoch and drawing with replacement.

    Parameters
    ----------
    chunk_size, preload_nchunks, batch_size, drop_last, mask, rng
        As for :class:`ChunkSampler`.
    replacement
        Draw each chunk independently (uniformly among the chunks of the allowed rows), so a
        chunk may come several times per epoch, or not at all.
    num_samples
        Rows per epoch. Default: the number of allowed rows. Without replacement at most that
        number: the epoch is then the first ``num_samples`` rows of the shuffled chunks.
    """

    def __init__(
        self,
        chunk_size: int,
        preload_nchunks: int,
        batch_size: int,
        *,
        replacement: bool = False,
        num_samples: int | None = None,
        drop_last: bool = False,
        mask: slice | np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__(
            chunk_size,
            preload_nchunks,
            batch_size,
            shuffle=True,
            drop_last=drop_last,
            mask=mask,
            rng=rng,
        )
        self._replacement = parse_bool(replacement, "replacement")
        self._num_samples = (
            None if num_samples is None else parse_positive_int(num_samples, "num_samples")
        )

    def __repr__(self) -> str:
        return (
            f"RandomSampler(chunk_size={self.chunk_size}, preload_nchunks={self.preload_nchunks}, "
            f"batch_size={self.batch_size}, replacement={self._replacement}, "
            f"num_samples={self._num_samples}, drop_last={self.drop_last})"
        )

    @property
    def replacement(self) -> bool:
        """Whether chunks are drawn with replacement."""
        return self._replacement

    @property
    def num_samples(self) -> int | None:
        """Rows per epoch; None: every allowed row."""
        return self._num_samples

    def validate(self, n_obs: int) -> None:
        """Also checks ``num_samples`` against the rows the mask allows."""
        super().validate(n_obs)
        allowed = self._n_allowed(n_obs)
        if self._num_samples is None:
            return
        if self._replacement and allowed == 0:
            msg = f"RandomSampler(replacement=True, num_samples={self._num_samples}) has no rows to draw from"
            raise InvalidArgumentError(msg)
        if not self._replacement and self._num_samples > allowed:
            msg = (
                f"num_samples ({self._num_samples}) is more than the {allowed} rows to draw from; "
                "without replacement each row comes at most once per epoch (pass replacement=True)"
            )
            raise InvalidArgumentError(msg)

    def _epoch_rows(self, n_allowed: int) -> int:
        if self._num_samples is None:
            return n_allowed
        return self._num_samples if self._replacement else min(self._num_samples, n_allowed)

    def _draw(self, chunks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not len(chunks) or (self._num_samples is None and not self._replacement):
            return chunks
        lengths = chunks[:, 1] - chunks[:, 0]
        target = int(lengths.sum()) if self._num_samples is None else self._num_samples
        if self._replacement:
            mean = float(lengths.mean())
            picks, total = [], 0
            while total < target:
                idx = rng.integers(len(chunks), size=math.ceil((target - total) / mean) + 1)
                picks.append(idx)
                total += int(lengths[idx].sum())
            chunks = chunks[np.concatenate(picks)]
        return take_rows(chunks, 0, target)
