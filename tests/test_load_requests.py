"""The public load-request form (issue 25 items 2 and 5): ``Sampler.sample`` yields plain dicts
(``annbatch.types.LoadRequest``) with ``"requests"`` and ``"splits"``; custom samplers may
yield dicts (``"chunks"`` deprecated) or the old ``annbatch.abc.LoadRequest`` objects; a
``DistributedSampler`` leaves the sampler it wraps as it was; a mask cannot be set while a pass
over the sampler runs."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import annbatch
from annbatch import ChunkSampler, Loader
from annbatch.abc import Sampler
from annbatch.errors import SamplerBusyError
from annbatch.samplers import (
    ClassSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    WeightedClassSampler,
    WeightedSampler,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

X = np.arange(120 * 3, dtype=np.float32).reshape(120, 3)
CLASSES = pd.Categorical(np.repeat(["a", "b", "c"], 40))


class DictSampler(Sampler):
    """A user's sampler that yields the given requests (dicts or objects) as they are."""

    def __init__(self, requests: list[Any], *, batch_size: int = 3, shuffle: bool = False):
        self._requests, self._batch, self._shuffle = requests, batch_size, shuffle

    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    def _sample(self, n_obs: int) -> Iterator[Any]:
        yield from self._requests


class RngSampler(Sampler):
    """A user's sampler that draws from ``self.rng`` each pass and honours ``self.mask``."""

    batch_size = 4
    shuffle = True

    def __init__(self) -> None:
        self.rng = np.random.default_rng(7)

    def _sample(self, n_obs: int) -> Iterator[dict[str, Any]]:
        start, stop, _ = (self.mask or slice(None)).indices(n_obs)
        yield {"requests": start + self.rng.permutation(stop - start)}


SAMPLERS: dict[str, Callable[[], Sampler]] = {
    "chunk": lambda: ChunkSampler(5, 2, 4, shuffle=True, rng=np.random.default_rng(0)),
    "random": lambda: RandomSampler(5, 2, 4, rng=np.random.default_rng(0)),
    "sequential": lambda: SequentialSampler(5, 2, 4),
    "class": lambda: ClassSampler(
        5, 2, 5, classes=CLASSES, num_samples=60, rng=np.random.default_rng(0)
    ),
    "weighted-class": lambda: WeightedClassSampler(
        5, 2, 5, classes=CLASSES, num_samples=60, rng=np.random.default_rng(0)
    ),
    "weighted": lambda: WeightedSampler(
        np.ones(120), num_samples=50, batch_size=4, rng=np.random.default_rng(0)
    ),
    "distributed": lambda: DistributedSampler(
        RandomSampler(5, 2, 4, rng=np.random.default_rng(0)), dist_info=lambda: (1, 2)
    ),
    "user-dicts": lambda: DictSampler(
        [{"requests": [slice(3, 9)]}, {"requests": np.array([50, 2, 2])}]
    ),
    "user-rng": RngSampler,
}


def _rows_of(request: dict[str, Any]) -> np.ndarray:
    """The rows of a public load request, in request order."""
    rows = request["requests"]
    if isinstance(rows, np.ndarray):
        return rows
    return np.concatenate([np.arange(s.start, s.stop) for s in rows])


def _loader_rows(sampler: Sampler, n_obs: int = 120) -> list[list[int]]:
    loader = Loader(batch_sampler=sampler, to=None, return_index=True).add_dataset(X[:n_obs])
    out = []
    for batch in loader:
        np.testing.assert_array_equal(batch["X"], X[batch["index"]])
        out.append(batch["index"].tolist())
    return out


# ----------------------------------------------------------------- item 2: plain dicts out
@pytest.mark.parametrize("name", SAMPLERS)
def test_sample_yields_plain_dicts_that_the_loader_follows(name):
    sampler = SAMPLERS[name]()
    want: list[list[int]] = []
    requests = list(sampler.sample(120))
    assert requests
    for request in requests:
        assert type(request) is dict
        assert set(request) == {"requests", "splits"}
        assert isinstance(request["splits"], list)
        assert all(s.ndim == 1 and np.issubdtype(s.dtype, np.integer) for s in request["splits"])
        rows = _rows_of(request)
        want.extend(rows[s].tolist() for s in request["splits"])
    assert sum(len(r["splits"]) for r in requests) == sampler.n_batches(120)
    # The same epoch drawn again through the Loader yields exactly these batches.
    assert _loader_rows(SAMPLERS[name]()) == want


