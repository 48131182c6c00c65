"""Dense output: ``Loader(dense=True)`` yields X dense whatever the datasets store, made on the
read threads: exactly the sparse batches' ``toarray()``, in their dtype, for every output kind."""

from __future__ import annotations

import importlib.util
import itertools
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from annbatch import DatasetCollection, Loader
from annbatch.errors import InvalidArgumentError

from conftest import check_epoch

HAS_JAX = importlib.util.find_spec("jax") is not None
OUTPUTS = [
    "numpy",
    "torch",
    pytest.param("jax", marks=pytest.mark.skipif(not HAS_JAX, reason="jax is not installed")),
]


def _numpy(x) -> np.ndarray:
    """A dense batch's X as numpy; anything sparse fails the test."""
    if isinstance(x, torch.Tensor):
        assert x.layout == torch.strided, x.layout
        return x.numpy()
    assert not sp.issparse(x), type(x)
    return np.asarray(x)


def _expected_type(to: str) -> type:
    if to == "torch":
        return torch.Tensor
    if to == "jax":
        import jax

        return jax.Array
    return np.ndarray


def _epoch(stores, *, seed: int = 0, **kwargs) -> list[dict]:
    loader = Loader(return_index=True, rng=np.random.default_rng(seed), **kwargs)
    return list(loader.add_anndatas([s.adata() for s in stores]))


@pytest.mark.parametrize("fmt", ["zarr", "h5ad", "memory"])
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("to", OUTPUTS)
@pytest.mark.parametrize(("batch_size", "chunk_size", "preload_nchunks"), [(1, 3, 2), (5, 3, 3)])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
def test_dense_batches_equal_the_sparse_batches_toarray(
    pool, fmt, kind, to, batch_size, chunk_size, preload_nchunks, shuffle
):
    stores = pool.many(fmt, kind, [19, 8])
    sampling = {
        "batch_size": batch_size,
        "chunk_size": chunk_size,
        "preload_nchunks": preload_nchunks,
        "shuffle": shuffle,
    }
    plain = _epoch(stores, to=None, **sampling)
    dense = _epoch(stores, to=to, dense=True, **sampling)
    assert len(dense) == len(plain)
    for got, want in zip(dense, plain, strict=True):
        np.testing.assert_array_equal(got["index"], want["index"])
        pd.testing.assert_frame_equal(got["obs"], want["obs"])
        assert isinstance(got["X"], _expected_type(to)), type(got["X"])
        x = _numpy(got["X"])
        expected = want["X"].toarray() if sp.issparse(want["X"]) else want["X"]
        assert x.dtype == expected.dtype
        np.testing.assert_array_equal(x, expected)
    # ... which are the stored rows, every one once.
    order = check_epoch([{**b, "X": _numpy(b["X"])} for b in dense], stores)
    assert sorted(order.tolist()) == list(range(27))


@pytest.mark.parametrize("strategy", ["concat-shuffle", "shuffle-concat"])
@pytest.mark.parametrize("fmt", ["zarr", "memory"])
def test_both_concat_strategies_give_the_same_dense_batches(pool, fmt, strategy):
    stores = pool.many(fmt, "sparse", [19, 8, 13])
    sampling = {"batch_size": 6, "chunk_size": 2, "preload_nchunks": 5, "shuffle": True}
    plain = _epoch(stores, to=None, concat_strategy="concat-shuffle", **sampling)
    dense = _epoch(stores, to=None, concat_strategy=strategy, dense=True, **sampling)
    for got, want in zip(dense, plain, strict=True):
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(_numpy(got["X"]), want["X"].toarray())


def test_every_batch_is_its_own_array(pool):
    """A batch is the user's to keep: no two batches overlap in memory (a group of them are
    views of one new array, each its own rows), so keeping all of them (as ``list`` does)
    leaves every one as it was yielded."""
    stores = pool.many("zarr", "sparse", [19, 8])
    batches = _epoch(stores, to=None, dense=True, batch_size=3, chunk_size=2, preload_nchunks=4)
    arrays = [b["X"] for b in batches]
    for a, b in itertools.combinations(arrays, 2):
        assert not np.shares_memory(a, b)
    check_epoch(batches, stores)


