"""Ranks, epochs, masks, chunk offsets and resuming: the sampler invariants, then real
torch.distributed processes (gloo) and real DataLoader workers."""

from __future__ import annotations

import itertools
import pickle
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annbatch import ChunkSampler, Loader
from annbatch._core.workers import delivered_per_worker
from annbatch.errors import InvalidArgumentError

from conftest import check_epoch, worker_context


def _epoch_rows(sampler: ChunkSampler, n_obs: int) -> list[np.ndarray]:
    """The rows of each batch, in yield order."""
    out = []
    for request in sampler.sample(n_obs):
        rows = np.concatenate([np.arange(c.start, c.stop) for c in request["requests"]])
        out.extend(rows[s] for s in request["splits"])
    return out


# ------------------------------------------------------------------------------------ ranks
@settings(max_examples=150, deadline=None)
@given(
    n_obs=st.integers(0, 300),
    chunk_size=st.integers(1, 20),
    preload_nchunks=st.integers(1, 5),
    batch_frac=st.floats(0.01, 1.0),
    world_size=st.integers(1, 4),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    random_offset=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_ranks_get_equal_disjoint_shares(
    n_obs,
    chunk_size,
    preload_nchunks,
    batch_frac,
    world_size,
    shuffle,
    drop_last,
    random_offset,
    epoch,
):
    batch_size = max(1, int(batch_frac * chunk_size * preload_nchunks))
    per_rank = []
    for rank in range(world_size):
        sampler = ChunkSampler(
            chunk_size,
            preload_nchunks,
            batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            rng=np.random.default_rng(7),
            random_offset=random_offset,
            rank=rank,
            world_size=world_size,
        )
        sampler.set_epoch(epoch)
        batches = _epoch_rows(sampler, n_obs)
        assert len(batches) == sampler.n_batches(n_obs)
        per_rank.append(batches)
    # Every rank yields the same number of batches (DDP would hang otherwise).
    assert len({len(b) for b in per_rank}) == 1
    rows = [np.concatenate(b) if b else np.empty(0, int) for b in per_rank]
    everything = np.concatenate(rows)
    if drop_last:
        assert len(np.unique(everything)) == len(everything)  # disjoint
        assert n_obs - len(everything) < world_size * batch_size + world_size
        assert all(len(b) == batch_size for batches in per_rank for b in batches)
    else:
        assert set(everything.tolist()) == set(range(n_obs))  # complete
        assert len(everything) - n_obs < world_size  # padding: fewer than one row per rank
        assert len({len(r) for r in rows}) == 1


def test_epochs_move_rows_between_ranks():
    def share(epoch):
        sampler = ChunkSampler(
            4, 2, 4, shuffle=True, rng=np.random.default_rng(1), rank=0, world_size=2
        )
        sampler.set_epoch(epoch)
        return set(np.concatenate(_epoch_rows(sampler, 200)).tolist())

    assert share(0) == share(0)
    assert share(0) != share(1)


def test_shuffling_ranks_need_one_seed():
    sampler = ChunkSampler(4, 2, 4, shuffle=True, rank=0, world_size=2)
    with pytest.raises(InvalidArgumentError, match="same seed on every rank"):
        list(sampler.sample(20))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "rank and world_size together"),
        ({"rank": 2, "world_size": 2}, r"rank must be an integer in 0..1"),
        ({"rank": 0, "world_size": 0}, "world_size must be a positive integer"),
        ({"mask": np.array([1, 0])}, "1-D boolean array"),
        ({"mask": slice(0, 10, 2)}, "step 1"),
    ],
)
def test_bad_sampler_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        ChunkSampler(4, 2, 4, **kwargs)


