"""Resuming across epochs: in this process and under real DataLoader workers (persistent or
not), interrupted at any batch of any epoch; the resumed epoch yields exactly the rows left,
every later epoch every row once, in the order an uninterrupted run yields them."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annbatch import Loader
from annbatch.errors import InvalidArgumentError

from conftest import check_epoch, worker_context

SIZES = (37, 23)  # 60 rows in two datasets
EPOCHS = 3


def _loader(stores, seed: int, *, read_ahead: int = 1) -> Loader:
    return Loader(
        chunk_size=5,
        preload_nchunks=1,
        batch_size=3,
        shuffle=True,
        return_index=True,
        to=None,
        read_ahead=read_ahead,
        rng=np.random.default_rng(seed),
    ).add_anndatas([s.adata() for s in stores])


def _batches(loader: Loader, workers: int, *, persistent: bool = False, start: str = "forkserver"):
    """What the training loop iterates: the Loader itself, or a DataLoader over it."""
    if not workers:
        return loader
    from torch.utils.data import DataLoader

    context = worker_context(start)
    return DataLoader(
        loader,
        batch_size=None,
        num_workers=workers,
        persistent_workers=persistent,
        multiprocessing_context=context,
    )


def _rows(batches) -> np.ndarray:
    rows = [np.asarray(b["index"]) for b in batches]
    return np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)  # a finished epoch


_UNINTERRUPTED: dict[tuple, list[np.ndarray]] = {}


def _uninterrupted(stores, workers, persistent, start):
    """The epochs of an uninterrupted run (the same for every stop point: computed once per
    stores, worker count, persistence and start method)."""
    key = (tuple(s.path or id(s) for s in stores), workers, persistent, start)
    if key not in _UNINTERRUPTED:
        reference = _loader(stores, 1)
        batches = _batches(reference, workers, persistent=persistent, start=start)
        expected = []
        for epoch in range(EPOCHS):
            reference.set_epoch(epoch)
            expected.append(_rows(batches))
        _UNINTERRUPTED[key] = expected
    return _UNINTERRUPTED[key]


def _run(stores, workers, persistent, stop_epoch, stop_after, start="forkserver"):
    """Epochs of an uninterrupted run, and those of a run interrupted after ``stop_after``
    batches of epoch ``stop_epoch`` and resumed by a new Loader (another seed: the state
    decides)."""
    expected = _uninterrupted(stores, workers, persistent, start)

    first = _loader(stores, 1)
    batches = _batches(first, workers, persistent=persistent, start=start)
    for epoch in range(stop_epoch):
        first.set_epoch(epoch)
        _rows(batches)
    first.set_epoch(stop_epoch)
    iterator = iter(batches)
    taken = [np.asarray(b["index"]) for b in itertools.islice(iterator, stop_after)]
    state = first.state_dict(batches_seen=stop_after if workers else None)
    del iterator
    assert state["batches_done"] == stop_after

    resumed = _loader(stores, 2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # until the epoch begins, the loaded state
    batches = _batches(resumed, workers, persistent=persistent, start=start)
    got = []
    for epoch in range(stop_epoch, EPOCHS):
        resumed.set_epoch(epoch)
        got.append(_rows(batches))
    return expected, taken, got


def _check(expected, taken, got, stop_epoch):
    n = sum(SIZES)
    for rows in expected:
        assert sorted(rows.tolist()) == list(range(n))  # every row once per epoch
    resumed_epoch = np.concatenate([*taken, got[0]]) if taken else got[0]
    np.testing.assert_array_equal(resumed_epoch, expected[stop_epoch])  # exactly the rest
    for epoch, rows in zip(range(stop_epoch + 1, EPOCHS), got[1:], strict=True):
        np.testing.assert_array_equal(rows, expected[epoch])  # later epochs whole


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    workers=st.integers(0, 3),
    persistent=st.booleans(),
    stop_epoch=st.integers(0, EPOCHS - 1),
    stop_frac=st.floats(0, 1),
)
def test_resume_at_any_batch_of_any_epoch(pool, workers, persistent, stop_epoch, stop_frac):
    stores = pool.many("zarr", "sparse", SIZES)
    n_batches = len(_loader(stores, 1))
    stop_after = round(stop_frac * n_batches)
    expected, taken, got = _run(stores, workers, persistent and workers > 0, stop_epoch, stop_after)
    _check(expected, taken, got, stop_epoch)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_resume_under_spawn_workers_keeps_later_epochs_whole(pool):
    """The reported case: 60 rows, 2 spawn workers, set_epoch each epoch, resumed after 4
    batches: epochs 1 and 2 yielded 40 of 60 rows each."""
    stores = pool.many("zarr", "sparse", SIZES)
    expected, taken, got = _run(stores, 2, False, 0, 4, start="spawn")
    _check(expected, taken, got, 0)


def test_state_before_the_first_batch_is_the_loaded_one(pool):
    """A second interruption while the resumed epoch starts must not replay it."""
    stores = pool.many("memory", "sparse", SIZES)
    first = _loader(stores, 3)
    iterator = iter(first)
    taken = list(itertools.islice(iterator, 5))
    state = first.state_dict()
    iterator.close()
    again = _loader(stores, 4)
    again.load_state_dict(state)
    iterator = iter(again)  # made, not started
    assert again.state_dict() == state
    iterator.close()
    third = _loader(stores, 5)
    third.load_state_dict(again.state_dict())
    rest = list(third)
    order = check_epoch(taken + rest, stores)
    assert sorted(order.tolist()) == list(range(sum(SIZES)))
    assert third.state_dict()["batches_done"] == 0  # the next epoch, from its start
    assert third.state_dict()["sampler"]["epoch"] == state["sampler"]["epoch"] + 1


def test_a_loaded_state_is_consumed_by_its_epoch_only(pool):
    """In this process: after the resumed epoch, and for another epoch (set_epoch), the
    loaded state skips nothing."""
    stores = pool.many("memory", "dense", SIZES)
    first = _loader(stores, 3)
    first.set_epoch(1)
    iterator = iter(first)
    list(itertools.islice(iterator, 4))
    state = first.state_dict()
    iterator.close()
    resumed = _loader(stores, 3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the user moved on: epoch 2 is whole
    assert len(_rows(resumed)) == sum(SIZES)
    assert resumed.state_dict()["batches_done"] == 0


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_resuming_under_workers_without_set_epoch_is_an_error(pool):
    """Without set_epoch the workers' order comes from the DataLoader's seed of the epoch:
    skipping batches of another order would lose rows, so it is refused."""
    stores = pool.many("zarr", "sparse", SIZES)
    first = _loader(stores, 1)
    state = {**first.state_dict(), "batches_done": 4}
    resumed = _loader(stores, 1)
    resumed.load_state_dict(state)
    with pytest.raises(InvalidArgumentError, match="set_epoch"):
        list(_batches(resumed, 2))


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"sampler": {}, "batches_done": -1}, "batches_done"),
        ({"sampler": 3, "batches_done": 0}, "sampler"),
        ({"batches_done": 0}, "expected the dict"),
    ],
)
def test_bad_states(pool, state, match):
    loader = _loader(pool.many("memory", "dense", SIZES), 0)
    with pytest.raises(InvalidArgumentError, match=match):
        loader.load_state_dict(state)
