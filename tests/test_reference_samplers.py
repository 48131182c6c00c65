"""The reference library's current samplers and sampler contract (REFERENCE_CURRENT_API.md):
RandomSampler, SequentialSampler, DistributedSampler, ClassSampler, WeightedClassSampler, the
dict form of load requests, and abc.Sampler's n_batches / n_iters / mask / validate / rng."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annbatch import ChunkSampler, Loader
from annbatch.abc import Sampler
from annbatch.errors import ArgumentTypeError, DistributedNotInitializedError
from annbatch.samplers import (
    ClassSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    WeightedClassSampler,
)

from conftest import check_epoch


def _batches(sampler: Sampler, n_obs: int) -> list[np.ndarray]:
    """The global rows of every batch of one epoch, in yield order."""
    out = []
    for request in sampler.sample(n_obs):
        assert type(request) is dict  # a plain dict (types.LoadRequest), splits filled in
        rows = np.concatenate([np.arange(c.start, c.stop) for c in request["requests"]])
        out.extend(rows[s] for s in request["splits"])
    return out


def _loader(sampler: Sampler, x: np.ndarray) -> list[np.ndarray]:
    loader = Loader(batch_sampler=sampler, to=None, return_index=True).add_dataset(x)
    out = []
    for batch in loader:
        np.testing.assert_array_equal(batch["X"], x[batch["index"]])  # rows equal the stored rows
        out.append(batch["index"])
    return out


X = np.arange(300 * 2, dtype=np.float32).reshape(300, 2)


# ------------------------------------------------------------------ Sequential / Random
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_obs=st.integers(0, 120),
    chunk=st.integers(1, 9),
    nchunks=st.integers(1, 4),
    data=st.data(),
    drop_last=st.booleans(),
    mask=st.one_of(st.none(), st.tuples(st.integers(0, 60), st.integers(1, 60))),
)
def test_random_and_sequential_each_row_once(n_obs, chunk, nchunks, data, drop_last, mask):
    batch = data.draw(st.integers(1, chunk * nchunks))
    if mask is not None:
        start = min(mask[0], max(0, n_obs - 1))
        mask = slice(start, min(n_obs, start + mask[1])) if n_obs > start else None
    rows = np.arange(n_obs)[mask] if mask is not None else np.arange(n_obs)
    seq = SequentialSampler(chunk, nchunks, batch, drop_last=drop_last, mask=mask)
    rnd = RandomSampler(
        chunk,
        nchunks,
        batch,
        drop_last=drop_last,
        mask=mask,
        rng=np.random.default_rng(data.draw(st.integers(0, 9))),
    )
    n_keep = rows.size - rows.size % batch if drop_last else rows.size
    for sampler in (seq, rnd):
        batches = _batches(sampler, n_obs)
        assert len(batches) == sampler.n_batches(n_obs)
        got = np.concatenate(batches) if batches else np.empty(0, int)
        assert all(b.size == batch for b in batches[:-1])
        if sampler is seq:
            np.testing.assert_array_equal(got, rows[:n_keep])
        else:
            assert got.size == n_keep
            assert np.unique(got).size == n_keep
            assert np.isin(got, rows).all()
            if not drop_last:
                assert sorted(got.tolist()) == rows.tolist()


@settings(max_examples=40, deadline=None)
@given(
    n_obs=st.integers(1, 100),
    chunk=st.integers(1, 8),
    num=st.integers(1, 250),
    seed=st.integers(0, 99),
)
def test_random_with_replacement_draws_num_samples(n_obs, chunk, num, seed):
    sampler = RandomSampler(
        chunk, 5, 5, replacement=True, num_samples=num, rng=np.random.default_rng(seed)
    )
    batches = _batches(sampler, n_obs)
    got = np.concatenate(batches)
    assert got.size == num
    assert len(batches) == sampler.n_batches(n_obs) == -(-num // 5)
    assert got.min() >= 0
    assert got.max() < n_obs
    # Whole chunks are read: every range lies within one chunk of the grid.
    for request in sampler.sample(n_obs):
        assert all(c.start // chunk == (c.stop - 1) // chunk for c in request["requests"])


def test_random_num_samples_without_replacement():
    sampler = RandomSampler(10, 2, 4, num_samples=33, rng=np.random.default_rng(0))
    got = np.concatenate(_batches(sampler, 100))
    assert got.size == 33
    assert np.unique(got).size == 33
    assert len(_loader(sampler, X[:100])) == sampler.n_batches(100) == 9
    with pytest.raises(ValueError, match=r"num_samples \(101\) is more than the 100 rows"):
        list(RandomSampler(10, 2, 4, num_samples=101).sample(100))
    with pytest.raises(ValueError, match=r"num_samples \(30\) is more than the 20 rows"):
        RandomSampler(10, 2, 4, num_samples=30, mask=slice(0, 20)).validate(100)


def test_replacement_repeats_rows_through_the_loader():
    # 40 rows drawn 4 times over: rows repeat within windows and the engine reads them right.
    sampler = RandomSampler(
        8, 4, 16, replacement=True, num_samples=160, rng=np.random.default_rng(3)
    )
    got = np.concatenate(_loader(sampler, X[:40]))
    assert got.size == 160
    assert np.unique(got).size < 160


def test_loader_builds_the_reference_samplers():
    shuffled = Loader(
        chunk_size=4, preload_nchunks=2, batch_size=3, shuffle=True, rng=np.random.default_rng(0)
    )
    plain = Loader(chunk_size=4, preload_nchunks=2, batch_size=3, drop_last=True)
    assert type(shuffled.batch_sampler) is RandomSampler
    assert type(plain.batch_sampler) is SequentialSampler
    assert isinstance(shuffled.batch_sampler, ChunkSampler)  # our engine, resume and workers
    assert plain.batch_sampler.drop_last
    assert len(plain.add_dataset(X[:20])) == 6


def test_random_sampler_resumes():
    def make() -> Loader:
        sampler = RandomSampler(5, 2, 4, rng=np.random.default_rng(11))
        return Loader(batch_sampler=sampler, to=None, return_index=True).add_dataset(X[:50])

    full = [b["index"].tolist() for b in make()]
    loader = make()
    it = iter(loader)
    first = [next(it)["index"].tolist() for _ in range(4)]
    state = loader.state_dict()
    it.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert first + [b["index"].tolist() for b in resumed] == full


# ------------------------------------------------------------------------ Distributed
@settings(max_examples=50, deadline=None)
@given(
    n_obs=st.integers(1, 150),
    world=st.integers(1, 4),
    batch=st.integers(1, 6),
    equal=st.booleans(),
    shuffle=st.booleans(),
    mask=st.one_of(st.none(), st.integers(0, 30)),
)
def test_distributed_shares_are_disjoint_and_equal(n_obs, world, batch, equal, shuffle, mask):
    mask = slice(mask, n_obs) if mask is not None and mask < n_obs else None
    allowed = np.arange(n_obs)[mask] if mask is not None else np.arange(n_obs)
    per_rank = []
    for rank in range(world):
        inner = (
            RandomSampler(4, 3, batch, mask=mask, rng=np.random.default_rng(rank))
            if shuffle
            else SequentialSampler(4, 3, batch, mask=mask)
        )
        sampler = DistributedSampler(
            inner, dist_info=lambda rank=rank: (rank, world), enforce_equal_batches=equal
        )
        per = allowed.size // world
        if (equal and per - per % batch == 0) or (
            not equal and (rank + 1) * allowed.size // world == rank * allowed.size // world
        ):
            with pytest.raises(ValueError, match=f"rank {rank} of {world} gets no rows"):
                sampler.n_batches(n_obs)
            return
        batches = _batches(sampler, n_obs)
        assert len(batches) == sampler.n_batches(n_obs)
        per_rank.append(np.concatenate(batches))
    every = np.concatenate(per_rank)
    assert np.unique(every).size == every.size  # disjoint
    assert np.isin(every, allowed).all()
    if equal:
        sizes = {r.size for r in per_rank}
        assert len(sizes) == 1
        assert sizes.pop() % batch == 0
    else:
        assert sorted(every.tolist()) == allowed.tolist()


def test_distributed_dist_info_errors():
    inner = SequentialSampler(4, 2, 2)
    with pytest.raises(
        DistributedNotInitializedError, match=r"torch.distributed is not initialized"
    ):
        DistributedSampler(inner, dist_info="torch")
    with pytest.raises(RuntimeError, match=r"jax.distributed is not initialized"):
        DistributedSampler(inner, dist_info="jax")
    with pytest.raises(ValueError, match="dist_info must be 'torch', 'jax' or a callable"):
        DistributedSampler(inner, dist_info="mpi")
    with pytest.raises(ValueError, match=r"must return \(rank, world_size\)"):
        DistributedSampler(inner, dist_info=lambda: (3, 2))
    with pytest.raises(TypeError, match=r"wraps an annbatch.abc.Sampler"):
        DistributedSampler("sampler")  # type: ignore[arg-type]


def test_distributed_through_loader_and_pickle():
    sampler = DistributedSampler(
        RandomSampler(5, 2, 5, rng=np.random.default_rng(0)), dist_info=lambda: (1, 2)
    )
    got = np.concatenate(_loader(pickle.loads(pickle.dumps(sampler)), X[:53]))
    assert sorted(got.tolist()) == list(
        range(25, 50)
    )  # rank 1's share: rows 25..49 (26 rows cut to 25)


# ---------------------------------------------------------------------- class samplers
def _grouped(sizes: dict[str, int]) -> pd.Categorical:
    return pd.Categorical(np.repeat(list(sizes), list(sizes.values())), categories=list(sizes))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(6, 40), min_size=1, max_size=4),
    weights=st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=4, max_size=4).filter(any),
    chunk=st.integers(1, 6),
    batch=st.integers(1, 7),
    num=st.integers(1, 200),
    seed=st.integers(0, 9),
    drop_last=st.booleans(),
)
def test_class_sampler_batches_are_one_class(sizes, weights, chunk, batch, num, seed, drop_last):
    classes = _grouped({f"c{i}": n for i, n in enumerate(sizes)})
    w = np.array(weights[: len(sizes)])
    if not w.any():
        w[0] = 1.0
    nchunks = -(-batch // chunk) + 1
    sampler = ClassSampler(
        chunk,
        nchunks,
        batch,
        classes=classes,
        num_samples=num,
        class_weights=w,
        rng=np.random.default_rng(seed),
        drop_last=drop_last,
    )
    batches = _batches(sampler, len(classes))
    assert len(batches) == sampler.n_batches(len(classes))
    got = np.concatenate(batches) if batches else np.empty(0, int)
    assert got.size == (num - num % batch if drop_last else num)
    for b in batches:
        assert len(set(classes[b])) == 1  # one class per batch
        assert w[classes.codes[b[0]]] > 0  # never a class of weight 0
    assert all(b.size == batch for b in batches[:-1])


@pytest.mark.parametrize("cls", [ClassSampler, WeightedClassSampler])
def test_class_frequencies_follow_weights(cls):
    classes = _grouped({"a": 400, "b": 400, "c": 400})
    sampler = cls(
        8,
        4,
        16,
        classes=classes,
        num_samples=48_000,
        class_weights={"a": 1, "b": 3},
        rng=np.random.default_rng(0),
    )
    got = np.concatenate(_batches(sampler, 1200))
    share = np.bincount(classes.codes[got], minlength=3) / got.size
    # a: 1/4, b: 3/4, c: never; 48k rows in windows of 32 give 1,500 class draws: sd ~ 0.011.
    np.testing.assert_allclose(share, [0.25, 0.75, 0.0], atol=0.05)
    if cls is WeightedClassSampler:  # batches mix classes in proportion
        mixed = [b for b in _batches(sampler, 1200) if len(set(classes[b])) > 1]
        assert len(mixed) > 0.5 * (48_000 // 16)


def test_class_sampler_through_loader_on_a_store(pool):
    stores = [pool.get("zarr", "sparse", 30), pool.get("h5ad", "sparse", 30)]
    classes = _grouped({"x": 20, "y": 25, "z": 15})
    sampler = ClassSampler(5, 2, 5, classes=classes, num_samples=100, rng=np.random.default_rng(2))
    loader = Loader(batch_sampler=sampler, to=None, return_index=True).add_anndatas(
        [s.adata() for s in stores]
    )
    batches = list(loader)
    order = check_epoch(batches, stores)  # values and obs match the stored rows
    assert order.size == 100
    assert len(batches) == len(loader) == 20
    assert all(len(set(classes[b["index"]])) == 1 for b in batches)


def test_class_sampler_errors():
    with pytest.raises(TypeError, match=r"classes must be a pandas.Categorical"):
        ClassSampler(4, 2, 4, classes=np.array(["a"] * 8), num_samples=8)
    with pytest.raises(ArgumentTypeError):
        ClassSampler(4, 2, 4, classes=pd.Series(["a"] * 8), num_samples=8)
    with pytest.raises(ValueError, match="1 missing values"):
        ClassSampler(4, 2, 4, classes=pd.Categorical(["a"] * 7 + [None]), num_samples=8)
    with pytest.raises(ValueError, match="no positive weight"):
        ClassSampler(4, 2, 4, classes=_grouped({"a": 8}), num_samples=8, class_weights=[0.0])
    with pytest.raises(
        ValueError, match=r"classes \['b'\] come in runs shorter than chunk_size \(4\)"
    ):
        ClassSampler(4, 2, 4, classes=pd.Categorical(list("aaaabbbaaaab")), num_samples=8)
    # A class of weight 0 may be scattered: it is never drawn.
    ClassSampler(
        4, 2, 4, classes=pd.Categorical(list("aaaabbbaaaab")), num_samples=8, class_weights={"a": 1}
    )
    with pytest.raises(ValueError, match="classes has 8 entries; the Loader has 9 rows"):
        ClassSampler(4, 2, 4, classes=_grouped({"a": 8}), num_samples=8).validate(9)


# ------------------------------------------------------------- the sampler contract
class DictSampler(Sampler):
    """A user's sampler in the reference's style: plain dicts, no n_batches."""

    def __init__(self, requests: list[dict]) -> None:
        self._requests = requests

    @property
    def batch_size(self) -> int:
        return 3

    @property
    def shuffle(self) -> bool:
        return False

    def _sample(self, n_obs):
        yield from self._requests


def test_dict_requests_slices_and_positions():
    sampler = DictSampler(
        [
            {
                "requests": [slice(10, 15), slice(0, 3)],
                "splits": [np.array([0, 5]), np.array([6, 7, 1])],
            },
            {"requests": np.array([50, 3, 3, 99]), "splits": [np.array([3, 1, 2, 0])]},
            {"requests": [slice(20, 27)]},  # no splits: batch_size rows at a time, in order
            {"requests": np.array([7, 5])},
        ]
    )
    got = [b.tolist() for b in _loader(sampler, X[:100])]
    assert got == [[10, 0], [1, 2, 11], [99, 3, 3, 50], [20, 21, 22], [23, 24, 25], [26], [7, 5]]
    assert sampler.n_batches(100) == 7


def test_dict_requests_old_key_and_errors():
    with pytest.warns(DeprecationWarning, match="'chunks' key of a load request is deprecated"):
        assert [b.tolist() for b in _loader(DictSampler([{"chunks": [slice(0, 2)]}]), X)] == [
            [0, 1]
        ]
    bad = [
        ({"requests": [slice(0, 2)], "chunks": [slice(0, 2)]}, "both 'requests' and 'chunks'"),
        ({"splits": []}, "has no 'requests' key"),
        ({"requests": [slice(3, 3)]}, "empty request"),
        ({"requests": [slice(0, 400)]}, "expected 0 <= start <= stop <= n_obs = 300"),
        ({"requests": np.array([1.5])}, "expected a 1-D integer array of rows"),
        ({"requests": np.array([300])}, "rows outside 0..299"),
        ({"requests": np.array([1, 2]), "splits": [np.array([2])]}, r"positions outside 0..1"),
        ({"requests": [slice(0, 2)], "batch": 1}, "unknown keys"),
        (["not", "a", "dict"], "is a list"),
    ]
    for request, match in bad:
        with pytest.raises(ValueError, match=match):
            _loader(DictSampler([request]), X)


def test_sampler_base_gives_n_iters_mask_rng_validate():
    sampler = DictSampler([{"requests": [slice(0, 7)]}])
    with pytest.warns(DeprecationWarning, match="n_iters is deprecated"):
        assert sampler.n_iters(300) == 3
    assert sampler.mask is None
    sampler.mask = slice(2, 9)
    assert sampler.mask == slice(2, 9)
    for bad in (slice(0, 9, 2), slice(-1, 3), slice(5, 5), slice(6, 2)):
        with pytest.raises(ValueError, match="mask slice"):
            sampler.mask = bad
    with pytest.raises(ValueError, match="reaches past the Loader's 5 rows"):
        sampler.validate(5)
    rng = np.random.default_rng(0)
    sampler.rng = rng
    assert sampler.rng is rng


def test_our_samplers_take_a_mask_and_rng_after_construction():
    sampler = RandomSampler(5, 2, 5)
    sampler.mask = slice(10, 30)
    sampler.rng = np.random.default_rng(4)
    first = np.concatenate(_batches(sampler, 50))
    assert sorted(first.tolist()) == list(range(10, 30))
    sampler.rng = np.random.default_rng(4)  # the same generator state: the same epoch again
    np.testing.assert_array_equal(np.concatenate(_batches(sampler, 50)), first)


# ------------------------------------------ DistributedSampler in real torch.distributed ranks
def _ddp_rank(rank: int, world_size: int, port: int, out: str) -> None:
    """One gloo rank: an epoch through DistributedSampler(dist_info="torch"), gathered."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        inner = RandomSampler(4, 3, 5, rng=np.random.default_rng(rank))
        sampler = DistributedSampler(inner, dist_info="torch")
        batches = _loader(sampler, X[:103])
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (sampler.rank, sampler.world_size, batches))
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_sampler_reads_torch_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gathered.pkl")
    mp.spawn(_ddp_rank, args=(3, port, out), nprocs=3, join=True)
    with open(out, "rb") as f:
        gathered = pickle.load(f)
    assert [(r, w) for r, w, _ in gathered] == [(0, 3), (1, 3), (2, 3)]
    per_rank = [np.concatenate(b) for _, _, b in gathered]
    # 103 rows: shares of 34 cut to 30 (whole batches of 5), contiguous and disjoint.
    assert [len(b) for _, _, b in gathered] == [6, 6, 6]
    for r, rows in enumerate(per_rank):
        assert sorted(rows.tolist()) == list(range(30 * r, 30 * r + 30))


def test_replacement_without_num_samples_draws_as_many_rows_with_repeats():
    sampler = RandomSampler(1, 8, 4, replacement=True, rng=np.random.default_rng(0))
    got = np.concatenate(_batches(sampler, 40))
    assert got.size == 40
    assert np.unique(got).size < 40  # drawn with replacement: some rows repeat


def test_a_mask_past_the_rows_is_an_error():
    with pytest.raises(ValueError, match="holds none of the Loader's 40 rows"):
        list(SequentialSampler(5, 2, 5, mask=slice(50, None)).sample(40))
