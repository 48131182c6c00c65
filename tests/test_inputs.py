"""Every supported input, the Loader's attributes, and the alternative spellings."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from annbatch import Loader, load_x_and_obs

from conftest import check_epoch, to_numpy


@pytest.mark.parametrize(
    ("fmt", "kind", "expected_type"),
    [
        ("zarr", "dense", zarr.Array),
        ("zarr", "sparse", ad.abc.CSRDataset),
        ("h5ad", "dense", h5py.Dataset),
        ("h5ad", "sparse", ad.abc.CSRDataset),
        ("memory", "dense", np.ndarray),
        ("memory", "sparse", sp.csr_matrix),
    ],
)
def test_attributes(pool, fmt, kind, expected_type):
    stores = pool.many(fmt, kind, [10, 25])
    loader = Loader(to=None).add_anndatas([s.adata() for s in stores])
    assert loader.dataset_type is expected_type
    assert loader.n_obs == 35
    assert loader.n_var == 6


def test_attributes_before_data():
    loader = Loader()
    assert (loader.n_obs, loader.dataset_type, loader.var) == (0, None, None)
    with pytest.raises(ValueError, match="no data yet, so no n_var"):
        _ = loader.n_var


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_yielded_cpu_types(pool, kind):
    store = pool.get("zarr", kind, 10)
    batch = next(iter(Loader(batch_size=4, to=None).add_anndata(store.adata())))
    assert type(batch["X"]) is (np.ndarray if kind == "dense" else sp.csr_matrix)


def test_scipy_csr_array_input(pool):
    store = pool.get("memory", "sparse", 12)
    loader = Loader(batch_size=4, return_index=True, to=None)
    batches = list(loader.add_dataset(sp.csr_array(store.matrix), obs=store.obs))
    check_epoch(batches, [store])
    assert loader.dataset_type is sp.csr_array


@pytest.mark.parametrize("fmt", ["zarr", "h5ad", "memory"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("strategy", ["concat-shuffle", "shuffle-concat"])
def test_nd_dense_streams_along_axis_0(pool, fmt, shuffle, strategy):
    stores = [pool.get(fmt, "dense", n, trailing=(3,)) for n in (9, 14)]
    loader = Loader(
        chunk_size=2,
        preload_nchunks=3,
        batch_size=3,
        shuffle=shuffle,
        return_index=True,
        to=None,
        concat_strategy=strategy,
        rng=np.random.default_rng(0),
    ).add_datasets([s.x for s in stores], obs=[s.obs for s in stores])  # AnnData's X is 2-D only
    assert loader.n_var == 6
    batches = list(loader)
    assert all(b["X"].shape[1:] == (6, 3) for b in batches)
    order = check_epoch(batches, stores)
    assert sorted(order) == list(range(23))


@pytest.mark.parametrize("fmt", ["zarr", "h5ad"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_load_x_and_obs(pool, fmt, kind):
    store = pool.get(fmt, kind, 17)
    root = zarr.open_group(store.path, mode="r") if fmt == "zarr" else store.handles[0]
    adata = load_x_and_obs(root)
    assert adata.n_obs == 17
    assert isinstance(adata.X, zarr.Array | h5py.Dataset | ad.abc.CSRDataset)
    loader = Loader(
        chunk_size=4, preload_nchunks=2, batch_size=4, return_index=True, to=None
    ).add_anndata(adata)
    check_epoch(list(loader), [store])


def test_load_x_and_obs_rejects_non_stores(tmp_path):
    from annbatch.errors import UnsupportedDatasetError

    with pytest.raises(UnsupportedDatasetError, match=r"expected a zarr.Group or h5py.Group"):
        load_x_and_obs(np.zeros((3, 3)))
    with pytest.raises(UnsupportedDatasetError, match=r"is not a zarr group \(expected the root"):
        load_x_and_obs(tmp_path / "nowhere")
    group = zarr.open_group(tmp_path / "empty.zarr", mode="w")
    with pytest.raises(
        UnsupportedDatasetError, match="is not an AnnData store: it has no X or obs"
    ):
        load_x_and_obs(group)


def test_written_anndata_round_trip(tmp_path):
    """The README's recipe: write with anndata, open with load_x_and_obs, stream."""
    rng = np.random.default_rng(0)
    x = sp.random(300, 50, density=0.1, format="csr", dtype=np.float32, rng=rng)
    adata = ad.AnnData(X=x, obs={"cell_type": rng.choice(["a", "b"], 300)})
    adata.obs_names = [f"c{i}" for i in range(300)]
    adata.write_zarr(tmp_path / "a.zarr")
    adata.write_h5ad(tmp_path / "a.h5ad")
    with h5py.File(tmp_path / "a.h5ad", "r") as f:
        for root in (zarr.open_group(tmp_path / "a.zarr", mode="r"), f):
            loader = Loader(
                batch_size=32,
                chunk_size=8,
                preload_nchunks=8,
                shuffle=True,
                return_index=True,
                to=None,
            )
            loader.add_anndata(load_x_and_obs(root))
            seen = []
            for batch in loader:
                np.testing.assert_array_equal(batch["X"].toarray(), x[batch["index"]].toarray())
                assert list(batch["obs"].index) == [f"c{i}" for i in batch["index"]]
                seen.append(batch["index"])
            assert sorted(np.concatenate(seen)) == list(range(300))


def test_alternative_spellings(pool):
    stores = pool.many("zarr", "sparse", [10, 5])
    a = (
        Loader(batch_size=4, to="torch", return_index=True)
        .add_adata(stores[0].adata())
        .add_adatas([stores[1].adata()])
    )
    b = Loader(batch_size=4, to="torch", return_index=True).add_anndatas(
        [s.adata() for s in stores]
    )
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(to_numpy(x["X"]), to_numpy(y["X"]))
    with pytest.warns(DeprecationWarning, match="to_torch is deprecated"):
        c = Loader(batch_size=4, to_torch=True, return_index=True).add_anndatas(
            [s.adata() for s in stores]
        )
    for x, y in zip(b, c, strict=True):
        np.testing.assert_array_equal(to_numpy(x["X"]), to_numpy(y["X"]))
    numpy_loader = Loader(batch_size=4, to="numpy").add_adata(stores[0].adata())
    assert sp.issparse(next(iter(numpy_loader))["X"])


def test_methods_chain(pool):
    store = pool.get("memory", "dense", 8)
    loader = Loader(to=None)
    assert loader.add_dataset(store.x, store.obs) is loader
    assert loader.add_datasets([store.x], [store.obs]) is loader
    assert loader.add_anndata(store.adata()) is loader is loader.add_anndatas([])
