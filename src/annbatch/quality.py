"""How well a loader mixes rows: a label's entropy within batches, against random batches.

Chunked reading is fast because neighbouring rows are read together, but neighbours on disk
often share a donor, a sample or a cell type. :func:`mixing_score` measures what that costs:
the mean entropy of a label within each batch, divided by the same for batches of the same
sizes drawn uniformly at random from the same rows. 1 means as mixed as fully random batches;
0 means every batch holds a single label value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from annbatch._args import parse_int
from annbatch.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from numpy.typing import ArrayLike


def _mean_entropy(codes: np.ndarray, bounds: np.ndarray, n_labels: int) -> float:
    """Mean over batches of the Shannon entropy (nats) of the label codes in each batch."""
    batch = np.repeat(np.arange(bounds.size - 1), np.diff(bounds))
    counts = np.zeros((bounds.size - 1, n_labels))
    np.add.at(counts, (batch, codes), 1)
    p = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())


def mixing_score(
    batch_labels: Iterable[ArrayLike], *, n_random: int = 5, rng: np.random.Generator | None = None
) -> float:
    """Score how well ``batch_labels`` mixes a label, relative to uniformly random batches.

    Parameters
    ----------
    batch_labels
        For each batch, in order, the label (for example donor or cell type) of each row:
        e.g. ``[batch["obs"]["donor"] for batch in loader]``.
    n_random
        Random shuffles of the same rows that the reference entropy is averaged over.
    rng
        Generator for those shuffles; a fixed seed when None, so scores are reproducible.

    Returns
    -------
    Mean within-batch label entropy divided by that of random batches of the same sizes:
    about 1 for well-mixed batches, 0 when each batch holds one label value. 1.0 when every
    row has the same label (nothing to mix).

    Examples
    --------
    >>> mixing_score([["a", "a"], ["b", "b"]])
    0.0
    """
    labels = [np.asarray(b).ravel() for b in batch_labels]
    if not labels or sum(b.size for b in labels) == 0:
        msg = "batch_labels holds no rows; pass one array of labels per batch"
        raise InvalidArgumentError(msg)
    parse_int(n_random, "n_random", minimum=1, numpy=False)
    codes, uniques = pd.factorize(np.concatenate(labels))
    if (codes < 0).any():
        msg = "batch_labels contains missing values (NaN/None); fill or drop them first"
        raise InvalidArgumentError(msg)
    if uniques.size < 2:
        return 1.0
    bounds = np.concatenate([[0], np.cumsum([b.size for b in labels])])
    observed = _mean_entropy(codes, bounds, uniques.size)
    gen = np.random.default_rng(0) if rng is None else rng
    shuffled = [
        _mean_entropy(gen.permutation(codes), bounds, uniques.size) for _ in range(n_random)
    ]
    random = float(np.mean(shuffled))
    return observed / random if random > 0 else 1.0
