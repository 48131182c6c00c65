"""Every epoch yields every row exactly once, with the stored values and aligned obs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annbatch import Loader

from conftest import FORMATS, KINDS, check_epoch

SIZES = [(37,), (20, 0, 45), (1, 64, 13)]


def _loader(stores, **kwargs) -> Loader:
    return Loader(return_index=True, to=None, **kwargs).add_anndatas([s.adata() for s in stores])


def assert_epoch(loader: Loader, stores, *, drop_last: bool, batch_size: int) -> np.ndarray:
    batches = list(loader)
    order = check_epoch(batches, stores)
    n_obs = sum(s.n_obs for s in stores)
    sizes = [b["index"].size for b in batches]
    assert len(batches) == len(loader)
    if drop_last:
        assert len(order) == (n_obs // batch_size) * batch_size
        assert all(n == batch_size for n in sizes)
    else:
        assert len(order) == n_obs
        assert len(batches) == math.ceil(n_obs / batch_size)
        assert all(n == batch_size for n in sizes[:-1])
    assert len(np.unique(order)) == len(order), "a row was yielded twice"
    return order


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize(
    ("chunk_size", "preload_nchunks", "batch_size"),
    [(1, 8, 4), (5, 3, 5), (16, 2, 8), (64, 4, 256), (7, 3, 4), (10, 1, 3)],
)
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_grid(pool, fmt, kind, sizes, chunk_size, preload_nchunks, batch_size, shuffle, drop_last):
    stores = pool.many(fmt, kind, sizes)
    loader = _loader(
        stores,
        chunk_size=chunk_size,
        preload_nchunks=preload_nchunks,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        rng=np.random.default_rng(1),
    )
    order = assert_epoch(loader, stores, drop_last=drop_last, batch_size=batch_size)
    if not shuffle:
        np.testing.assert_array_equal(order, np.arange(len(order)))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(FORMATS),
    kind=st.sampled_from(KINDS),
    sizes=st.lists(st.integers(0, 70), min_size=1, max_size=4),
    chunk_size=st.integers(1, 40),
    preload_nchunks=st.integers(1, 6),
    batch_frac=st.floats(0.01, 1.0),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    strategy=st.sampled_from([None, "concat-shuffle", "shuffle-concat"]),
    seed=st.integers(0, 2**32 - 1),
    read_ahead=st.integers(0, 3),
)
def test_any_combination(
    pool,
    fmt,
    kind,
    sizes,
    chunk_size,
    preload_nchunks,
    batch_frac,
    shuffle,
    drop_last,
    strategy,
    seed,
    read_ahead,
):
    batch_size = max(1, int(batch_frac * chunk_size * preload_nchunks))  # at most one window
    stores = pool.many(fmt, kind, sizes)
    loader = _loader(
        stores,
        chunk_size=chunk_size,
        preload_nchunks=preload_nchunks,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        concat_strategy=strategy,
        rng=np.random.default_rng(seed),
        read_ahead=read_ahead,
    )
    assert_epoch(loader, stores, drop_last=drop_last, batch_size=batch_size)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_seeded_rng_reproduces_and_epochs_differ(pool, fmt, kind):
    stores = pool.many(fmt, kind, [50, 30])
    kwargs = dict(chunk_size=4, preload_nchunks=5, batch_size=10, shuffle=True)

    def orders(seed: int) -> list[np.ndarray]:
        loader = _loader(stores, rng=np.random.default_rng(seed), **kwargs)
        return [np.concatenate([b["index"] for b in loader]) for _ in range(2)]

    first, second = orders(7), orders(7)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[1]), "the second epoch repeated the first"
    assert not np.array_equal(first[0], orders(8)[0])
    assert not np.array_equal(first[0], np.arange(80)), "shuffle=True gave the stored order"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shuffle", [False, True])
def test_concat_strategies_yield_the_same_rows(pool, fmt, kind, shuffle):
    stores = pool.many(fmt, kind, [23, 41, 9])
    kwargs = dict(chunk_size=3, preload_nchunks=4, batch_size=6, shuffle=shuffle)
    results = []
    for strategy in ("concat-shuffle", "shuffle-concat"):
        loader = _loader(stores, concat_strategy=strategy, rng=np.random.default_rng(3), **kwargs)
        results.append(list(loader))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
        assert type(a["X"]) is type(b["X"])
        assert (a["X"] != b["X"]).sum() == 0 if kind == "sparse" else np.array_equal(a["X"], b["X"])


def test_return_index_false_yields_none(pool):
    store = pool.get("zarr", "dense", 37)
    batch = next(iter(Loader(batch_size=4, to=None).add_anndata(store.adata())))
    assert batch["index"] is None
    assert set(batch) == {"X", "obs", "var", "index"}


def test_no_obs_yields_none(pool):
    store = pool.get("zarr", "sparse", 37)
    loader = Loader(batch_size=8, chunk_size=8, preload_nchunks=2, to=None, return_index=True)
    batches = list(loader.add_dataset(store.x))
    assert all(b["obs"] is None for b in batches)
    assert np.concatenate([b["index"] for b in batches]).tolist() == list(range(37))


def test_defaults(pool):
    store = pool.get("h5ad", "dense", 37)
    loader = Loader(to=None).add_anndata(store.adata())
    sampler = loader.batch_sampler
    assert (sampler.chunk_size, sampler.preload_nchunks, sampler.batch_size) == (512, 32, 1)
    assert (sampler.shuffle, sampler.drop_last) == (False, False)
    batches = list(loader)
    assert len(batches) == 37
    assert all(b["X"].shape == (1, 6) for b in batches)
