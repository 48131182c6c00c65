"""Bad input gets a clear error before anything is read."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from annbatch import Loader
from annbatch.errors import (
    AnnbatchError,
    ClosedDatasetError,
    IncompatibleDatasetsError,
    InvalidArgumentError,
    LoaderBusyError,
    ObsMismatchError,
    UnsupportedDatasetError,
)


@pytest.fixture
def loader() -> Loader:
    return Loader(chunk_size=4, preload_nchunks=2, batch_size=4, to=None)


def test_different_column_counts(pool, loader):
    a = pool.get("zarr", "dense", 10).x
    b = zarr.create_array(zarr.storage.MemoryStore(), shape=(5, 7), dtype="float32")
    loader.add_dataset(a)
    with pytest.raises(
        IncompatibleDatasetsError,
        match=r"dataset 1 \(zarr.Array .*\) has 7 columns; the Loader's datasets have 6",
    ):
        loader.add_dataset(b)
    assert loader.n_obs == 10, "a rejected dataset must not be added"


def test_different_column_counts_within_one_call(loader):
    with pytest.raises(
        IncompatibleDatasetsError, match=r"dataset 1 .* has 3 columns; the Loader's datasets have 2"
    ):
        loader.add_datasets([np.zeros((3, 2), np.float32), np.zeros((3, 3), np.float32)])
    assert loader.n_obs == 0


def test_mixed_dataset_types(pool, loader):
    loader.add_dataset(pool.get("zarr", "dense", 10).x)
    with pytest.raises(
        IncompatibleDatasetsError,
        match=r"dataset 1 .* has type anndata.abc.CSRDataset; the Loader's datasets have type zarr.Array",
    ):
        loader.add_dataset(pool.get("zarr", "sparse", 10).x)
    with pytest.raises(
        IncompatibleDatasetsError,
        match=r"has type h5py\.Dataset; the Loader's datasets have type zarr.Array",
    ):
        loader.add_dataset(pool.get("h5ad", "dense", 10).x)


def test_mixed_dtypes_warn(loader):
    # Promoted (the reference's current API), with a warning that names both dtypes.
    loader.add_dataset(np.zeros((3, 2), np.float32))
    with pytest.warns(
        UserWarning,
        match="has dtype float64, the Loader's earlier datasets float32: batches are yielded as float64",
    ):
        loader.add_dataset(np.zeros((3, 2), np.float64))


@pytest.mark.parametrize("n_obs_rows", [9, 11, 0])
def test_obs_length_differs(pool, loader, n_obs_rows):
    store = pool.get("h5ad", "sparse", 10)
    with pytest.raises(
        ObsMismatchError, match=f"obs of dataset 0 .* has {n_obs_rows} rows; the dataset has 10"
    ):
        loader.add_dataset(
            store.x,
            obs=store.obs.iloc[:n_obs_rows]
            if n_obs_rows <= 10
            else pd.concat([store.obs, store.obs.iloc[:1]]),
        )


def test_obs_count_differs_from_datasets(pool, loader):
    store = pool.get("zarr", "dense", 10)
    with pytest.raises(ObsMismatchError, match="got 2 datasets but 1 obs tables"):
        loader.add_datasets([store.x, store.x], obs=[store.obs])


def test_obs_for_some_datasets_only(pool, loader):
    store = pool.get("zarr", "dense", 10)
    loader.add_dataset(store.x, obs=store.obs)
    with pytest.raises(
        ObsMismatchError,
        match=r"dataset 1 .* has no obs but the Loader's earlier datasets have obs",
    ):
        loader.add_dataset(store.x)


def test_obs_not_a_dataframe(pool, loader):
    store = pool.get("zarr", "dense", 10)
    with pytest.raises(ObsMismatchError, match=r"is a ndarray; expected a pandas.DataFrame"):
        loader.add_dataset(store.x, obs=np.arange(10))


@pytest.mark.parametrize("fmt", ["csc", "coo"])
def test_scipy_csc_or_coo(loader, fmt):
    matrix = sp.random(10, 4, density=0.5, format=fmt)
    with pytest.raises(
        UnsupportedDatasetError,
        match=f"dataset 0 is a scipy.sparse matrix in {fmt.upper()} format; expected CSR",
    ):
        loader.add_dataset(matrix)


@pytest.mark.parametrize("fmt", ["zarr", "h5ad"])
def test_on_disk_csc(tmp_path, loader, fmt):
    matrix = sp.random(10, 4, density=0.5, format="csc", dtype=np.float32)
    if fmt == "zarr":
        group = zarr.open_group(tmp_path / "csc.zarr", mode="w")
        ad.io.write_elem(group, "X", matrix)
        x = ad.io.sparse_dataset(group["X"])
        with pytest.raises(
            UnsupportedDatasetError,
            match="dataset 0 is a CSC matrix; the Loader reads rows and needs CSR",
        ):
            loader.add_dataset(x)
    else:
        with h5py.File(tmp_path / "csc.h5ad", "w") as f:
            ad.io.write_elem(f, "X", matrix)
            with pytest.raises(UnsupportedDatasetError, match="needs CSR"):
                loader.add_dataset(ad.io.sparse_dataset(f["X"]))


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (np.zeros(5), r"has shape \(5,\); expected at least 2 dimensions"),
        ([[1, 2]], "is a builtins.list; expected one of zarr.Array"),
        (pd.DataFrame({"a": [1]}), "is a pandas.core.frame.DataFrame; expected one of"),
    ],
)
def test_unsupported_objects(loader, obj, match):
    with pytest.raises(UnsupportedDatasetError, match=match):
        loader.add_dataset(obj)


def test_sparse_group_is_opened_as_anndata_opens_it(pool, tmp_path):
    """A group anndata wrote a CSR matrix into (X, a layer) reads as that matrix; any other
    group is refused."""
    stored = pool.get("zarr", "sparse", 10)
    loader = Loader(batch_size=4, shuffle=False, to=None).add_dataset(stored.x.group)
    rows = np.concatenate([b["X"].toarray() for b in loader])
    np.testing.assert_array_equal(rows, stored.matrix.toarray())
    other = zarr.open_group(tmp_path / "g.zarr", mode="w")
    with pytest.raises(UnsupportedDatasetError, match="is a Group that holds no array"):
        Loader().add_dataset(other)


def test_anndata_without_x(loader):
    with pytest.raises(InvalidArgumentError, match="anndata 0 has no X"):
        loader.add_anndata(ad.AnnData(obs=pd.DataFrame(index=["a"])))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, "chunk_size must be a positive integer, got 0"),
        ({"preload_nchunks": 0}, "preload_nchunks must be a positive integer, got 0"),
        ({"batch_size": -4}, "batch_size must be a positive integer, got -4"),
        (
            {"chunk_size": 3, "preload_nchunks": 3, "batch_size": 10},
            r"batch_size \(10\) is larger than one preload window, chunk_size \* preload_nchunks \(3 \* 3 = 9\)",
        ),
        (
            {"concat_strategy": "concat"},
            "concat_strategy must be one of .*'concat-shuffle', 'shuffle-concat'.* got 'concat'",
        ),
        ({"to": "tensorflow"}, "to must be 'torch', 'jax', 'numpy' or None"),
        ({"to": "torch", "to_torch": False}, "pass either to='torch' or to_torch=False, not both"),
        ({"to": None, "to_torch": False}, "pass either to=None or to_torch=False, not both"),
        ({"to_torch": "yes"}, "to_torch must be a bool"),
        ({"return_index": 1}, "return_index must be a bool"),
        ({"batch_sampler": "chunks"}, "batch_sampler must be an annbatch.abc.Sampler, got str"),
    ],
)
def test_bad_loader_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Loader(**kwargs)


@pytest.mark.parametrize(
    "given",
    [["chunk_size"], ["batch_size", "shuffle"], ["preload_nchunks", "drop_last", "rng"]],
)
def test_sampler_arguments_with_batch_sampler(given):
    from annbatch import ChunkSampler

    values = {
        "chunk_size": 4,
        "preload_nchunks": 2,
        "batch_size": 2,
        "shuffle": False,
        "drop_last": False,
        "rng": np.random.default_rng(),
    }
    kwargs = {name: values[name] for name in given}
    with pytest.raises(
        InvalidArgumentError, match=f"batch_sampler is given, so {', '.join(given)} must not be"
    ):
        Loader(batch_sampler=ChunkSampler(), **kwargs)


def test_adding_while_iterating(pool, loader):
    store = pool.get("zarr", "dense", 10)
    loader.add_anndata(store.adata())
    iterator = iter(loader)
    next(iterator)
    with pytest.raises(LoaderBusyError, match="cannot add data while the Loader is being iterated"):
        loader.add_anndata(store.adata())
    iterator.close()
    loader.add_anndata(store.adata())
    assert loader.n_obs == 20


def test_adding_after_break_is_allowed(pool, loader):
    store = pool.get("zarr", "dense", 10)
    loader.add_anndata(store.adata())
    for _ in loader:
        break
    loader.add_anndata(store.adata())
    assert loader.n_obs == 20


def _h5ad_x(path, kind):
    """Write a small X to ``path`` and return it opened read-only (dense, or as a CSRDataset)."""
    matrix = (
        np.ones((6, 3), np.float32)
        if kind == "dense"
        else sp.csr_matrix(np.eye(6, 3, dtype=np.float32))
    )
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "X", matrix)
    f = h5py.File(path, "r")
    return f, (f["X"] if kind == "dense" else ad.io.sparse_dataset(f["X"]))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_h5ad_file_closed_before_adding(tmp_path, loader, kind):
    f, x = _h5ad_x(tmp_path / "closed.h5ad", kind)
    f.close()
    with pytest.raises(
        ClosedDatasetError, match="dataset 0 belongs to an HDF5 file that has been closed"
    ):
        loader.add_dataset(x)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_h5ad_file_closed_before_iterating(tmp_path, loader, kind):
    f, x = _h5ad_x(tmp_path / "closed.h5ad", kind)
    loader.add_dataset(x)
    f.close()
    with pytest.raises(
        ClosedDatasetError,
        match=r"belongs to an HDF5 file that has been closed; keep the h5py.File",
    ):
        iter(loader)


def test_iterating_without_data(loader):
    with pytest.raises(InvalidArgumentError, match="the Loader has no data"):
        iter(loader)


def test_errors_are_catchable_as_builtins():
    with pytest.raises(ValueError, match="chunk_size"):
        Loader(chunk_size=0)
    with pytest.raises(AnnbatchError):
        Loader(chunk_size=0)
    with pytest.raises(TypeError):
        Loader().add_dataset([1, 2])
