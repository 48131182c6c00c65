"""WeightedSampler: rows drawn one by one with given weights, e.g. balanced over cell types."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._args import parse_bool, parse_mask, parse_positive_int
from annbatch.abc._sampler import ChunkRequest, as_runs, split_batches
from annbatch.errors import InvalidArgumentError
from annbatch.samplers._epochs import EpochSampler

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import pandas as pd


class WeightedSampler(EpochSampler):
    """Draw ``num_samples`` rows per epoch, row ``i`` with probability proportional to
    ``weights[i]``; :meth:`balanced` builds the weights from a label column (an obs column).

    Rows are drawn one by one, not in chunks: each window of ``window_size`` drawn rows is
    read in disk order (rows that share an on-disk chunk are decoded once per window), then
    yielded in the drawn order, ``batch_size`` at a time.

    Parameters
    ----------
    weights
        One non-negative weight per row of the Loader (all datasets, in the order added).
        Rows of weight 0 are never drawn.
    num_samples
        Rows per epoch. Default: the number of rows with a positive weight.
    replacement
        Draw with replacement (a row may come several times per epoch). Without it, every row
        comes at most once per epoch, and ``num_samples`` can be at most the number of rows
        with a positive weight; the weights then set the order in which rows tend to be drawn
        rather than exact frequencies.
    batch_size
        Rows per batch.
    window_size
        Drawn rows read into memory together. Larger windows share more on-disk chunks
        between drawn rows, so each decoded chunk serves more of them.
    drop_last
        Drop the epoch's last batch if it is short.
    rng
        Source of randomness; one seed is drawn from it here (see :class:`ChunkSampler`).
    rank, world_size
        Split each epoch's draw among ranks, as :class:`ChunkSampler` does: every rank yields
        the same number of batches.
    mask
        Draw only these rows (a boolean array over all rows, or a slice): other weights count
        as 0.

    Notes
    -----
    Reading cost: drawn rows are scattered over the store, so a window costs about as much
    as ``ChunkSampler(chunk_size=1)`` with the same window: every drawn row needs its
    on-disk chunk decoded. Stores with small on-disk chunks (see :class:`DatasetCollection`)
    and large windows keep that cost down.
    """

    def __init__(
        self,
        weights: np.ndarray | pd.Series | list[float],
        *,
        num_samples: int | None = None,
        replacement: bool = True,
        batch_size: int = 1,
        window_size: int = 16_384,
        drop_last: bool = False,
        rng: np.random.Generator | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        mask: slice | np.ndarray | None = None,
    ) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0):
            msg = "weights must be a 1-D array of finite, non-negative numbers (one per row)"
            raise InvalidArgumentError(msg)
        self._weights = w
        self._mask = parse_mask(mask)
        self._p, positive = self._probabilities(self._mask)
        self._replacement = parse_bool(replacement, "replacement")
        self._num_samples = (
            positive if num_samples is None else parse_positive_int(num_samples, "num_samples")
        )
        if not self._replacement and self._num_samples > positive:
            msg = (
                f"num_samples ({self._num_samples}) is more than the {positive} rows with a "
                "positive weight; without replacement each row is drawn at most once"
            )
            raise InvalidArgumentError(msg)
        self._batch_size = parse_positive_int(batch_size, "batch_size")
        window = parse_positive_int(window_size, "window_size")
        if self._batch_size > window:
            msg = f"batch_size ({self._batch_size}) is larger than window_size ({window})"
            raise InvalidArgumentError(msg)
        self._window = window - window % self._batch_size
        self._drop_last = parse_bool(drop_last, "drop_last")
        super().__init__(rng, rank, world_size)

    def _probabilities(self, mask: slice | np.ndarray | None) -> tuple[np.ndarray, int]:
        """Draw probabilities of the rows (weights outside ``mask`` count as 0), and the number
        of rows that can be drawn."""
        w = self._weights
        if isinstance(mask, np.ndarray):
            if mask.size != w.size:
                msg = f"mask has {mask.size} entries; weights have {w.size}"
                raise InvalidArgumentError(msg)
            w = np.where(mask, w, 0.0)
        elif isinstance(mask, slice):
            keep = np.zeros(w.size, dtype=bool)
            keep[mask] = True
            w = np.where(keep, w, 0.0)
        positive = int(np.count_nonzero(w))
        if positive == 0:
            msg = "weights are all zero: no row could be drawn"
            raise InvalidArgumentError(msg)
        return w / w.sum(), positive

    @property
    def mask(self) -> slice | np.ndarray | None:
        """Rows that may be drawn (a slice or a boolean array), None for all. Settable;
        ``num_samples`` is kept as it is."""
        return self._mask

    @mask.setter
    def mask(self, value: slice | np.ndarray | None) -> None:
        self._refuse_while_sampling("mask")
        mask = parse_mask(value)
        p, positive = self._probabilities(mask)
        if not self._replacement and self._num_samples > positive:
            msg = f"num_samples ({self._num_samples}) is more than the {positive} rows this mask allows"
            raise InvalidArgumentError(msg)
        self._p, self._mask = p, mask

    @classmethod
    def balanced(
        cls,
        labels: pd.Series | np.ndarray | list[Any],
        *,
        class_weights: Mapping[Any, float] | None = None,
        **kwargs: Any,
    ) -> WeightedSampler:
        """Weights that give every class the same share of draws (or ``class_weights``).

        Parameters
        ----------
        labels
            One label per row of the Loader, e.g. ``pd.concat([a.obs for a in adatas])
            ["cell_type"]``. Missing labels (NA) are never drawn.
        class_weights
            Share of draws per class (normalised); classes left out are never drawn.
            Default: equal shares.
        **kwargs
            The other arguments of :class:`WeightedSampler`.
        """
        import pandas as pd

        codes, classes = pd.factorize(pd.Series(labels), use_na_sentinel=True)
        counts = np.bincount(codes[codes >= 0], minlength=len(classes)).astype(np.float64)
        if class_weights is None:
            share = np.ones(len(classes))
        else:
            unknown = set(class_weights) - set(classes)
            if unknown:
                msg = f"class_weights names classes that no row has: {sorted(map(str, unknown))}"
                raise InvalidArgumentError(msg)
            share = np.array([float(class_weights.get(c, 0.0)) for c in classes])
        per_row = np.divide(share, counts, out=np.zeros_like(share), where=counts > 0)
        weights = np.where(codes >= 0, per_row[np.maximum(codes, 0)], 0.0)
        return cls(weights, **kwargs)

    def __repr__(self) -> str:
        return (
            f"WeightedSampler(num_samples={self._num_samples}, replacement={self._replacement}, "
            f"batch_size={self._batch_size}, window_size={self._window})"
        )

    @property
    def batch_size(self) -> int:
        """Rows per batch."""
        return self._batch_size

    @property
    def shuffle(self) -> bool:
        """Always True: rows come in drawn order."""
        return True

    @property
    def num_samples(self) -> int:
        """Rows drawn per epoch (all ranks together)."""
        return self._num_samples

    def _rank_rows(self) -> int:
        return self._share(self._num_samples, drop=self._drop_last)

    def n_batches(self, n_obs: int) -> int:
        """Batches per epoch (of this rank)."""
        rows = self._rank_rows()
        return self._batches_of(rows, self._batch_size, drop_last=self._drop_last)

    def validate(self, n_obs: int) -> None:
        """The weights must cover the Loader's rows; ranks need one seed."""
        if self._p.size != n_obs:
            msg = f"WeightedSampler has {self._p.size} weights; the Loader has {n_obs} rows"
            raise InvalidArgumentError(msg)
        self._check_ranks_seeded(needed=True)

    # ----------------------------------------------------------------------------- drawing
    def _sample(self, n_obs: int) -> Iterator[ChunkRequest]:
        rng, _ = self._next_epoch()  # the draw is shared by all ranks; each takes its part
        rank = self.ranks()[0]
        drawn = rng.choice(n_obs, size=self._num_samples, replace=self._replacement, p=self._p)
        if not self._replacement:
            drawn = drawn[rng.permutation(drawn.size)]  # choice's order favours heavy rows
        n_rows = self._rank_rows()
        mine = drawn[(rank * n_rows + np.arange(n_rows)) % drawn.size]
        if self._drop_last:
            mine = mine[: n_rows - n_rows % self._batch_size]
        for lo in range(0, mine.size, self._window):
            rows = mine[lo : lo + self._window]
            chunks, positions = as_runs(rows)  # read in disk order, each row once
            yield ChunkRequest(chunks=chunks, splits=split_batches(positions, self._batch_size))
