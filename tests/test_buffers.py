"""Window buffers reused across windows and epochs: never aliased by a batch, every row exact."""

from __future__ import annotations

import copy
import pickle

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annbatch import DatasetCollection, Loader
from annbatch._core import buffers
from annbatch._core.buffers import BufferPool, Lease

from conftest import check_epoch, to_numpy


def test_pool_gives_the_smallest_fitting_buffer_and_keeps_at_most_capacity():
    pool = BufferPool(capacity=2)
    small, large = pool.take(100), pool.take(10_000)
    assert small.nbytes >= 100
    assert large.nbytes >= 10_000
    pool.give([large, small])
    assert pool.take(50) is small  # the smallest that fits, not the first
    assert pool.take(50) is large  # the only one left, and it fits
    assert pool.nbytes == 0
    pool.give([pool.take(1_000), pool.take(2_000), pool.take(3_000)])
    assert len(pool._free) == 2
    assert min(b.nbytes for b in pool._free) >= 2_000
    pool.clear()
    assert pool.nbytes == 0


def test_lease_pools_only_roles_that_batches_cannot_alias_and_releases_once():
    pool = BufferPool()
    lease = pool.lease()
    data = lease.allocate("data", (10,), np.dtype(np.float32))
    indices = lease.allocate("indices", (10,), np.dtype(np.int64))
    dense = lease.allocate("dense", (3, 4), np.dtype(np.float64))
    assert data.shape == (10,)
    assert data.dtype == np.float32
    assert data.flags.c_contiguous
    assert indices.dtype == np.int64
    assert dense.shape == (3, 4)
    lease.release()
    lease.release()  # a second release gives nothing back twice
    assert len(pool._free) == 2
    assert not any(np.shares_memory(dense, b) for b in pool._free)


def test_a_copied_or_pickled_pool_starts_empty():
    pool = BufferPool(capacity=3)
    pool.give([pool.take(1_000)])
    for other in (copy.copy(pool), pickle.loads(pickle.dumps(pool))):
        assert other.nbytes == 0
        assert other._capacity == 3
    assert pool.nbytes > 0


@pytest.fixture
def poisoned(monkeypatch):
    """Buffers given back to a pool are overwritten with a marker first: a batch that still
    pointed into a window's memory would then hold the marker, whatever reused it later."""
    release = Lease.release

    def poisoning_release(self):
        for buffer in self._taken:
            buffer[:] = 0xA5
        release(self)

    monkeypatch.setattr(Lease, "release", poisoning_release)


def _uniform_store(tmp_path, n_obs=600, n_var=40, per_row=5, chunk=64):
    """A zarr AnnData store whose rows all hold ``per_row`` values (every window of a size
    holds the same number of entries)."""
    rng = np.random.default_rng(1)
    indices = np.sort(
        np.stack([rng.choice(n_var, per_row, replace=False) for _ in range(n_obs)]), axis=1
    ).ravel()
    data = rng.integers(1, 100, size=n_obs * per_row).astype(np.float32)
    x = sp.csr_matrix((data, indices, np.arange(n_obs + 1) * per_row), shape=(n_obs, n_var))
    ad.settings.zarr_write_format = 3
    group = zarr.open_group(tmp_path / "uniform.zarr", mode="w")
    ad.io.write_elem(group, "X", x, dataset_kwargs={"chunks": (chunk,), "shards": (chunk * 4,)})
    return x, ad.io.sparse_dataset(zarr.open_group(tmp_path / "uniform.zarr", mode="r")["X"])


def test_later_windows_and_epochs_reuse_the_first_windows_memory(tmp_path, monkeypatch, poisoned):
    x, stored = _uniform_store(tmp_path)
    new = []
    take = BufferPool.take

    def counting_take(self, nbytes):
        free = {id(b) for b in self._free}
        out = take(self, nbytes)
        if id(out) not in free:
            new.append(nbytes)
        return out

    monkeypatch.setattr(BufferPool, "take", counting_take)
    loader = Loader(
        chunk_size=10, preload_nchunks=6, batch_size=20, shuffle=True, return_index=True, to=None
    ).add_dataset(stored)
    held = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        held.append(batches)
        if epoch == 0:
            first = len(new)
            assert 2 <= first <= 2 * (1 + 2)  # values and indices of the windows alive at once
    # 3 epochs of 10 windows read 60 arrays; new memory only for the windows alive at once
    # (how many are depends on thread timing: one more in a later epoch is allowed).
    assert len(new) <= 2 * (1 + 2), f"{len(new)} new buffers for 60 window arrays"
    assert loader._buffers.nbytes > 0
    # Every batch of every epoch still holds its rows: none was a view of reused memory.
    for batches in held:
        for batch in batches:
            np.testing.assert_array_equal(batch["X"].toarray(), x[batch["index"]].toarray())
            for buffer in loader._buffers._free:
                assert not np.shares_memory(batch["X"].data, buffer)
                assert not np.shares_memory(batch["X"].indices, buffer)


