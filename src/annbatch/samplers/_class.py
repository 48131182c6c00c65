"""ClassSampler and WeightedClassSampler: chunks drawn class by class, for data grouped by a
label on disk (a collection built with ``groupby``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from annbatch._args import parse_bool, parse_mask, parse_positive_int
from annbatch.abc._sampler import ChunkRequest, check_mask, split_batches
from annbatch.errors import ArgumentTypeError, InvalidArgumentError
from annbatch.samplers._chunk import parse_window, take_rows
from annbatch.samplers._epochs import EpochSampler

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence


class ClassSampler(EpochSampler):
    """Batches of one class each: per window, a class is drawn (with probability proportional
    to its weight), then ``preload_nchunks`` chunks of that class.

    Sampling is with replacement: ``num_samples`` rows per epoch, a chunk may come several
    times or not at all. Rows of one class must lie in runs of at least ``chunk_size``
    consecutive rows (data grouped by class on disk), so that a chunk holds one class.

    Parameters
    ----------
    chunk_size, preload_nchunks, batch_size
        As for :class:`ChunkSampler`: contiguous rows per chunk, chunks per window, rows per
        batch.
    classes
        A ``pandas.Categorical`` with one class per row of the Loader (all datasets, in the
        order added), without missing values; e.g. ``pd.Categorical(collection.obs(["cell_type"])
        ["cell_type"])``.
    num_samples
        Rows per epoch: all ranks together when the sampler splits an epoch among
        torch.distributed ranks itself; per rank inside a :class:`DistributedSampler`.
    class_weights
        Relative frequency of each class: a mapping from class to weight (classes left out
        weigh 0) or a sequence in the order of ``classes.categories``. Default: every class
        equally often. A class of weight 0 is never drawn.
    mask
        Draw only from these rows (a slice, or a boolean array over all rows).
    drop_last
        Drop the epoch's last batch if it is short.
    rng
        Source of randomness; one seed is drawn from it (see :class:`ChunkSampler`).

    Notes
    -----
    Chunks follow the grid of ``chunk_size`` rows from row 0 (as :class:`ChunkSampler`'s), so
    a run's first and last chunks may be shorter than ``chunk_size``; a window is then filled with further chunks and cut to
    ``chunk_size * preload_nchunks`` rows (rounded down to a multiple of ``batch_size``).
    Under ``torch.distributed`` (without a :class:`DistributedSampler`) every rank draws its
    own ``num_samples / world_size`` rows. The reference library refuses this sampler under
    several DataLoader workers; here the workers share the windows round-robin.
    """

    _mix = False
    """Draw a class per chunk and shuffle whole windows (WeightedClassSampler) instead of one
    class per window."""

    def __init__(
        self,
        chunk_size: int,
        preload_nchunks: int,
        batch_size: int,
        *,
        classes: pd.Categorical,
        num_samples: int,
        class_weights: Mapping[Any, float] | Sequence[float] | np.ndarray | None = None,
        mask: slice | np.ndarray | None = None,
        drop_last: bool = False,
        rng: np.random.Generator | None = None,
    ) -> None:
        (self._chunk_size, self._preload_nchunks, self._batch_size, self._window_rows) = (
            parse_window(chunk_size, preload_nchunks, batch_size)
        )
        if not isinstance(classes, pd.Categorical):
            msg = (
                f"classes must be a pandas.Categorical (one class per row), got {type(classes).__name__}; "
                "wrap it with pd.Categorical(...)"
            )
            raise ArgumentTypeError(msg)
        if classes.isna().any():
            msg = f"classes has {int(classes.isna().sum())} missing values; every row needs a class"
            raise InvalidArgumentError(msg)
        self._classes = classes
        self._codes = np.asarray(classes.codes, dtype=np.int64)
        self._weights = _class_weights(class_weights, classes.categories)
        self._num_samples = parse_positive_int(num_samples, "num_samples")
        self._drop_last = parse_bool(drop_last, "drop_last")
        self._mask = parse_mask(mask)
        self._check_runs()
        self._table: tuple[Any, np.ndarray, np.ndarray, np.ndarray] | None = None
        super().__init__(rng, None, None)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(chunk_size={self._chunk_size}, preload_nchunks={self._preload_nchunks}, "
            f"batch_size={self._batch_size}, num_samples={self._num_samples}, "
            f"{len(self._classes.categories)} classes, drop_last={self._drop_last})"
        )

    def _check_runs(self) -> None:
        """Every run of a drawable class must hold at least ``chunk_size`` rows."""
        codes = self._codes
        if codes.size == 0:
            return
        starts = np.concatenate([[0], np.flatnonzero(np.diff(codes)) + 1])
        lengths = np.diff(np.append(starts, codes.size))
        short = codes[starts[(lengths < self._chunk_size) & (self._weights[codes[starts]] > 0)]]
        if short.size:
            names = [str(self._classes.categories[c]) for c in np.unique(short)[:10]]
            msg = (
                f"rows of the classes {names} come in runs shorter than chunk_size "
                f"({self._chunk_size}); a chunk must hold one class, so group the rows by class on "
                "disk (DatasetCollection.add_adatas(..., groupby=...)) or lower chunk_size"
            )
            raise InvalidArgumentError(msg)

    # ---------------------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        """Rows per batch."""
        return self._batch_size

    @property
    def shuffle(self) -> bool:
        """Always True: chunks are drawn at random."""
        return True

    @property
    def num_samples(self) -> int:
        """Rows per epoch (see the ``num_samples`` argument)."""
        return self._num_samples

    @property
    def class_weights(self) -> pd.Series:
        """Normalised draw probability of each class."""
        return pd.Series(self._weights / self._weights.sum(), index=self._classes.categories)

    @property
    def mask(self) -> slice | np.ndarray | None:
        """Rows that may be drawn (None: all). Settable."""
        return self._mask

    @mask.setter
    def mask(self, value: slice | np.ndarray | None) -> None:
        self._refuse_while_sampling("mask")
        self._mask = parse_mask(value)
        self._table = None

    def n_batches(self, n_obs: int) -> int:
        """Batches per epoch (of this rank)."""
        rows = self._share(self._num_samples, drop=self._drop_last)
        return self._batches_of(rows, self._batch_size, drop_last=self._drop_last)

    def validate(self, n_obs: int) -> None:
        """``classes`` must cover the Loader's rows, and the mask must leave a class to draw."""
        if self._codes.size != n_obs:
            msg = f"classes has {self._codes.size} entries; the Loader has {n_obs} rows"
            raise InvalidArgumentError(msg)
        check_mask(self._mask, n_obs)
        self._chunk_table()

    # ------------------------------------------------------------------------------- drawing
    def _chunk_table(self) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
        """Chunks ``(start, stop)`` grouped by class, where each class's chunks begin and how
        many it has, and each class's draw probability (0 for classes with no chunk)."""
        if self._table is not None:
            return self._table
        n = self._codes.size
        allowed = np.ones(n, dtype=bool)
        if self._mask is not None:
            allowed = np.zeros(n, dtype=bool)
            allowed[self._mask] = True
        # Runs of one class among allowed rows: a class change or a gap of the mask ends one.
        codes = np.where(allowed, self._codes, -1)
        edges = (
            np.flatnonzero(np.diff(np.concatenate([[-2], codes, [-2]])))
            if n
            else np.zeros(1, np.int64)
        )
        starts, stops = edges[:-1], edges[1:]
        keep = codes[starts] >= 0 if n else np.zeros(0, dtype=bool)
        starts, stops = starts[keep], stops[keep]
        # Cut on the global grid of chunk_size rows (a run's first and last chunks may be
        # shorter), so that chunks line up with on-disk chunks of chunk_size rows, as
        # ChunkSampler's do: an unaligned chunk touches two on-disk chunks.
        c = self._chunk_size
        pieces = []
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            cuts = np.concatenate([[a], np.arange(-(-a // c) * c, b, c)])
            cuts = np.unique(cuts[cuts < b])
            pieces.append(np.stack([cuts, np.append(cuts[1:], b)], axis=1))
        chunks = np.concatenate(pieces) if pieces else np.empty((0, 2), dtype=np.int64)
        chunk_class = self._codes[chunks[:, 0]] if len(chunks) else np.empty(0, dtype=np.int64)
        order = np.argsort(chunk_class, kind="stable")
        chunks = chunks[order]
        k = len(self._classes.categories)
        count = np.bincount(chunk_class, minlength=k)
        first = np.concatenate([[0], np.cumsum(count)[:-1]])
        weights = np.where(count > 0, self._weights, 0.0)
        if weights.sum() <= 0:
            msg = "no class with a positive weight has rows within the mask: nothing to draw"
            raise InvalidArgumentError(msg)
        self._table = (chunks, first, count, weights / weights.sum())
        return self._table

    def _sample(self, n_obs: int) -> Iterator[ChunkRequest]:
        _, own = self._next_epoch()  # draws with replacement: each rank draws its own
        chunks, first, count, p = self._chunk_table()
        lengths = chunks[:, 1] - chunks[:, 0]
        n_rows = self._share(self._num_samples, drop=self._drop_last)
        n_keep = n_rows - n_rows % self._batch_size if self._drop_last else n_rows
        emitted = 0
        while emitted < n_keep:
            n_window = min(self._window_rows, n_keep - emitted)
            picked = self._pick(own, n_window, lengths, first, count, p)
            window = take_rows(chunks[picked], 0, n_window)
            splits = split_batches(own.permutation(n_window), self._batch_size)
            emitted += n_window
            yield ChunkRequest(
                chunks=list(map(slice, window[:, 0].tolist(), window[:, 1].tolist())), splits=splits
            )

    def _pick(
        self,
        rng: np.random.Generator,
        n_window: int,
        lengths: np.ndarray,
        first: np.ndarray,
        count: np.ndarray,
        p: np.ndarray,
    ) -> np.ndarray:
        """Chunk numbers (into the chunk table) holding at least ``n_window`` rows."""
        picked: list[np.ndarray] = []
        total = 0
        cls = None if self._mix else rng.choice(p.size, p=p)
        while total < n_window:
            k = self._preload_nchunks + 1
            drawn = rng.choice(p.size, size=k, p=p) if cls is None else np.full(k, cls)
            idx = first[drawn] + (rng.random(k) * count[drawn]).astype(np.int64)
            picked.append(idx)
            total += int(lengths[idx].sum())
        return np.concatenate(picked)


class WeightedClassSampler(ClassSampler):
    """Batches that mix classes in proportion to their weights: a class is drawn for every
    chunk (as :class:`ClassSampler` draws one per window), and the rows of a whole window are
    shuffled together before they are cut into batches.

    Takes the arguments of :class:`ClassSampler`. Classes appear in each batch in proportion
    to ``class_weights`` in expectation, while every read stays a contiguous chunk.
    """

    _mix = True


def _class_weights(weights: object, categories: pd.Index) -> np.ndarray:
    """One non-negative weight per category, at least one positive."""
    k = len(categories)
    if weights is None:
        w = np.ones(k)
    elif isinstance(weights, Mapping):
        unknown = [c for c in weights if c not in categories]
        if unknown:
            msg = f"class_weights names classes that classes does not have: {[str(c) for c in unknown[:10]]}"
            raise InvalidArgumentError(msg)
        w = np.array([float(weights.get(c, 0.0)) for c in categories])
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (k,):
            msg = f"class_weights has shape {w.shape}; expected one weight per category ({k}), or a mapping"
            raise InvalidArgumentError(msg)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        msg = "class_weights must be finite and non-negative"
        raise InvalidArgumentError(msg)
    if not np.any(w > 0):
        msg = "class_weights has no positive weight: no class could be drawn"
        raise InvalidArgumentError(msg)
    return w
