"""AnnData files in older encodings, written by others, build into collections, load through the
Loader with the values anndata reads, and verify.

The files (see ``tests/_real_files.py``) come from released packages: scanpy 1.7.2's wheel
(pre-0.7 encodings: compound obs/var/obsm/varm, categories in uns, h5sparse groups) and
anndata 0.10.9's sdist (files written by anndata 0.7.0 and 0.7.8). A file written here with
h5py (``tests/_legacy.py``) adds what those lack: a compound obsm next to h5sparse X and layers.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from tests import _real_files as real
from tests._legacy import write_legacy_h5ad

from annbatch import DatasetCollection, Loader, load_x_and_obs, verify
from annbatch._cli import main as cli
from annbatch.collection import SOURCE_COLUMN
from annbatch.errors import IncompatibleDatasetsError

if TYPE_CHECKING:
    from pathlib import Path


def _read(path: Path) -> ad.AnnData:
    """The file as anndata itself reads it, whole."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on old encodings
        return ad.read_h5ad(path) if path.suffix == ".h5ad" else ad.read_zarr(path)


def _dense(x: Any) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _stream(datasets: list[Any], obs: list[pd.DataFrame]) -> tuple[np.ndarray, pd.DataFrame]:
    """Every row of ``datasets`` through a shuffling Loader: (values, obs), in the order read."""
    loader = Loader(batch_size=64, chunk_size=16, preload_nchunks=8, shuffle=True, to=None)
    loader.add_datasets(datasets, obs)
    batches = list(loader)
    values = np.concatenate([_dense(b["X"]) for b in batches])
    return values, pd.concat([b["obs"] for b in batches])


def _open(group: Any, path: str) -> Any:
    elem = group[path]
    return ad.io.sparse_dataset(elem) if isinstance(elem, h5py.Group | zarr.Group) else elem


def _check_collection(collection: DatasetCollection, expected: ad.AnnData, obsm: list[str]) -> None:
    """Rows loaded from the collection (X, obs, and each of ``obsm``) equal ``expected``'s."""
    groups = collection.open_datasets()
    opened = [load_x_and_obs(g) for g in groups]
    frames = [a.obs for a in opened]
    for key in [None, *obsm]:
        arrays = [a.X for a in opened] if key is None else [_open(g, f"obsm/{key}") for g in groups]
        values, obs = _stream(arrays, frames)
        assert len(obs) == expected.n_obs
        assert obs.index.is_unique
        rows = expected.obs_names.get_indexer(obs.index)
        want = expected.X if key is None else expected.obsm[key]
        np.testing.assert_array_equal(values, _dense(want[rows]))
        if key is None:
            got = obs.drop(columns=SOURCE_COLUMN).iloc[np.argsort(rows)]
            pd.testing.assert_frame_equal(
                got, expected.obs, check_index_type=False, check_names=False
            )


def _verify(collection: DatasetCollection, capsys: pytest.CaptureFixture[str]) -> None:
    """``annbatch verify`` finds nothing wrong: the whole collection (zarr), or each of its
    dataset files (h5ad: verify of the folder is another change's)."""
    if collection.is_collection_h5ad:
        targets = sorted(str(p) for p in collection.path.glob("*.h5ad"))
    else:
        targets = [str(collection.path)]
    for target in targets:
        assert verify(target) == [], target
        assert cli(["verify", target]) == 0, capsys.readouterr()


def _build(path: Path, out: Path, *, h5ad: bool, **kwargs: Any) -> DatasetCollection:
    return DatasetCollection(out, is_collection_h5ad=h5ad).add_adatas(
        [str(path)], progress=False, dataset_size=256, rng=0, **kwargs
    )


# --------------------------------------------------------------------- scanpy's pre-0.7 files
@pytest.mark.parametrize("h5ad", [False, True], ids=["zarr", "h5ad"])
def test_scanpy_pbmc68k_reduced_builds_loads_and_verifies(tmp_path, capsys, h5ad):
    path = real.real_file(real.PBMC68K)
    with h5py.File(path) as f:  # really the pre-0.7 encodings this test is about
        assert f["obs"].dtype.names
        assert f["obsm"].dtype.names
        assert f["varm"].dtype.names
        assert "louvain_categories" in f["uns"]
        assert "h5sparse_format" in f["raw.X"].attrs
    expected = _read(path)
    assert expected.shape == (700, 765)
    assert verify(path) == []  # the input itself scrubs clean
    collection = _build(path, tmp_path / "out", h5ad=h5ad)
    assert collection.n_obs == 700
    assert len(collection) == 3
    assert list(collection.var_names) == list(expected.var_names)
    assert collection.obs()["louvain"].cat.categories.tolist() == [str(k) for k in range(11)]
    _check_collection(collection, expected, ["X_pca", "X_umap"])
    _verify(collection, capsys)