# ------------------------------------------------------------------------ masks and offsets
@settings(max_examples=100, deadline=None)
@given(
    mask=st.lists(st.booleans(), min_size=0, max_size=120),
    chunk_size=st.integers(1, 9),
    shuffle=st.booleans(),
    random_offset=st.booleans(),
)
def test_mask_yields_exactly_the_masked_rows(mask, chunk_size, shuffle, random_offset):
    mask = np.array(mask, dtype=bool)
    sampler = ChunkSampler(
        chunk_size,
        3,
        2,
        shuffle=shuffle,
        mask=mask,
        random_offset=random_offset,
        rng=np.random.default_rng(0),
    )
    rows = [r for b in _epoch_rows(sampler, mask.size) for r in b.tolist()]
    assert sorted(rows) == np.flatnonzero(mask).tolist()
    for request in sampler.sample(mask.size):
        for c in request["requests"]:  # no chunk crosses a gap of the mask
            assert mask[c.start : c.stop].all()


def test_mask_as_slice_and_wrong_length():
    sampler = ChunkSampler(4, 2, 3, mask=slice(10, 25))
    assert sorted(np.concatenate(_epoch_rows(sampler, 40)).tolist()) == list(range(10, 25))
    with pytest.raises(InvalidArgumentError, match="mask has 5 entries; the Loader has 6 rows"):
        list(ChunkSampler(4, 2, 3, mask=np.ones(5, dtype=bool)).sample(6))


def test_random_offsets_move_chunk_boundaries_between_epochs():
    sampler = ChunkSampler(
        10, 4, 10, shuffle=True, random_offset=True, rng=np.random.default_rng(3)
    )
    starts = []
    for _ in range(6):
        starts.append({c.start % 10 for r in sampler.sample(500) for c in r["requests"] if c.start})
    offsets = {min(s) for s in starts if s}
    assert len(offsets) > 1  # boundaries moved
    plain = ChunkSampler(10, 4, 10, shuffle=True, rng=np.random.default_rng(3))
    assert {c.start % 10 for r in plain.sample(500) for c in r["requests"]} == {0}


# ---------------------------------------------------------------------------------- resume
def _naive_delivered(totals, delivered):
    """One batch per turn, worker after worker, dropping workers that ran out."""
    left = list(totals)
    taken = [0] * len(totals)
    active = [w for w, n in enumerate(totals) if n]
    last = -1
    while delivered and active:
        for w in list(active):
            if not delivered:
                break
            taken[w] += 1
            left[w] -= 1
            delivered -= 1
            last = w
            if not left[w]:
                active.remove(w)
    return taken, (last + 1) % len(totals)


@given(st.lists(st.integers(0, 30), min_size=1, max_size=5), st.integers(0, 200))
def test_delivered_per_worker_follows_the_dataloader_turns(totals, delivered):
    assert delivered_per_worker(totals, delivered) == _naive_delivered(totals, delivered)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    fmt=st.sampled_from(["zarr", "memory"]),
    kind=st.sampled_from(["dense", "sparse"]),
    stop_after=st.integers(0, 12),
    read_ahead=st.integers(0, 2),
    epoch=st.integers(0, 2),
)
def test_resume_yields_the_rest_of_the_epoch(pool, fmt, kind, stop_after, read_ahead, epoch):
    stores = pool.many(fmt, kind, (37, 21))

    def loader(seed):
        return Loader(
            chunk_size=5,
            preload_nchunks=2,
            batch_size=4,
            shuffle=True,
            return_index=True,
            to=None,
            read_ahead=read_ahead,
            rng=np.random.default_rng(seed),
        ).add_anndatas([s.adata() for s in stores])

    first = loader(11)
    for _ in range(epoch):  # earlier, complete epochs
        list(first)
    batches = iter(first)
    taken = list(itertools.islice(batches, stop_after))  # the training loop stops here
    state = first.state_dict()
    batches.close()
    assert state["batches_done"] == min(stop_after, len(first))
    resumed = loader(99)  # another seed: the state decides
    resumed.load_state_dict(state)
    rest = list(resumed)
    order = check_epoch(taken + rest, stores)
    assert sorted(order.tolist()) == list(range(58))
    # The same epoch, uninterrupted, in the original order.
    reference = loader(11)
    for _ in range(epoch):
        list(reference)
    np.testing.assert_array_equal(order, np.concatenate([b["index"] for b in reference]))
    # The epoch after continues as it would have.
    np.testing.assert_array_equal(
        np.concatenate([b["index"] for b in resumed]),
        np.concatenate([b["index"] for b in reference]),
    )


