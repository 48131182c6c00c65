"""What real clients of the reference library rely on (scvi-tools 1.5's annbatch integration).

scvi-tools makes its training and validation loaders by ``copy.copy(loader)`` and setting a
sampler with a ``mask`` on ``loader._batch_sampler``; it reads ``loader._obs``; it builds
collections with a ``load_adata`` that returns X (or a layer, or ``raw/X``) as a dask array
(``anndata.experimental.read_elem_lazy``); it sets zarr's codec pipeline to zarrs process-wide;
and it installs ``annbatch[zarrs]>=0.2``.
"""

from __future__ import annotations

import copy
import threading
import tomllib
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from tests._adata_files import write_adata
from torch.utils.data import DataLoader

import annbatch
from annbatch import DatasetCollection, Loader, load_x_and_obs
from annbatch.errors import InvalidArgumentError, LoaderBusyError
from annbatch.samplers import ClassSampler, RandomSampler, SequentialSampler

ROOT = Path(__file__).parent.parent
ZARRS = "zarrs.ZarrsCodecPipeline"
N_GENES = 1500


def _store(tmp_path: Path, n_obs: int = 120, n_var: int = 5) -> ad.AnnData:
    """A zarr AnnData store whose row i holds i in every column; opened with X on disk."""
    x = np.repeat(np.arange(n_obs, dtype=np.float32)[:, None], n_var, axis=1)
    obs = pd.DataFrame({"row": np.arange(n_obs)}, index=[f"c{i}" for i in range(n_obs)])
    path = write_adata(ad.AnnData(X=x, obs=obs), tmp_path / "rows.zarr")
    return load_x_and_obs(zarr.open_group(path, mode="r"))


def _rows(loader: Any) -> list[np.ndarray]:
    """The rows each batch holds (row i holds the value i)."""
    return [np.asarray(batch["X"])[:, 0].astype(int) for batch in loader]


# ------------------------------------------------------------------------ Loader._batch_sampler
def test_batch_sampler_is_the_sampler_the_loader_iterates_with(tmp_path):
    loader = Loader(batch_size=10, chunk_size=5, preload_nchunks=4, to=None)
    loader.add_anndata(_store(tmp_path))
    assert loader._batch_sampler is loader.batch_sampler
    assert loader._batch_sampler.batch_size == 10

    sampler = RandomSampler(5, 4, 10, mask=slice(20, 70), rng=np.random.default_rng(0))
    loader._batch_sampler = sampler
    assert loader._batch_sampler is sampler
    batches = _rows(loader)
    assert len(batches) == len(loader) == 5
    rows = np.concatenate(batches)
    assert sorted(rows) == list(range(20, 70))
    assert not np.array_equal(rows, np.arange(20, 70))  # shuffled


def test_copies_get_their_own_sampler_and_leave_the_original_alone(tmp_path):
    """scvi-tools' train / validation split: two copies, two masked samplers."""
    loader = Loader(batch_size=10, chunk_size=5, preload_nchunks=4, to=None)
    loader.add_anndata(_store(tmp_path))
    original = loader._batch_sampler
    train, val = copy.copy(loader), copy.copy(loader)
    train._batch_sampler = RandomSampler(5, 4, 10, mask=slice(0, 90), rng=np.random.default_rng(1))
    val._batch_sampler = SequentialSampler(5, 4, 10, mask=slice(90, 120))

    assert loader._batch_sampler is original
    first, second = np.concatenate(_rows(train)), np.concatenate(_rows(train))
    assert sorted(first) == sorted(second) == list(range(90))
    assert not np.array_equal(first, second)  # a new order each epoch
    assert np.array_equal(np.concatenate(_rows(val)), np.arange(90, 120))
    # the original still reads every row in order
    assert np.array_equal(np.concatenate(_rows(loader)), np.arange(120))
    assert (len(loader), len(train), len(val)) == (12, 9, 3)