@pytest.mark.slow
@settings(
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chunk=st.integers(1, 12),
    preload=st.integers(1, 8),
    batch=st.integers(1, 96),
    read_ahead=st.integers(0, 3),
    shuffle=st.booleans(),
    to=st.sampled_from([None, "torch"]),
    dense=st.booleans(),
    strategy=st.sampled_from([None, "concat-shuffle", "shuffle-concat"]),
)
def test_held_batches_of_several_epochs_equal_the_stored_rows(
    pool, poisoned, chunk, preload, batch, read_ahead, shuffle, to, dense, strategy
):
    """Batches kept across windows and epochs (a user's list, a replay buffer) hold the stored
    rows and obs, whatever reused the windows' memory after them."""
    stores = pool.many("zarr", "sparse", [37, 0, 52, 11])
    batch = 1 + (batch - 1) % (chunk * preload)  # a window holds at least one batch
    loader = Loader(
        chunk_size=chunk,
        preload_nchunks=preload,
        batch_size=batch,
        shuffle=shuffle,
        read_ahead=read_ahead,
        return_index=True,
        to=to,
        dense=dense,
        concat_strategy=strategy,
        rng=np.random.default_rng(0),
    )
    for store in stores:
        loader.add_anndata(store.adata())
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append(list(loader))
    assert loader._buffers.nbytes > 0  # the windows' memory was pooled
    for batches in epochs:
        order = check_epoch(batches, stores)
        assert np.array_equal(np.sort(order), np.arange(sum(s.n_obs for s in stores)))


def test_collection_batches_held_across_epochs_are_exact(tmp_path, pool, poisoned):
    stores = pool.many("zarr", "sparse", [40, 33])
    collection = DatasetCollection(tmp_path / "c.zarr", mode="w")
    collection.add_adatas(
        [ad.AnnData(X=s.matrix, obs=s.obs) for s in stores], dataset_size=30, progress=False
    )
    loader = Loader(
        chunk_size=4, preload_nchunks=4, batch_size=8, shuffle=True, return_index=True, to=None
    ).use_collection(DatasetCollection(tmp_path / "c.zarr", mode="r"))
    held = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        held.append(list(loader))
    assert loader._buffers.nbytes > 0
    # The collection is shuffled on build: compare each epoch with one read without reuse.
    fresh = Loader(chunk_size=73, preload_nchunks=1, batch_size=73, to=None, return_index=True)
    fresh.use_collection(DatasetCollection(tmp_path / "c.zarr", mode="r"))
    (whole,) = list(fresh)
    want = to_numpy(whole["X"])[np.argsort(whole["index"])]
    for batches in held:
        seen = []
        for b in batches:
            np.testing.assert_array_equal(to_numpy(b["X"]), want[b["index"]])
            seen.append(b["index"])
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(73))


def test_windows_abandoned_by_a_break_give_their_memory_back(tmp_path, monkeypatch, poisoned):
    x, stored = _uniform_store(tmp_path)
    created = []
    anonymous = buffers.anonymous

    def recording(nbytes):
        created.append(anonymous(nbytes))
        return created[-1]

    monkeypatch.setattr(buffers, "anonymous", recording)
    loader = Loader(
        chunk_size=10, preload_nchunks=6, batch_size=20, shuffle=True, return_index=True, to=None
    ).add_dataset(stored)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for k, batch in enumerate(loader):
            np.testing.assert_array_equal(batch["X"].toarray(), x[batch["index"]].toarray())
            if k == 4:
                break  # mid-window, with the next window being read ahead
        # the epoch's read threads have stopped: every buffer ever made is back in the pool
        assert len(created) <= loader._buffers._capacity
        assert {id(b) for b in loader._buffers._free} == {id(b) for b in created}
    loader.set_epoch(3)
    order = np.concatenate([b["index"] for b in loader])
    np.testing.assert_array_equal(np.sort(order), np.arange(x.shape[0]))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_fork_workers_after_an_epoch_in_the_parent_read_into_memory_of_their_own(
    tmp_path, poisoned
):
    """A Loader iterated in the parent holds pooled memory; DataLoader workers forked from it
    start with empty pools, and whatever they write never reaches the parent's buffers."""
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    x, stored = _uniform_store(tmp_path)
    loader = Loader(
        chunk_size=10, preload_nchunks=6, batch_size=20, shuffle=True, return_index=True, to=None
    ).add_dataset(stored)
    held = list(loader)  # the parent's pool now holds memory
    assert loader._buffers.nbytes > 0
    before = [b.copy() for b in loader._buffers._free]
    workers = DataLoader(  # a timeout: a forked worker that deadlocks fails instead of hanging
        loader, batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    for epoch in range(2):
        loader.set_epoch(epoch + 1)
        seen = []
        for batch in workers:
            index = np.asarray(batch["index"])
            np.testing.assert_array_equal(batch["X"].toarray(), x[index].toarray())
            seen.append(index)
        np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(x.shape[0]))
    for old, now in zip(before, loader._buffers._free, strict=True):
        np.testing.assert_array_equal(old, now)  # no worker wrote into the parent's memory
    for batch in held:
        np.testing.assert_array_equal(batch["X"].toarray(), x[batch["index"]].toarray())
    del torch
