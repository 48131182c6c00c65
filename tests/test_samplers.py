"""The sampler contract, ChunkSampler, and a user-defined sampler driving the Loader."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

from annbatch import ChunkSampler, Loader
from annbatch.abc import Sampler
from annbatch.errors import InvalidArgumentError

with pytest.warns(DeprecationWarning, match="annbatch.abc.LoadRequest is deprecated"):
    # The old object form of a load request: still accepted from _sample (tested below).
    from annbatch.abc import LoadRequest

from conftest import check_epoch

if TYPE_CHECKING:
    from collections.abc import Iterator


def _rows(request: dict) -> np.ndarray:
    return np.concatenate([np.arange(c.start, c.stop) for c in request["requests"]])


@pytest.mark.parametrize("n_obs", [0, 1, 99, 100, 101, 1000])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_chunk_sampler_covers_rows(n_obs, shuffle, drop_last):
    sampler = ChunkSampler(
        10, 3, 6, shuffle=shuffle, drop_last=drop_last, rng=np.random.default_rng(0)
    )
    requests = list(sampler.sample(n_obs))
    yielded = (
        np.concatenate([_rows(r)[s] for r in requests for s in r["splits"]]) if requests else []
    )
    n_batches = sum(len(r["splits"]) for r in requests)
    assert n_batches == sampler.n_batches(n_obs)
    if drop_last:
        assert len(yielded) == n_obs // 6 * 6
    else:
        assert sorted(yielded) == list(range(n_obs))
    assert len(set(yielded)) == len(yielded)
    for r in requests:
        assert len(r["requests"]) <= 4
        assert all(c.stop - c.start <= 10 for c in r["requests"])
        assert all(len(s) == 6 for s in r["splits"][:-1])
    if not shuffle:
        np.testing.assert_array_equal(yielded, np.arange(len(yielded)))


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_epoch_of_many_chunks_is_cut_like_a_short_one(shuffle):
    # Ranges are turned into windows a block at a time (_RANGES_BLOCK): windows straddling
    # blocks hold whole batches, and every row comes once.
    from annbatch.samplers._chunk import _RANGES_BLOCK

    n_obs = 3 * _RANGES_BLOCK + 5
    sampler = ChunkSampler(1, 7, 5, shuffle=shuffle, rng=np.random.default_rng(1))
    requests = list(sampler.sample(n_obs))
    assert [len(_rows(r)) for r in requests[:-1]] == [5] * (len(requests) - 1)
    yielded = np.concatenate([_rows(r)[s] for r in requests for s in r["splits"]])
    assert sorted(yielded.tolist()) == list(range(n_obs))


@pytest.mark.parametrize("shuffle", [False, True])
def test_windows_hold_whole_batches(shuffle):
    # 10 * 2 = 20 rows per window is not a multiple of 6: windows hold 18 rows, and the
    # chunk at a window's edge continues in the next window.
    sampler = ChunkSampler(10, 2, 6, shuffle=shuffle, rng=np.random.default_rng(0))
    requests = list(sampler.sample(95))
    assert [len(_rows(r)) for r in requests] == [18] * 5 + [5]
    assert all(len(s) == 6 for r in requests[:-1] for s in r["splits"])
    pieces = sorted((c.start, c.stop) for r in requests for c in r["requests"])
    # Each chunk of 10 rows is read once, in at most two contiguous pieces.
    assert sum(stop - start for start, stop in pieces) == 95
    for chunk_start in range(0, 95, 10):
        parts = [p for p in pieces if chunk_start <= p[0] < chunk_start + 10]
        assert 1 <= len(parts) <= 2


def test_chunk_sampler_shuffles_chunks_and_rows():
    sampler = ChunkSampler(10, 4, 40, shuffle=True, rng=np.random.default_rng(0))
    request = next(iter(sampler.sample(1000)))
    starts = [c.start for c in request["requests"]]
    assert starts != sorted(starts) or starts[0] != 0
    assert not np.array_equal(request["splits"][0], np.arange(40))


def test_reseed_changes_order_deterministically():
    def first_chunks(seed):
        s = ChunkSampler(1, 8, 8, shuffle=True, rng=np.random.default_rng(0))
        s.reseed(seed)
        return [c.start for c in next(iter(s.sample(1000)))["requests"]]

    assert first_chunks(1) == first_chunks(1)
    assert first_chunks(1) != first_chunks(2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        ({"preload_nchunks": -1}, "preload_nchunks must be a positive integer, got -1"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
        ({"chunk_size": True}, "chunk_size must be a positive integer, got True"),
        (
            {"chunk_size": 4, "preload_nchunks": 3, "batch_size": 13},
            r"batch_size \(13\) is larger than one preload window, chunk_size \* preload_nchunks \(4 \* 3 = 12\)",
        ),
        ({"shuffle": "yes"}, "shuffle must be a bool"),
        ({"rng": 3}, "rng must be a numpy.random.Generator"),
    ],
)
def test_chunk_sampler_rejects_bad_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ChunkSampler(**kwargs)


class EveryOtherRowFirst(Sampler):
    """A user-defined sampler: even rows in one window, then odd rows in reverse, batches of 3."""

    batch_size = 3
    shuffle = False

    def n_batches(self, n_obs: int) -> int:
        return -(-((n_obs + 1) // 2) // 3) + -(-(n_obs // 2) // 3)

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        yield LoadRequest(chunks=[slice(i, i + 1) for i in range(0, n_obs, 2)])
        odd = [slice(i, i + 1) for i in range(1, n_obs, 2)]
        positions = np.arange(len(odd))[::-1]
        yield LoadRequest(chunks=odd, splits=[positions[i : i + 3] for i in range(0, len(odd), 3)])


@pytest.mark.parametrize("fmt", ["zarr", "h5ad"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_user_defined_sampler(pool, fmt, kind):
    stores = pool.many(fmt, kind, [11, 6])
    loader = Loader(batch_sampler=EveryOtherRowFirst(), return_index=True, to=None)
    loader.add_anndatas([s.adata() for s in stores])
    batches = list(loader)
    order = check_epoch(batches, stores)
    np.testing.assert_array_equal(order, [*range(0, 17, 2), *range(15, 0, -2)])
    assert [len(b["index"]) for b in batches] == [3, 3, 3, 3, 3, 2]
    assert len(loader) == len(batches)


class BadSampler(Sampler):
    batch_size = 1
    shuffle = False

    def __init__(self, request):
        self.request = request

    def n_batches(self, n_obs: int) -> int:
        return 1

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        yield self.request


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (
            LoadRequest(chunks=[slice(0, 100)]),
            r"chunk slice\(0, 100, None\); expected 0 <= start <= stop <= n_obs = 11",
        ),
        (LoadRequest(chunks=[slice(0, 4, 2)]), "expected a slice with step 1"),
        (LoadRequest(chunks=[slice(0, 4)], splits=[np.array([4])]), r"positions outside 0..3"),
        (
            LoadRequest(chunks=[slice(0, 4)], splits=[np.array([0.5])]),
            "expected a 1-D integer array",
        ),
        ([slice(0, 4)], "expected a dict with 'requests'"),
    ],
)
def test_faulty_sampler_is_caught_before_reading(pool, request_, match):
    store = pool.get("zarr", "dense", 11)
    loader = Loader(batch_sampler=BadSampler(request_), to=None).add_anndata(store.adata())
    with pytest.raises(InvalidArgumentError, match=match):
        list(loader)


class Overlapping(Sampler):
    """Requests rows 3..4 twice in one window (a sampler may oversample)."""

    batch_size = 4
    shuffle = False

    def n_batches(self, n_obs: int) -> int:
        return 3

    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        yield LoadRequest(
            chunks=[slice(0, 5), slice(3, 8)],
            splits=[np.array([9, 0, 4, 5]), np.array([1, 2, 3, 6]), np.array([7, 8])],
        )


@pytest.mark.parametrize("fmt", ["zarr", "h5ad", "memory"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("strategy", ["concat-shuffle", "shuffle-concat"])
def test_overlapping_chunks_yield_the_requested_rows(pool, fmt, kind, strategy):
    store = pool.get(fmt, kind, 11)
    loader = Loader(
        batch_sampler=Overlapping(), return_index=True, to=None, concat_strategy=strategy
    )
    batches = list(loader.add_anndata(store.adata()))
    order = check_epoch(batches, [store])
    np.testing.assert_array_equal(order, [7, 0, 4, 3, 1, 2, 3, 4, 5, 6])
