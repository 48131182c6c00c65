"""mixing_score: 0 for batches of one label, about 1 for random batches, in between otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from annbatch.errors import InvalidArgumentError
from annbatch.quality import mixing_score


def test_sorted_batches_score_zero_random_batches_score_one():
    labels = np.repeat(np.arange(10), 100)  # sorted by label, as a donor-sorted atlas
    assert mixing_score(np.split(labels, 10)) == 0.0
    shuffled = np.random.default_rng(1).permutation(labels)
    assert mixing_score(np.split(shuffled, 10)) == pytest.approx(1.0, abs=0.05)


def test_partly_mixed_batches_lie_between():
    labels = np.repeat(np.arange(10), 100)
    # each batch: two labels only (chunks of 50 rows from two donors)
    halves = labels.reshape(20, 50)
    batches = [np.concatenate([halves[i], halves[(i + 10) % 20]]) for i in range(10)]
    score = mixing_score(batches)
    assert 0.2 < score < 0.5  # log(2) / log(10) = 0.30


def test_one_label_everywhere_and_bad_input():
    assert mixing_score([["x", "x"], ["x"]]) == 1.0
    with pytest.raises(InvalidArgumentError, match="no rows"):
        mixing_score([])
    with pytest.raises(InvalidArgumentError, match="missing values"):
        mixing_score([np.array(["a", None], dtype=object)])
    with pytest.raises(InvalidArgumentError, match="n_random"):
        mixing_score([[1, 2]], n_random=0)


@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=20), min_size=1, max_size=10))
def test_score_is_non_negative_and_finite(batches):
    score = mixing_score(batches)
    assert np.isfinite(score)
    assert score >= 0