def test_copy_in_a_dataloader_reads_its_own_rows(tmp_path):
    loader = Loader(batch_size=10, chunk_size=5, preload_nchunks=4, to="torch")
    loader.add_anndata(_store(tmp_path))
    val = copy.copy(loader)
    val._batch_sampler = SequentialSampler(5, 4, 10, mask=slice(100, 120))
    batches = [b["X"][:, 0].int().tolist() for b in DataLoader(val, batch_size=None)]
    assert batches == [list(range(100, 110)), list(range(110, 120))]


def test_copies_keep_their_own_resume_state_and_datasets(tmp_path):
    store = _store(tmp_path)
    loader = Loader(batch_size=10, chunk_size=5, preload_nchunks=4, shuffle=True, to=None)
    loader.add_anndata(store)
    other = copy.copy(loader)
    assert other._batch_sampler is not loader._batch_sampler
    it = iter(other)
    next(it), next(it)
    assert other.state_dict()["batches_done"] == 2
    assert loader.state_dict()["batches_done"] == 0
    it.close()
    other.add_anndata(store)
    assert (loader.n_obs, other.n_obs) == (120, 240)
    assert (len(loader._obs), len(other._obs)) == (1, 2)


class _LockedSampler(SequentialSampler):
    """A sampler that cannot be deep-copied (it holds a lock)."""

    def __init__(self) -> None:
        super().__init__(5, 4, 10)
        self.lock = threading.Lock()


def test_copy_shares_a_sampler_that_cannot_be_copied(tmp_path):
    loader = Loader(batch_sampler=_LockedSampler(), to=None).add_anndata(_store(tmp_path))
    other = copy.copy(loader)
    assert other._batch_sampler is loader._batch_sampler
    assert np.array_equal(np.concatenate(_rows(other)), np.arange(120))


def test_setting_the_sampler_is_checked(tmp_path):
    loader = Loader(batch_size=10, chunk_size=5, preload_nchunks=4, to=None)
    loader.add_anndata(_store(tmp_path))
    with pytest.raises(InvalidArgumentError, match=r"must be an annbatch\.abc\.Sampler"):
        loader._batch_sampler = object()
    it = iter(loader)
    next(it)
    with pytest.raises(LoaderBusyError, match="cannot change the sampler"):
        loader._batch_sampler = SequentialSampler(5, 4, 10)
    it.close()


def test_class_sampler_through_batch_sampler(tmp_path):
    """scvi-tools' ClassSampler path: rows grouped by label, each batch from one label."""
    adata = _store(tmp_path)
    labels = pd.Categorical(np.repeat(["a", "b", "c"], 40))
    loader = Loader(batch_size=10, chunk_size=10, preload_nchunks=2, to=None)
    loader.add_anndata(adata)
    train = copy.copy(loader)
    train._batch_sampler = ClassSampler(
        10, 2, 10, classes=labels, num_samples=60, mask=slice(0, 120), rng=np.random.default_rng(0)
    )
    batches = _rows(train)
    assert sum(len(b) for b in batches) == 60
    for rows in batches:
        assert len({labels[r] for r in rows}) == 1


# --------------------------------------------------------------------------------- Loader._obs
def test_obs_is_one_frame_per_added_dataset(tmp_path):
    a = _store(tmp_path)
    x = np.asarray(a.X[...])
    b = ad.AnnData(
        X=x[:7], obs=pd.DataFrame({"row": np.arange(7)}, index=[f"b{i}" for i in range(7)])
    )
    loader = Loader(to=None).add_adata(ad.AnnData(X=x, obs=a.obs))
    loader.add_dataset(x[:3], obs=a.obs.iloc[:3])
    loader.add_adatas([b])
    assert isinstance(loader._obs, list)
    assert len(loader._obs) == 3
    for frame, expected in zip(loader._obs, [a.obs, a.obs.iloc[:3], b.obs], strict=True):
        pd.testing.assert_frame_equal(frame, expected)
    assert sum(len(o) for o in loader._obs) == loader.n_obs