def test_scanpy_pbmc68k_reduced_through_load_x_and_obs(tmp_path):
    path = real.real_file(real.PBMC68K)
    expected = _read(path)
    with h5py.File(path) as f:
        adata = load_x_and_obs(f)
        pd.testing.assert_frame_equal(adata.obs, expected.obs)
        values, obs = _stream([adata.X], [adata.obs])
    rows = expected.obs_names.get_indexer(obs.index)
    np.testing.assert_array_equal(values, expected.X[rows])


def test_scanpy_pre07_zarr_store_reads_as_anndata_reads_it(tmp_path):
    path = real.real_file(real.TENX_10K_ZARR)
    group = zarr.open_group(path, mode="r")
    assert group["obs"].dtype.names  # a compound array: the pre-0.7 encoding, in zarr v2
    expected = _read(path)
    adata = load_x_and_obs(group)
    pd.testing.assert_frame_equal(adata.obs, expected.obs)
    head = slice(0, 2000)  # one chunk of X is plenty
    values, obs = _stream([adata.X[head]], [adata.obs.iloc[head]])
    rows = expected.obs_names.get_indexer(obs.index)
    np.testing.assert_array_equal(values, expected.X[rows])
    # Its genes repeat (as 10x's do): the builder reads it, then says so.
    with pytest.raises(IncompatibleDatasetsError, match="gene names are not unique"):
        DatasetCollection(tmp_path / "out").add_adatas([str(path)], progress=False)


# ----------------------------------------------------------------- anndata 0.7's own files
@pytest.mark.parametrize(
    "which",
    [real.ANNDATA_070_H5AD, real.ANNDATA_078_H5AD, real.ANNDATA_070_ZARR],
    ids=["0.7.0-h5ad", "0.7.8-h5ad", "0.7.0-zarr"],
)
@pytest.mark.parametrize("h5ad", [False, True], ids=["zarr", "h5ad"])
def test_anndata_07_files_build_load_and_verify(tmp_path, capsys, which, h5ad):
    path = real.real_file(which)
    expected = _read(path)
    obs = zarr.open_group(path, mode="r")["obs"] if path.is_dir() else h5py.File(path)["obs"]
    assert obs.attrs["encoding-version"] == "0.1.0"  # anndata 0.7's dataframe encoding
    with pytest.warns(UserWarning, match="obsm/df is not carried"):  # a data frame in obsm
        collection = _build(path, tmp_path / "out", h5ad=h5ad)
    assert collection.n_obs == expected.n_obs
    _check_collection(collection, expected, ["array", "sparse"])
    _verify(collection, capsys)


# ----------------------------------------------- pre-0.7 encodings that the real files lack
def test_compound_obsm_and_h5sparse_layers_are_carried(tmp_path, capsys):
    rng = np.random.default_rng(3)
    n_obs, genes = 40, [f"g{j}" for j in range(9)]
    x = sp.random(n_obs, len(genes), density=0.3, format="csr", dtype=np.float32, random_state=rng)
    obs = pd.DataFrame(
        {"kind": pd.Categorical(rng.choice(["B", "T"], n_obs))},
        index=[f"cell{k}" for k in range(n_obs)],
    )
    obsm = {
        "X_pca": rng.standard_normal((n_obs, 5)).astype(np.float32),
        "X_umap": rng.standard_normal((n_obs, 2)),
    }
    layers = {"counts": sp.csr_matrix(x.multiply(3))}
    path = tmp_path / "legacy.h5ad"
    write_legacy_h5ad(path, x, obs, genes, obsm=obsm, layers=layers)
    expected = _read(path)
    np.testing.assert_array_equal(expected.obsm["X_pca"], obsm["X_pca"])  # anndata agrees
    collection = _build(path, tmp_path / "out", h5ad=False)
    group = next(iter(collection))
    assert sorted(group["obsm"]) == ["X_pca", "X_umap"]
    assert list(group["layers"]) == ["counts"]
    _check_collection(collection, expected, ["X_pca", "X_umap"])
    frames = [load_x_and_obs(g).obs for g in collection]
    values, got = _stream([_open(g, "layers/counts") for g in collection], frames)
    rows = expected.obs_names.get_indexer(got.index)
    np.testing.assert_array_equal(values, layers["counts"][rows].toarray())
    _verify(collection, capsys)
