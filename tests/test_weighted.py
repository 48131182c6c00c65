"""WeightedSampler: weighted and class-balanced draws, through the Loader on real stores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annbatch import Loader
from annbatch.errors import InvalidArgumentError
from annbatch.samplers import WeightedSampler

from conftest import check_epoch


def _draws(sampler: WeightedSampler, n_obs: int) -> list[np.ndarray]:
    out = []
    for request in sampler.sample(n_obs):
        rows = np.concatenate([np.arange(c.start, c.stop) for c in request["requests"]])
        assert len(np.unique(rows)) == rows.size  # each row read once per window
        assert np.all(np.diff(rows) > 0)  # in disk order
        out.extend(rows[s] for s in request["splits"])
    return out


@settings(max_examples=80, deadline=None)
@given(
    weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=1, max_size=80).filter(any),
    replacement=st.booleans(),
    batch_size=st.integers(1, 9),
    window_frac=st.integers(1, 4),
    drop_last=st.booleans(),
    world_size=st.integers(1, 3),
    data=st.data(),
)
def test_draws_respect_weights_counts_and_ranks(
    weights, replacement, batch_size, window_frac, drop_last, world_size, data
):
    weights = np.array(weights)
    positive = int(np.count_nonzero(weights))
    num_samples = data.draw(st.integers(1, positive if not replacement else 3 * len(weights)))
    per_rank = []
    for rank in range(world_size):
        sampler = WeightedSampler(
            weights,
            num_samples=num_samples,
            replacement=replacement,
            batch_size=batch_size,
            window_size=batch_size * window_frac,
            drop_last=drop_last,
            rng=np.random.default_rng(4),
            rank=rank,
            world_size=world_size,
        )
        batches = _draws(sampler, len(weights))
        assert len(batches) == sampler.n_batches(len(weights))
        if drop_last:
            assert all(len(b) == batch_size for b in batches)
        per_rank.append(np.concatenate(batches) if batches else np.empty(0, int))
    assert len({len(r) for r in per_rank}) == 1  # equal shares
    drawn = np.concatenate(per_rank)
    assert np.all(weights[drawn] > 0)  # never a row of weight 0
    if not replacement and not drop_last:
        # every drawn row once, up to the ranks' padding
        assert len(drawn) - len(np.unique(drawn)) < world_size
        assert len(np.unique(drawn)) == num_samples


def test_balanced_classes_through_the_loader(pool):
    # 90% of rows are class "a": balanced draws give each class about a third.
    store = pool.get("zarr", "sparse", 300)
    labels = pd.Series(np.where(np.arange(300) < 270, "a", np.where(np.arange(300) % 2, "b", "c")))
    sampler = WeightedSampler.balanced(
        labels, num_samples=6000, batch_size=50, window_size=1000, rng=np.random.default_rng(0)
    )
    loader = Loader(batch_sampler=sampler, return_index=True, to=None)
    loader.add_anndata(store.adata())
    batches = list(loader)
    order = check_epoch(batches, [store])  # yielded rows equal the stored rows, obs aligned
    shares = labels.iloc[order].value_counts(normalize=True)
    assert len(order) == 6000
    np.testing.assert_allclose(shares.sort_index().to_numpy(), [1 / 3] * 3, atol=0.03)


def test_class_weights_and_missing_labels():
    labels = pd.Series(["a", "b", None, "b", "c", "a"])
    sampler = WeightedSampler.balanced(
        labels,
        class_weights={"a": 3, "b": 1},
        num_samples=4000,
        batch_size=100,
        rng=np.random.default_rng(1),
    )
    drawn = np.concatenate(_draws(sampler, 6))
    assert set(drawn.tolist()) <= {0, 1, 3, 5}  # no NA label, no class "c"
    share_a = np.isin(drawn, [0, 5]).mean()
    assert abs(share_a - 0.75) < 0.03
    with pytest.raises(InvalidArgumentError, match="classes that no row has"):
        WeightedSampler.balanced(labels, class_weights={"z": 1})


def test_without_replacement_covers_every_row_once_per_epoch():
    sampler = WeightedSampler(
        np.ones(50), replacement=False, batch_size=7, window_size=21, rng=np.random.default_rng(2)
    )
    first = np.concatenate(_draws(sampler, 50))
    second = np.concatenate(_draws(sampler, 50))
    assert sorted(first.tolist()) == list(range(50)) == sorted(second.tolist())
    assert not np.array_equal(first, second)  # a new order each epoch


def test_mask_restricts_draws():
    sampler = WeightedSampler(
        np.ones(40), mask=slice(10, 20), num_samples=500, rng=np.random.default_rng(0)
    )
    assert set(np.concatenate(_draws(sampler, 40)).tolist()) <= set(range(10, 20))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ([[1.0, -1.0]], {}, "non-negative"),
        ([[0.0, 0.0]], {}, "all zero"),
        ([[1.0, 0.0, 1.0]], {"replacement": False, "num_samples": 3}, "more than the 2 rows"),
        ([[1.0]], {"batch_size": 8, "window_size": 4}, "larger than window_size"),
        ([[1.0, 1.0]], {"mask": np.ones(3, dtype=bool)}, "mask has 3 entries"),
    ],
)
def test_bad_weighted_arguments(args, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        WeightedSampler(*args, **kwargs)


def test_weights_must_match_the_loader(pool):
    store = pool.get("memory", "dense", 20)
    loader = Loader(batch_sampler=WeightedSampler(np.ones(19)), to=None).add_anndata(store.adata())
    with pytest.raises(InvalidArgumentError, match="19 weights; the Loader has 20 rows"):
        list(loader)


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(stop_after=st.integers(0, 8))
def test_weighted_epochs_resume(pool, stop_after):
    store = pool.get("zarr", "dense", 64)

    def loader(seed):
        sampler = WeightedSampler(
            np.arange(64) % 3,
            num_samples=90,
            batch_size=8,
            window_size=24,
            rng=np.random.default_rng(seed),
        )
        return Loader(batch_sampler=sampler, return_index=True, to=None).add_anndata(store.adata())

    first = loader(5)
    batches = iter(first)
    taken = [next(batches)["index"] for _ in range(stop_after)]
    state = first.state_dict()
    batches.close()
    resumed = loader(6)
    resumed.load_state_dict(state)
    order = np.concatenate(taken + [b["index"] for b in resumed])
    np.testing.assert_array_equal(order, np.concatenate([b["index"] for b in loader(5)]))