# -------------------------------------------------------------- lazily loaded (dask) inputs
def _lazy_inputs(tmp_path: Path, *, sparse: bool) -> list[str]:
    """Two inputs (h5ad, zarr) with X, a layer, a 3-D obsm array and raw; values not integers,
    so that no layout narrows them; wide enough that a 1MB build reads blocks of a few rows."""
    paths = []
    for i, suffix in enumerate([".h5ad", ".zarr"]):
        rng = np.random.default_rng(i)
        n_obs = 53 + 20 * i
        shape = (n_obs, N_GENES)
        dense = ((rng.random(shape) < 0.4) * rng.random(shape)).astype(np.float32)
        x = sp.csr_matrix(dense) if sparse else dense
        adata = ad.AnnData(
            X=x,
            obs=pd.DataFrame(
                {"donor": pd.Categorical(rng.choice(["d1", "d2"], n_obs))},
                index=[f"in{i}_c{k}" for k in range(n_obs)],
            ),
            var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
            layers={"counts": x * 2},
            obsm={"emb": rng.random((n_obs, 2, 3))},
        )
        adata.raw = ad.AnnData(X=x * 3, var=adata.var)
        paths.append(write_adata(adata, tmp_path / f"in{i}{suffix}"))
    return paths


def _load(source: str, *, lazy: bool) -> Any:
    """A ``load_adata`` as scvi-tools writes one: X from ``source`` (``X``, a layer, ``raw/X``),
    read lazily (dask, in blocks of 7 rows) or into memory; obs and var in memory."""

    def read(elem: Any) -> Any:
        if not lazy:
            return ad.io.read_elem(elem)
        return ad.experimental.read_elem_lazy(
            elem, chunks=(7, -1) if "emb" not in elem.name else None
        )

    def load(path: str) -> ad.AnnData:
        group: Any = (
            h5py.File(path, "r") if path.endswith(".h5ad") else zarr.open_group(path, mode="r")
        )
        var = ad.io.read_elem(group["raw/var" if source == "raw/X" else "var"])
        return ad.AnnData(
            X=read(group[source]),
            obs=ad.io.read_elem(group["obs"]),
            var=var,
            layers={"counts": read(group["layers/counts"])},
            obsm={"emb": read(group["obsm/emb"])},
        )

    return load


def _datasets(collection: DatasetCollection) -> list[dict[str, Any]]:
    out = []
    for group in collection:
        g: Any = group
        out.append(
            {path: ad.io.read_elem(g[path]) for path in ("X", "layers/counts", "obsm/emb", "obs")}
        )
    return out


@pytest.mark.parametrize("source", ["X", "layers/counts", "raw/X"])
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_lazy_inputs_build_the_same_collection_as_in_memory_ones(tmp_path, sparse, source):
    pytest.importorskip("dask.array")
    paths = _lazy_inputs(tmp_path, sparse=sparse)
    options = {"rng": 3, "dataset_size": 40, "memory_budget": "1MB", "progress": False}
    lazy = DatasetCollection(tmp_path / "lazy.zarr").add_adatas(
        paths, load_adata=_load(source, lazy=True), **options
    )
    eager = DatasetCollection(tmp_path / "eager.zarr").add_adatas(
        paths, load_adata=_load(source, lazy=False), **options
    )
    got, expected = _datasets(lazy), _datasets(eager)
    assert len(got) == len(expected) > 1
    for a, b in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(a.pop("obs"), b.pop("obs"))
        for path, value in a.items():
            want = b[path]
            assert type(value) is type(want), path
            np.testing.assert_array_equal(_dense(value), _dense(want), err_msg=path)
    # and the rows are the inputs' rows of ``source``
    rows = pd.concat([pd.DataFrame(_dense(d["X"]), index=d["obs"].index) for d in _datasets(lazy)])
    for path in paths:
        group: Any = (
            h5py.File(path, "r") if path.endswith(".h5ad") else zarr.open_group(path, mode="r")
        )
        want = _dense(ad.io.read_elem(group[source]))
        names = ad.io.read_elem(group["obs"]).index
        np.testing.assert_array_equal(rows.loc[names].to_numpy(), want)