# -------------------------------------------------- real processes: gloo ranks, DataLoader workers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, path: str, workers: int, out: str) -> None:
    """One DDP rank: two epochs of a Loader over the store, row positions gathered on rank 0."""
    import torch.distributed as dist
    import zarr
    from torch.utils.data import DataLoader

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        loader = Loader(
            chunk_size=5,
            preload_nchunks=2,
            batch_size=4,
            shuffle=True,
            return_index=True,
            to=None,
            rng=np.random.default_rng(5),
        ).add_dataset(zarr.open_group(path, mode="r")["X"])
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = (
                DataLoader(
                    loader, batch_size=None, num_workers=workers, multiprocessing_context="spawn"
                )
                if workers
                else loader
            )
            epochs.append([np.asarray(b["index"]) for b in batches])
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, epochs)
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("world_size", "workers"), [(3, 0), (2, 2)])
def test_ddp_ranks_read_disjoint_complete_shares(pool, tmp_path, world_size, workers):
    import torch.multiprocessing as mp

    store = pool.get("zarr", "dense", 103)
    out = str(tmp_path / "gathered.pkl")
    mp.spawn(
        _rank_main,
        args=(world_size, _free_port(), store.path, workers, out),
        nprocs=world_size,
        join=True,
    )
    with open(out, "rb") as f:
        gathered = pickle.load(f)  # [rank][epoch] -> list of index arrays
    shares = []
    for epoch in range(2):
        per_rank = [gathered[r][epoch] for r in range(world_size)]
        assert len({len(b) for b in per_rank}) == 1, [len(b) for b in per_rank]  # no DDP hang
        rows = np.concatenate([np.concatenate(b) for b in per_rank])
        assert set(rows.tolist()) == set(range(103))  # complete
        assert len(rows) - 103 < world_size  # disjoint, up to the padding
        shares.append(set(np.concatenate(per_rank[0]).tolist()))
    assert shares[0] != shares[1]  # rank 0 reads other rows in the next epoch


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize(
    ("stop_after", "start"),
    [(0, "forkserver"), (3, "forkserver"), (7, "spawn"), (14, "forkserver")],
)
def test_resume_under_dataloader_workers(pool, stop_after, start):
    from torch.utils.data import DataLoader

    stores = pool.many("zarr", "sparse", (37, 21))

    def loader(seed):
        lo = Loader(
            chunk_size=5,
            preload_nchunks=1,
            batch_size=3,
            shuffle=True,
            return_index=True,
            to=None,
            rng=np.random.default_rng(seed),
        ).add_anndatas([s.adata() for s in stores])
        lo.set_epoch(4)
        return lo

    def batches(lo):
        return DataLoader(
            lo, batch_size=None, num_workers=2, multiprocessing_context=worker_context(start)
        )

    first = loader(1)
    iterator = iter(batches(first))
    taken = [np.asarray(b["index"]) for b in itertools.islice(iterator, stop_after)]
    del iterator
    state = first.state_dict(batches_seen=stop_after)
    resumed = loader(2)
    resumed.load_state_dict(state)
    rest = [np.asarray(b["index"]) for b in batches(resumed)]
    order = np.concatenate(taken + rest)
    assert sorted(order.tolist()) == list(range(58))  # every row once
    uninterrupted = np.concatenate([np.asarray(b["index"]) for b in batches(loader(1))])
    np.testing.assert_array_equal(order, uninterrupted)


def test_a_sampler_without_state_cannot_be_resumed(pool):
    from annbatch.abc import Sampler

    class Plain(Sampler):
        batch_size = 4
        shuffle = False

        def n_batches(self, n_obs):
            return -(-n_obs // 4)

        def _sample(self, n_obs):
            yield {"requests": [slice(0, n_obs)]}

    loader = Loader(batch_sampler=Plain(), to=None).add_anndata(
        pool.get("memory", "dense", 9).adata()
    )
    assert sum(b["X"].shape[0] for b in loader) == 9  # iterating needs no state
    with pytest.raises(InvalidArgumentError, match="Plain cannot be resumed"):
        loader.state_dict()