@pytest.mark.parametrize("shuffle", [False, True])
def test_sample_fills_in_missing_splits(shuffle):
    sampler = DictSampler(
        [{"requests": [slice(10, 15), slice(0, 3)]}, {"requests": np.array([60, 4, 4, 90, 1])}],
        batch_size=3,
        shuffle=shuffle,
    )
    sampler.rng = np.random.default_rng(3)
    first, second = sampler.sample(120)
    assert first["requests"] == [slice(10, 15), slice(0, 3)]
    np.testing.assert_array_equal(second["requests"], [60, 4, 4, 90, 1])  # kept as given
    for request, n in ((first, 8), (second, 5)):
        assert [s.size for s in request["splits"]] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
        order = np.concatenate(request["splits"])
        assert sorted(order.tolist()) == list(range(n))  # positions in request order
        if not shuffle:
            np.testing.assert_array_equal(order, np.arange(n))
    assert shuffle != np.array_equal(np.concatenate(first["splits"]), np.arange(8))


def test_sample_renames_the_old_chunks_key():
    sampler = DictSampler([{"chunks": [slice(0, 4)], "splits": [np.array([3, 0])]}])
    with pytest.warns(DeprecationWarning, match="'chunks' key of a load request is deprecated"):
        (request,) = sampler.sample(10)
    assert set(request) == {"requests", "splits"}
    assert request["requests"] == [slice(0, 4)]


def test_the_old_object_form_still_works():
    with pytest.warns(DeprecationWarning, match="annbatch.abc.LoadRequest is deprecated"):
        from annbatch.abc import LoadRequest
    old = DictSampler(
        [
            LoadRequest(chunks=[slice(20, 25)]),  # no splits: consecutive batches
            LoadRequest(chunks=[slice(5, 7), slice(0, 2)], splits=[np.array([3, 0, 1])]),
        ]
    )
    requests = list(old.sample(120))
    assert [type(r) for r in requests] == [dict, dict]
    assert [s.tolist() for s in requests[0]["splits"]] == [[0, 1, 2], [3, 4]]
    assert _loader_rows(old) == [[20, 21, 22], [23, 24], [1, 5, 6]]


def test_one_public_load_request_type():
    assert annbatch.types.LoadRequest.__annotations__.keys() >= {"requests", "splits", "chunks"}
    assert "LoadRequest" not in annbatch.abc.__all__
    with pytest.warns(DeprecationWarning, match="annbatch.abc.LoadRequest is deprecated"):
        legacy = annbatch.abc.LoadRequest
    assert legacy is not annbatch.types.LoadRequest


class Reversed(RandomSampler):
    """A user's sampler that replaces ``sample`` itself: each window's batches reversed."""

    def sample(self, n_obs: int) -> Iterator[dict[str, Any]]:
        for request in super().sample(n_obs):
            yield {"requests": request["requests"], "splits": request["splits"][::-1]}


def test_the_loader_reads_a_sampler_through_an_overridden_sample():
    plain = _loader_rows(RandomSampler(5, 2, 4, rng=np.random.default_rng(1)))
    mine = _loader_rows(Reversed(5, 2, 4, rng=np.random.default_rng(1)))
    assert mine != plain
    assert sorted(map(tuple, mine)) == sorted(map(tuple, plain))
    assert mine[:2] == plain[:2][::-1]  # windows of 8 rows (whole batches of 4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.integers(0, 59), min_size=1, max_size=30),
    cut=st.integers(1, 7),
    data=st.data(),
)
def test_positions_requests_round_trip(rows, cut, data):
    """Dict out of sample() == what the Loader yields, for any positions and splits."""
    n = len(rows)
    order = data.draw(st.permutations(range(n)))
    splits = [np.array(order[i : i + cut], dtype=np.int64) for i in range(0, n, cut)]
    sampler = DictSampler([{"requests": np.array(rows), "splits": splits}])
    (request,) = sampler.sample(60)
    want = [np.array(rows)[s].tolist() for s in request["splits"]]
    assert _loader_rows(sampler, 60) == want