def _dense(x: Any) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def test_lazy_rows_are_read_one_dask_block_at_a_time(tmp_path):
    """A block of the build's rows is answered from the dask blocks it overlaps, each
    computed once: never the whole array."""
    da = pytest.importorskip("dask.array")
    from dask.callbacks import Callback

    from annbatch.collection._lazy import LazyRows

    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    computed: list[tuple[int, ...]] = []  # the shape of every task's result

    class Rows(Callback):
        def _posttask(self, key, result, dsk, state, id):
            computed.append(np.shape(result))

    rows = LazyRows(da.from_array(x, chunks=(10, 2)), "X")
    with Rows():
        parts = [rows[lo : lo + 15] for lo in range(0, 100, 15)]
    np.testing.assert_array_equal(np.concatenate(parts), x)
    assert max(shape[0] for shape in computed) == 10  # a dask block, never more
    assert computed.count((10, 4)) == 10  # each row block computed once, with all columns
    assert rows[5:5].shape == (0, 4)


def test_lazy_csc_is_refused_with_a_clear_error(tmp_path):
    pytest.importorskip("dask.array")
    adata = ad.AnnData(X=sp.csc_matrix(np.eye(20, 4, dtype=np.float32)))
    path = write_adata(adata, tmp_path / "csc.h5ad")

    def load(p: str) -> ad.AnnData:
        f = h5py.File(p, "r")
        return ad.AnnData(
            X=ad.experimental.read_elem_lazy(f["X"]),
            obs=ad.io.read_elem(f["obs"]),
            var=ad.io.read_elem(f["var"]),
        )

    with pytest.raises(annbatch.errors.UnsupportedDatasetError, match="CSC"):
        DatasetCollection(tmp_path / "out.zarr").add_adatas([path], load_adata=load)


# ------------------------------------------------------------------ zarr's zarrs codec pipeline
@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_reads_and_builds_are_exact_under_the_zarrs_pipeline(tmp_path, sparse):
    pytest.importorskip("zarrs")
    n_obs = 300
    rng = np.random.default_rng(0)
    dense = ((rng.random((n_obs, 9)) < 0.3) * rng.integers(1, 9, (n_obs, 9))).astype(np.float32)
    dense[:64] = 0  # whole chunks of fill values: a collection must still write them
    x = sp.csr_matrix(dense) if sparse else dense
    obs = pd.DataFrame(
        {"zero": np.zeros(n_obs, np.int64), "donor": pd.Categorical(["d"] * n_obs)},
        index=[f"c{i}" for i in range(n_obs)],
    )
    with zarr.config.set({"codec_pipeline.path": ZARRS}):
        path = write_adata(ad.AnnData(X=x, obs=obs), tmp_path / "in.zarr")
        # a plain zarr store, read by annbatch's chunk reader
        store = Loader(batch_size=50, chunk_size=16, preload_nchunks=4, to=None)
        store.add_anndata(load_x_and_obs(zarr.open_group(path, mode="r")))
        np.testing.assert_array_equal(_dense(_vstack(b["X"] for b in store)), dense)
        # a collection built under it: every chunk written, every value exact
        collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(
            [path], shuffle=False, progress=False
        )
        assert annbatch.verify(tmp_path / "out.zarr") == []
        loader = Loader(batch_size=50, chunk_size=16, preload_nchunks=4, to=None)
        loader.use_collection(collection, obs_index=True)
        batches = list(loader)
    np.testing.assert_array_equal(_dense(_vstack(b["X"] for b in batches)), dense)
    got = pd.concat([b["obs"] for b in batches])
    np.testing.assert_array_equal(got.index, obs.index)
    np.testing.assert_array_equal(got["zero"], 0)
    assert (got["donor"] == "d").all()


def _vstack(parts: Any) -> Any:
    parts = list(parts)
    return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)


# ------------------------------------------------------------------------- version and extras
def test_version_satisfies_what_clients_require():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = Version(pyproject["project"]["version"])
    assert str(version) == annbatch.__version__
    # scvi-tools requires annbatch[zarrs]>=0.2; pip compares an installed pre-release so
    assert SpecifierSet(">=0.2").contains(version, prereleases=True)
    assert version > Version("0.3.1")  # the reference's latest release
    extras = pyproject["project"]["optional-dependencies"]
    assert any(req.startswith("zarrs") for req in extras["zarrs"])
