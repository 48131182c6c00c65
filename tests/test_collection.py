"""DatasetCollection: every input row once, with its values and obs; seeded; crash-safe; CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from tests._adata_files import write_adata

import annbatch.collection._build as build_module
from annbatch import DatasetCollection, Loader, load_x_and_obs
from annbatch._cli import main as cli
from annbatch.collection import SOURCE_COLUMN
from annbatch.collection._layout import COMPRESSIONS
from annbatch.errors import (
    CollectionPathError,
    IncompatibleDatasetsError,
    IncompleteCollectionError,
    InputFileError,
    InvalidArgumentError,
    UnsupportedDatasetError,
)


def _adata(
    i: int, n_obs: int, genes: list[str], *, sparse: bool = True, dtype: str = "float32"
) -> ad.AnnData:
    rng = np.random.default_rng(i)
    dense = (rng.random((n_obs, len(genes))) < 0.3) * rng.integers(1, 50, (n_obs, len(genes)))
    x = sp.csr_matrix(dense.astype(dtype)) if sparse else dense.astype(dtype)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], n_obs)),
            f"only_in_{i}": np.arange(n_obs),
        },
        index=[f"in{i}_cell{k}" for k in range(n_obs)],
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))


_write = write_adata


def _inputs(tmp_path: Path, *, sparse: bool = True) -> tuple[list[str], list[ad.AnnData]]:
    genes = [f"g{j}" for j in range(30)]
    adatas = [
        _adata(0, 70, genes[0:20], sparse=sparse),
        _adata(1, 45, genes[10:30], sparse=sparse),  # overlapping gene sets
        _adata(2, 33, genes[25:30] + genes[0:5], sparse=sparse),  # another order
    ]
    suffixes = [".h5ad", ".zarr", ".h5ad"]
    paths = [
        _write(a, tmp_path / f"input{i}{s}")
        for i, (a, s) in enumerate(zip(adatas, suffixes, strict=True))
    ]
    return paths, adatas


def _expected_rows(adatas: list[ad.AnnData], genes: pd.Index) -> pd.DataFrame:
    """Each input row aligned to ``genes`` (zeros where the input lacks a gene), by obs name."""
    frames = []
    for a in adatas:
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        frame = pd.DataFrame(0.0, index=a.obs_names, columns=genes)
        common = [g for g in a.var_names if g in genes]
        frame[common] = x[:, a.var_names.get_indexer(common)]
        frames.append(frame)
    return pd.concat(frames)


def _collection_rows(collection: DatasetCollection) -> tuple[pd.DataFrame, pd.DataFrame]:
    xs, obs = [], []
    for group in collection:
        adata = load_x_and_obs(group)
        x = adata.X[:] if not isinstance(adata.X, zarr.Array) else adata.X[...]
        xs.append(
            pd.DataFrame(
                x.toarray() if sp.issparse(x) else x,
                index=adata.obs_names,
                columns=collection.var_names,
            )
        )
        obs.append(adata.obs)
    return pd.concat(xs), pd.concat(obs)


def _digest(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        for f in sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)]:
            if f.is_file():
                h.update(f.read_bytes())
    return h.hexdigest()


CODEC_NAMES = {
    "packed-lz4": "blosc(lz4)",
    "packed": "none",
    "none": "none",
    "lz4": "blosc(lz4)",
    "zstd": "zstd",
}


@pytest.mark.parametrize("compression", sorted(CODEC_NAMES))
@pytest.mark.parametrize("sparse", [True, False])
def test_every_row_once_with_its_values_and_obs(tmp_path, sparse, compression):
    paths, adatas = _inputs(tmp_path, sparse=sparse)
    before = _digest(paths)
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(
        paths, dataset_size=50, progress=False, rng=1, compression=compression
    )
    assert {d["codec"] for d in collection.info()["datasets"]} == {CODEC_NAMES[compression]}
    assert _digest(paths) == before  # inputs are only read
    assert collection.is_complete
    assert len(collection) == 3  # 148 rows in datasets of at most 50
    assert list(collection.var_names) == [
        f"g{j}" for j in range(30)
    ]  # outer join, first appearance
    x, obs = _collection_rows(collection)
    expected = _expected_rows(adatas, collection.var_names)
    assert sorted(x.index) == sorted(expected.index)  # every row exactly once
    pd.testing.assert_frame_equal(x.sort_index(), expected.sort_index(), check_dtype=False)
    # obs: union of columns, NA where an input lacks one, and the source file of each row
    assert set(obs.columns) == {"cell_type", "only_in_0", "only_in_1", "only_in_2", SOURCE_COLUMN}
    for i, (a, path) in enumerate(zip(adatas, paths, strict=True)):
        mine = obs.loc[a.obs_names]
        assert (mine[SOURCE_COLUMN] == path).all()
        assert (
            mine["cell_type"].astype(str).to_numpy() == a.obs["cell_type"].astype(str).to_numpy()
        ).all()
        np.testing.assert_array_equal(
            mine[f"only_in_{i}"].to_numpy(), a.obs[f"only_in_{i}"].to_numpy()
        )
        assert mine[f"only_in_{(i + 1) % 3}"].isna().all()
    # rows of the inputs are mixed: each dataset holds rows of several inputs
    for group in collection:
        assert load_x_and_obs(group).obs[SOURCE_COLUMN].nunique() > 1


def test_same_seed_same_collection_other_seed_other_order(tmp_path):
    paths, _ = _inputs(tmp_path)
    orders = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        collection = DatasetCollection(tmp_path / f"{name}.zarr").add_adatas(
            paths, dataset_size=60, rng=seed, progress=False
        )
        orders[name] = [list(load_x_and_obs(g).obs_names) for g in collection]
    assert orders["a"] == orders["b"]
    assert orders["a"] != orders["c"]


def test_explicit_genes_subset_and_reorder(tmp_path):
    paths, adatas = _inputs(tmp_path)
    genes = ["g29", "g3", "g12", "not_anywhere"]
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(
        paths, var_names=genes, progress=False
    )
    assert list(collection.var_names) == genes
    x, _ = _collection_rows(collection)
    expected = _expected_rows(adatas, pd.Index(genes))
    pd.testing.assert_frame_equal(x.sort_index(), expected.sort_index(), check_dtype=False)


def test_memory_budget_bounds_dataset_size(tmp_path):
    # ~0.9 MB of dense float64 rows with a 1 MB budget: datasets must shrink to fit it.
    genes = [f"g{j}" for j in range(400)]
    paths = [
        _write(_adata(i, 150, genes, sparse=False, dtype="float64"), tmp_path / f"in{i}.h5ad")
        for i in range(2)
    ]
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(
        paths, memory_budget="1MB", progress=False
    )
    sizes = [d["n_obs"] for d in collection.info()["datasets"]]
    assert sum(sizes) == 300
    assert max(sizes) * 400 * 8 * build_module._WORKING_COPIES <= 2**20


@pytest.mark.parametrize(("read_ahead", "compression"), [(0, "none"), (1, "none"), (1, "lz4")])
def test_loader_reads_each_row_once_per_epoch(tmp_path, read_ahead, compression):
    paths, adatas = _inputs(tmp_path)
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(
        paths, dataset_size=40, progress=False, compression=compression
    )
    loader = Loader(
        chunk_size=4,
        preload_nchunks=3,
        batch_size=5,
        shuffle=True,
        to=None,
        read_ahead=read_ahead,
    )
    loader.use_collection(collection, obs_index=True)
    assert loader.n_obs == 148
    expected = _expected_rows(adatas, collection.var_names)
    for _ in range(2):
        names = []
        for batch in loader:
            x = batch["X"].toarray()
            np.testing.assert_array_equal(
                x, expected.loc[batch["obs"].index].to_numpy()
            )  # obs aligned with X
            names.extend(batch["obs"].index)
        assert sorted(names) == sorted(expected.index)


def test_use_collection_with_own_loader_and_only_once(tmp_path):
    paths, _ = _inputs(tmp_path)
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(paths, progress=False)

    def cell_type_only(group: zarr.Group) -> ad.AnnData:
        return ad.AnnData(
            X=ad.io.sparse_dataset(group["X"]), obs=ad.io.read_elem(group["obs"])[["cell_type"]]
        )

    loader = Loader(batch_size=16, to=None).use_collection(collection, load_adata=cell_type_only)
    assert list(next(iter(loader))["obs"].columns) == ["cell_type"]
    with pytest.raises(RuntimeError, match="once per Loader"):
        loader.use_collection(collection)
    with pytest.raises(UnsupportedDatasetError, match="DatasetCollection"):
        Loader().use_collection(str(tmp_path / "out.zarr"))


def test_append_adds_datasets_and_drops_unknown_genes(tmp_path):
    paths, adatas = _inputs(tmp_path)
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(paths, progress=False)
    n_before = len(collection)
    first = collection.dataset_names
    extra = _adata(9, 12, ["g3", "brand_new_gene"])
    with pytest.warns(UserWarning, match="1 genes of the new inputs are not in the collection"):
        collection.add_adatas([_write(extra, tmp_path / "extra.h5ad")], progress=False, append=True)
    assert collection.dataset_names[:n_before] == first  # existing datasets untouched
    assert len(collection) == n_before + 1
    assert collection.n_obs == 160
    x, _ = _collection_rows(collection)
    expected = _expected_rows([*adatas, extra], collection.var_names)  # the new gene is dropped
    pd.testing.assert_frame_equal(x.sort_index(), expected.sort_index(), check_dtype=False)


def test_interrupted_build_reads_as_incomplete_then_resumes(tmp_path, monkeypatch):
    paths, _ = _inputs(tmp_path)
    reference = DatasetCollection(tmp_path / "ref.zarr").add_adatas(
        paths, dataset_size=40, rng=3, progress=False
    )
    original = build_module.write_dataset
    calls = {"n": 0}

    def crash_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-build
        return original(*args, **kwargs)

    monkeypatch.setattr(build_module, "write_dataset", crash_on_third)
    target = DatasetCollection(tmp_path / "out.zarr")
    with pytest.raises(KeyboardInterrupt):
        target.add_adatas(paths, dataset_size=40, rng=3, progress=False)
    monkeypatch.setattr(build_module, "write_dataset", original)
    assert not target.is_complete
    with pytest.raises(
        IncompleteCollectionError, match="did not finish; run the same add_adatas call"
    ):
        Loader().use_collection(target)
    with pytest.raises(CollectionPathError, match="interrupted build of other inputs"):
        target.add_adatas(paths[:2], dataset_size=40, rng=3, progress=False)
    with pytest.raises(CollectionPathError, match="other inputs or arguments"):
        target.add_adatas(paths, dataset_size=40, rng=3, progress=False, compression="zstd")
    target.add_adatas(paths, dataset_size=40, rng=3, progress=False)  # resumes
    assert target.is_complete
    assert target.dataset_names == reference.dataset_names
    for a, b in zip(target, reference, strict=True):
        assert list(load_x_and_obs(a).obs_names) == list(load_x_and_obs(b).obs_names)


def test_bad_inputs_fail_before_anything_is_written(tmp_path):
    paths, adatas = _inputs(tmp_path)
    out = tmp_path / "out.zarr"
    not_anndata = tmp_path / "notes.txt"
    not_anndata.write_text("hello")
    csc = adatas[0].copy()
    csc.X = sp.csc_matrix(csc.X)
    dup = adatas[0].copy()
    dup.var_names = ["g0"] * dup.n_vars
    cases = [
        ([str(tmp_path / "missing.h5ad")], InputFileError, "does not exist"),
        (
            [str(not_anndata)],
            InputFileError,
            "neither a readable h5ad file nor a zarr AnnData store",
        ),
        ([csc], UnsupportedDatasetError, "CSC"),
        (
            [paths[0], _write(_adata(5, 10, ["g0"], sparse=False), tmp_path / "dense.h5ad")],
            IncompatibleDatasetsError,
            "dense but",
        ),
        ([dup], IncompatibleDatasetsError, "gene names are not unique"),
        (
            [paths[0], _write(_adata(6, 10, ["g0"], dtype="int64"), tmp_path / "int.h5ad")],
            IncompatibleDatasetsError,
            "dtype int64",
        ),
        ([], InvalidArgumentError, "no inputs"),
        ([adatas[0][:0].copy()], InvalidArgumentError, "hold no rows"),
    ]
    for inputs, error, match in cases:
        with pytest.raises(error, match=match):
            DatasetCollection(out).add_adatas(inputs, progress=False)
        assert not out.exists()
    with pytest.raises(InvalidArgumentError, match="memory_budget"):
        DatasetCollection(out).add_adatas(paths, memory_budget="lots")
    with pytest.raises(InvalidArgumentError, match="dataset_size"):
        DatasetCollection(out).add_adatas(paths, dataset_size=0)
    with pytest.raises(InvalidArgumentError, match="compression must be one of"):
        DatasetCollection(out).add_adatas(paths, compression="gzip")
    assert not out.exists()


def test_output_path_that_holds_something_else(tmp_path):
    paths, _ = _inputs(tmp_path)
    other_group = tmp_path / "group.zarr"
    zarr.open_group(other_group, mode="w").attrs["mine"] = 1
    some_file = tmp_path / "file.txt"
    some_file.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "data.csv").write_text("1,2")
    for path in (other_group, some_file, folder):
        with pytest.raises(CollectionPathError, match="not"):
            DatasetCollection(path).add_adatas(paths, progress=False)
    assert some_file.read_text() == "x"
    assert (folder / "data.csv").read_text() == "1,2"


def test_anndata_objects_as_inputs(tmp_path):
    _, adatas = _inputs(tmp_path)
    with h5py.File(tmp_path / "input0.h5ad") as f:  # backed AnnData with X on disk works too
        backed = ad.AnnData(X=ad.io.sparse_dataset(f["X"]), obs=adatas[0].obs, var=adatas[0].var)
        collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(
            [backed, *adatas[1:]], progress=False
        )
    x, obs = _collection_rows(collection)
    pd.testing.assert_frame_equal(
        x.sort_index(), _expected_rows(adatas, collection.var_names).sort_index(), check_dtype=False
    )
    assert set(obs[SOURCE_COLUMN]) == {"AnnData 0", "AnnData 1", "AnnData 2"}


@pytest.mark.parametrize("compression", [None, "packed", "none", "lz4", "zstd"])
def test_command_line_build_and_info(tmp_path, capsys, compression):
    paths, _ = _inputs(tmp_path)
    genes = tmp_path / "genes.txt"
    genes.write_text("g1\ng2\ng3\n")
    out = tmp_path / "cli.zarr"
    assert (
        cli(
            [
                "build",
                str(out),
                *paths,
                "--genes",
                str(genes),
                "--dataset-size",
                "100",
                "--seed",
                "4",
                "--quiet",
                *([] if compression is None else ["--compression", compression]),
            ]
        )
        == 0
    )
    assert "2 datasets, 148 rows, 3 genes" in capsys.readouterr().out
    assert cli(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "148 rows x 3 genes" in printed
    assert CODEC_NAMES[compression or "packed-lz4"] in printed
    assert cli(["info", str(tmp_path / "nothing.zarr")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.zarr").mkdir()
    assert cli(["info", str(tmp_path / "empty.zarr")]) == 1
    assert "holds no collection" in capsys.readouterr().err
    help_text = subprocess.run(
        [sys.executable, "-m", "annbatch", "build", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in ("--genes", "--dataset-size", "--memory-budget", "--seed"):
        assert option in help_text
    assert "--compression {" + ",".join(COMPRESSIONS) + "}" in help_text  # the same choices