# ------------------------------------------- item 5: DistributedSampler leaves its input alone
def _snapshot(sampler: Sampler) -> dict[str, Any]:
    mask = sampler.mask
    return {
        "mask": mask.copy() if isinstance(mask, np.ndarray) else mask,
        "rng": copy.deepcopy(sampler.rng.bit_generator.state),
        "state": sampler.state_dict() if hasattr(sampler, "_seed") else None,
        "ranks": (getattr(sampler, "_rank", None), getattr(sampler, "_world_size", None)),
    }


@pytest.mark.parametrize("name", ["chunk", "random", "sequential", "class", "weighted", "user-rng"])
@pytest.mark.parametrize("mask", [None, slice(10, 110)])
def test_distributed_sampler_leaves_the_wrapped_sampler_as_it_was(name, mask):
    inner = SAMPLERS[name]()
    if mask is not None:
        inner.mask = mask
    before = _snapshot(inner)
    ranks = [DistributedSampler(inner, dist_info=lambda r=r: (r, 2)) for r in (0, 1)]
    per_rank = []
    for dist in ranks:
        per_rank.append([r for b in _loader_rows(dist) for r in b])
        assert dist.n_batches(120) > 0
    after = _snapshot(inner)
    if isinstance(before["mask"], np.ndarray):
        np.testing.assert_array_equal(after.pop("mask"), before.pop("mask"))
    assert after == before
    assert ranks[0].sampler is not inner
    # Two ranks built from one sampler object still read disjoint shares.
    if name not in ("class", "weighted"):  # these draw with replacement
        assert not set(per_rank[0]) & set(per_rank[1])
    lo, hi = (mask or slice(0, 120)).start, (mask or slice(0, 120)).stop
    assert all(lo <= r < hi for rows in per_rank for r in rows)


def test_the_rank_view_draws_what_the_wrapped_sampler_would():
    inner = RngSampler()
    dist = DistributedSampler(inner, dist_info=lambda: (0, 1), enforce_equal_batches=False)
    via_wrapper = _loader_rows(dist)
    assert _loader_rows(inner) == via_wrapper  # the same generator state, the same draw


# ---------------------------------------------------------- item 5: no mask change mid-pass
@pytest.mark.parametrize("name", SAMPLERS)
def test_mask_cannot_be_set_while_a_pass_runs(name):
    sampler = SAMPLERS[name]()
    passes = sampler.sample(120)
    next(passes)
    with pytest.raises(SamplerBusyError, match=r"cannot set \w+\.mask while a pass") as err:
        sampler.mask = slice(0, 60)
    assert isinstance(err.value, RuntimeError)
    passes.close()
    sampler.mask = slice(0, 60)  # the pass is over
    assert sampler.mask == slice(0, 60)
    list(sampler.sample(120))  # a whole pass ends the pass too
    sampler.mask = None


@pytest.mark.parametrize("read_ahead", [0, 1])
def test_mask_cannot_be_set_during_a_loader_epoch(read_ahead):
    inner = RandomSampler(5, 2, 4, rng=np.random.default_rng(0))
    dist = DistributedSampler(inner, dist_info=lambda: (0, 2))
    loader = Loader(batch_sampler=dist, to=None, read_ahead=read_ahead).add_dataset(X)
    for i, _ in enumerate(loader):
        assert len(loader) == dist.n_batches(120)  # asking the length mid-epoch is fine
        with pytest.raises(RuntimeError, match="while a pass over the sampler is running"):
            dist.mask = slice(0, 10)
        inner.mask = slice(0, 10)  # the user's own sampler is not the one being read
        if i == 2:
            break
    dist.mask = slice(0, 60)
    rows = [r for b in _loader_rows(dist) for r in b]
    assert sorted(rows) == list(range(28))  # rank 0's half of rows 0..59, in whole batches