@pytest.mark.parametrize("dtype", ["float64", "int64", "int32", "uint8", "bool"])
def test_the_dense_dtype_is_the_sparse_one(dtype):
    rng = np.random.default_rng(0)
    values = (rng.random((30, 7)) < 0.4) * rng.integers(1, 9, (30, 7))
    x = sp.csr_matrix(values.astype(dtype))
    batches = list(Loader(batch_size=4, to=None, dense=True, return_index=True).add_dataset(x))
    for batch in batches:
        assert batch["X"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(batch["X"], x[batch["index"]].toarray())


def test_a_packed_collection_is_yielded_in_the_inputs_dtype_unless_stored_dtype(tmp_path):
    rng = np.random.default_rng(0)
    counts = ((rng.random((60, 40)) < 0.3) * rng.integers(1, 300, (60, 40))).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas([adata], progress=False)
    for stored_dtype, want in ((False, np.float32), (True, np.uint16)):
        loader = Loader(
            batch_size=8, to="torch", dense=True, return_index=True, stored_dtype=stored_dtype
        ).use_collection(collection)
        batches = list(loader)
        rows = np.concatenate([b["index"] for b in batches])
        got = np.concatenate([_numpy(b["X"]) for b in batches])
        assert got.dtype == want
        # the collection shuffles rows on build: compare as sets of rows
        np.testing.assert_array_equal(
            np.sort(got.astype(np.float32), axis=0), np.sort(counts, axis=0)
        )
        assert sorted(rows.tolist()) == list(range(60))


def test_dense_datasets_with_trailing_axes_are_yielded_as_without_it(pool):
    store = pool.get("zarr", "dense", 11, trailing=(2,))
    kwargs = {"batch_size": 4, "chunk_size": 3, "preload_nchunks": 2, "shuffle": True, "to": None}
    plain = Loader(return_index=True, rng=np.random.default_rng(0), **kwargs).add_dataset(store.x)
    dense = Loader(return_index=True, rng=np.random.default_rng(0), dense=True, **kwargs)
    for got, want in zip(dense.add_dataset(store.x), plain, strict=True):
        np.testing.assert_array_equal(got["index"], want["index"])
        np.testing.assert_array_equal(got["X"], store.matrix[got["index"]])
        np.testing.assert_array_equal(got["X"], want["X"])


# --------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("value", ["yes", 1, np.bool_(True), None])
def test_dense_must_be_a_bool(value):
    with pytest.raises(InvalidArgumentError, match=f"dense must be a bool, got {value!r}"):
        Loader(dense=value)


def test_dense_with_preload_to_gpu_is_refused_before_cupy_is_looked_for(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # were CuPy looked for, this would fail
    with pytest.raises(
        ValueError, match=r"dense=True cannot be combined with preload_to_gpu=True"
    ) as info:
        Loader(dense=True, preload_to_gpu=True)
    assert isinstance(info.value, InvalidArgumentError)
    assert "to_dense()" in str(info.value)


# ---------------------------------------------------------------------------------- workers
@pytest.mark.slow
def test_dense_batches_under_dataloader_workers(pool):
    stores = pool.many("zarr", "sparse", [41, 30])
    loader = Loader(
        chunk_size=2,
        preload_nchunks=8,
        batch_size=8,
        shuffle=True,
        return_index=True,
        dense=True,
        rng=np.random.default_rng(0),
    ).add_anndatas([s.adata() for s in stores])
    dl = DataLoader(loader, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    batches = list(dl)
    assert all(b["X"].layout == torch.strided for b in batches)
    assert sorted(check_epoch(batches, stores).tolist()) == list(range(71))
