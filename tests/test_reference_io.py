"""The reference library's current API for writing and loading (REFERENCE_CURRENT_API.md):
write_sharded, annbatch.io, DatasetCollection's reference form, mixed dtypes, and the Loader's
once-only use_collection and n_var."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

import annbatch
from _adata_files import write_adata
from annbatch import DatasetCollection, Loader, write_sharded
from annbatch.errors import IncompatibleDatasetsError
from annbatch.samplers import ClassSampler


def _adata(
    seed: int, n_obs: int, n_var: int = 12, *, sparse: bool = True, extras: bool = False
) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    dense = (rng.random((n_obs, n_var)) < 0.3) * rng.integers(1, 50, (n_obs, n_var))
    x = sp.csr_matrix(dense.astype(np.float32)) if sparse else dense.astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(
                rng.choice(["T", "B", "NK"], n_obs), categories=["B", "NK", "T"]
            ),
            "seed": seed,
        },
        index=[f"s{seed}_{i}" for i in range(n_obs)],
    )
    adata = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_var)]))
    if extras:
        adata.layers["counts"] = x.copy()
        adata.obsm["X_pca"] = rng.random((n_obs, 3)).astype(np.float32)
        adata.obsm["image"] = rng.random((n_obs, 2, 3, 2))
    return adata


def _values(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


# --------------------------------------------------------------------------- names
def test_reference_names_resolve_to_one_implementation():
    import annbatch.io
    import annbatch.types

    assert annbatch.io.write_sharded is write_sharded
    assert annbatch.io.DatasetCollection is DatasetCollection
    request: annbatch.types.LoadRequest = {"requests": [slice(0, 2)], "splits": [np.arange(2)]}
    assert isinstance(request, dict)  # TypedDicts are plain dicts at run time
    assert set(annbatch.types.LoaderOutput.__annotations__) == {"X", "obs", "var", "index"}


# --------------------------------------------------------------------------- write_sharded
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("shard_size", [40, "4KB"])
def test_write_sharded_layout_and_values(tmp_path, sparse, shard_size):
    adata = _adata(0, 150, sparse=sparse, extras=True)
    group = write_sharded(tmp_path / "one.zarr", adata, n_obs_per_chunk=16, shard_size=shard_size)
    x = group["X"]["data"] if sparse else group["X"]
    nnz_per_row = adata.X.nnz / 150 if sparse else 1
    if sparse:
        assert x.chunks == (round(16 * nnz_per_row),)
    else:
        assert x.chunks == (16, 12)
    assert x.shards[0] % x.chunks[0] == 0
    # A shard holds shard_size rows (or bytes), rounded up to whole chunks.
    if not sparse:
        assert x.shards == ((48, 12) if shard_size == 40 else (96, 12))  # 4KB / 48 B per row = 85
    else:
        want = 40 * nnz_per_row if shard_size == 40 else 4096 / 4
        whole = -(-adata.X.nnz // x.chunks[0]) * x.chunks[0]  # no shard beyond the data
        assert min(want, whole) <= x.shards[0] < want + x.chunks[0] + 1
    assert group["obsm"]["image"].chunks == (16, 2, 3, 2)
    if sparse:
        assert group["layers"]["counts"]["data"].chunks == group["X"]["data"].chunks
    assert isinstance(group["obsm"]["X_pca"].compressors[0], BloscCodec)
    back = ad.read_zarr(tmp_path / "one.zarr")
    np.testing.assert_array_equal(_values(back.X), _values(adata.X))
    np.testing.assert_array_equal(back.obsm["image"], adata.obsm["image"])
    np.testing.assert_array_equal(_values(back.layers["counts"]), _values(adata.layers["counts"]))
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    # Our Loader reads X, a layer and an obsm entry back row for row.
    for element, want in [
        (group["layers"]["counts"], _values(adata.layers["counts"])),
        (group["obsm"]["image"], adata.obsm["image"]),
    ]:
        data = ad.io.sparse_dataset(element) if isinstance(element, zarr.Group) else element
        loader = Loader(
            batch_size=7, chunk_size=8, preload_nchunks=3, shuffle=True, to=None, return_index=True
        )
        seen = []
        for batch in loader.add_dataset(data):
            np.testing.assert_array_equal(_values(batch["X"]), want[batch["index"]])
            seen.append(batch["index"])
        assert sorted(np.concatenate(seen).tolist()) == list(range(150))


def test_write_sharded_key_clear_and_errors(tmp_path):
    root = zarr.open_group(tmp_path / "store.zarr", mode="w")
    root.create_group("stale")
    write_sharded(root, _adata(1, 30))
    assert "stale" not in root  # key=None clears the store first
    sub = write_sharded(
        root, _adata(2, 20), key="more", shard_size=8, compressors=[ZstdCodec(level=1)]
    )
    assert "X" in root
    assert sub.path == "more"
    assert isinstance(sub["X"]["data"].compressors[0], ZstdCodec)
    assert ad.read_zarr(tmp_path / "store.zarr" / "more").n_obs == 20
    with pytest.raises(ValueError, match="0 rows"):
        write_sharded(root, _adata(3, 0))
    with pytest.raises(ValueError, match="shard_size must be rows"):
        write_sharded(root, _adata(3, 5), shard_size=2.5)
    with pytest.raises(TypeError, match=r"write_sharded writes an anndata.AnnData"):
        write_sharded(root, np.zeros((3, 3)))


# --------------------------------------------------------------------------- Loader
@pytest.mark.parametrize("fmt", ["zarr", "h5ad", "memory"])
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("strategy", ["concat-shuffle", "shuffle-concat"])
def test_mixed_dtypes_are_promoted_with_exact_values(tmp_path, fmt, sparse, strategy):
    parts = [_adata(4, 40, sparse=sparse), _adata(5, 30, sparse=sparse)]
    parts[1].X = parts[1].X.astype(np.float64)
    parts[0].X = parts[0].X.astype(np.int32)
    datasets, handles = [], []
    for i, part in enumerate(parts):
        if fmt == "memory":
            datasets.append(part.X)
            continue
        path = write_adata(part, tmp_path / f"p{i}.{fmt}")
        group = zarr.open_group(path, mode="r") if fmt == "zarr" else h5py.File(path, "r")
        handles.append(group)
        datasets.append(ad.io.sparse_dataset(group["X"]) if sparse else group["X"])
    loader = Loader(
        batch_size=9, chunk_size=4, preload_nchunks=3, shuffle=True, to=None, return_index=True,
        concat_strategy=strategy,
    )  # fmt: skip
    loader.add_dataset(datasets[0])
    with pytest.warns(
        UserWarning,
        match="has dtype float64, the Loader's earlier datasets int32: batches are yielded as float64",
    ):
        loader.add_dataset(datasets[1])
    want = np.concatenate([_values(p.X) for p in parts]).astype(np.float64)
    seen = []
    for batch in loader:
        assert batch["X"].dtype == np.float64
        np.testing.assert_array_equal(_values(batch["X"]), want[batch["index"]])
        seen.append(batch["index"])
    assert sorted(np.concatenate(seen).tolist()) == list(range(70))
    for h in handles:
        if isinstance(h, h5py.File):
            h.close()


def test_use_collection_twice_and_n_var(tmp_path):
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas([_adata(6, 30)], progress=False)
    loader = Loader(to=None).use_collection(collection)
    assert loader.n_var == 12
    with pytest.raises(RuntimeError, match="use_collection can be called once per Loader"):
        loader.use_collection(collection)
    with pytest.raises(ValueError, match="no n_var"):
        _ = Loader().n_var


# --------------------------------------------------------------------------- DatasetCollection
@pytest.fixture
def inputs(tmp_path) -> list[str]:
    return [
        write_adata(_adata(10 + i, 60 + 20 * i), tmp_path / f"in{i}.{fmt}")
        for i, fmt in enumerate(["h5ad", "zarr", "h5ad"])
    ]


def test_collection_from_a_group_is_empty_obs_and_iteration(tmp_path, inputs):
    group = zarr.open_group(
        tmp_path / "fromgroup.zarr", mode="w"
    )  # as the reference's docs make one
    collection = DatasetCollection(group)
    assert collection.is_empty
    collection.add_adatas(inputs, dataset_size=100, progress=False, rng=0)
    assert not collection.is_empty
    groups = list(collection)
    assert [g.basename for g in groups] == collection.dataset_names
    assert len(groups) == 3
    obs = collection.obs()
    assert len(obs) == 240
    assert set(obs["src_path"]) == set(inputs)
    assert list(collection.obs(columns=["cell_type"]).columns) == ["cell_type"]
    assert collection.obs(columns=[]).shape == (240, 0)
    np.testing.assert_array_equal(collection.obs([]).index, obs.index)
    with pytest.raises(ValueError, match="has no column"):
        collection.obs(["nope"])
    # obs is in the Loader's row order.
    loader = Loader(batch_size=240, chunk_size=240, preload_nchunks=1, to=None).use_collection(
        collection, obs_index=True
    )
    pd.testing.assert_frame_equal(next(iter(loader))["obs"], obs)


def test_collection_modes_and_flags(tmp_path, inputs):
    path = tmp_path / "m.zarr"
    DatasetCollection(path).add_adatas(inputs[:1], progress=False)
    with pytest.raises(ValueError, match="mode='r'"):
        DatasetCollection(path, mode="r").add_adatas(inputs[1:])
    with pytest.raises(FileExistsError, match="mode='w-'"):
        DatasetCollection(path, mode="w-")
    assert DatasetCollection(path, mode="w").is_empty  # "w" starts over
    with pytest.raises(RuntimeError, match="mode='r\\+' needs an existing collection"):
        DatasetCollection(tmp_path / "none.zarr", mode="r+")
    with pytest.raises(
        ValueError, match=r"is_collection_h5ad=True cannot be combined with a zarr.Group"
    ):
        DatasetCollection(zarr.open_group(tmp_path / "g.zarr", mode="w"), is_collection_h5ad=True)
    with pytest.raises(TypeError, match=r"group must be a zarr.Group or a path"):
        DatasetCollection(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode must be one of"):
        DatasetCollection(path, mode="x")  # type: ignore[arg-type]


def test_later_calls_on_one_object_append(tmp_path, inputs):
    collection = DatasetCollection(tmp_path / "grow.zarr")
    collection.add_adatas(inputs[:2], progress=False)
    collection.add_adatas(inputs[2:], progress=False)  # the reference's "later calls add datasets"
    assert collection.n_obs == 240
    with pytest.raises(RuntimeError, match="finished collection"):  # a new object: append=True
        DatasetCollection(tmp_path / "grow.zarr").add_adatas(
            [write_adata(_adata(30, 5), tmp_path / "x.h5ad")], progress=False
        )


def test_shuffle_false_keeps_input_order(tmp_path, inputs):
    collection = DatasetCollection(tmp_path / "seq.zarr").add_adatas(
        adata_paths=inputs, shuffle=False, dataset_size=70, progress=False
    )
    obs = collection.obs()
    want = pd.concat(
        [ad.read_h5ad(p).obs if p.endswith(".h5ad") else ad.read_zarr(p).obs for p in inputs]
    )
    np.testing.assert_array_equal(obs.index, want.index)
    assert [g["obs"]["_index"].shape[0] for g in collection] == [70, 70, 70, 30]


def test_shuffle_chunk_size_moves_runs(tmp_path, inputs):
    collection = DatasetCollection(tmp_path / "runs.zarr").add_adatas(
        inputs, shuffle_chunk_size=20, rng=3, progress=False
    )
    names = collection.obs().index.to_numpy()
    # The 240 rows come in 12 runs of 20 consecutive input rows.
    order = {
        n: i
        for i, n in enumerate(
            pd.concat(
                [(ad.read_h5ad(p) if p.endswith(".h5ad") else ad.read_zarr(p)).obs for p in inputs]
            ).index
        )
    }
    positions = np.array([order[n] for n in names])
    runs = np.split(positions, np.flatnonzero(np.diff(positions) != 1) + 1)
    assert sorted(len(r) for r in runs) == [20] * 12
    assert not np.array_equal(positions, np.arange(240))


def test_groupby_sorts_each_dataset_for_the_class_sampler(tmp_path, inputs):
    collection = DatasetCollection(tmp_path / "grouped.zarr").add_adatas(
        inputs, groupby="cell_type", dataset_size=120, rng=1, progress=False
    )
    for group in collection:
        codes = ad.io.read_elem(group["obs"])["cell_type"].cat.codes.to_numpy()
        assert np.all(np.diff(codes) >= 0)
    classes = pd.Categorical(collection.obs(["cell_type"])["cell_type"])
    sampler = ClassSampler(4, 2, 4, classes=classes, num_samples=120, rng=np.random.default_rng(0))
    batches = list(
        Loader(batch_sampler=sampler, to=None, return_index=True).use_collection(collection)
    )
    assert sum(len(b["index"]) for b in batches) == 120
    assert all(b["obs"]["cell_type"].nunique() == 1 for b in batches)
    with pytest.raises(ValueError, match="groupby column 'donor' is not in the obs"):
        DatasetCollection(tmp_path / "bad.zarr").add_adatas(inputs, groupby="donor", progress=False)


def test_reference_build_arguments(tmp_path, inputs):
    genes = ["g3", "g1", "g99"]
    collection = DatasetCollection(tmp_path / "args.zarr").add_adatas(
        inputs,
        var_subset=genes,
        n_obs_per_chunk=8,
        shard_size="2KB",
        zarr_compressor=ZstdCodec(level=1),
        dataset_size="1KB",
        load_adata=lambda path: (
            ad.read_h5ad(path, backed="r") if path.endswith(".h5ad") else ad.read_zarr(path)
        ),
        progress=False,
    )
    info = collection.info()
    assert list(collection.var_names) == genes
    assert all(d["codec"] == "zstd" and d["checksum"] for d in info["datasets"])
    assert len(collection) > 1  # 1KB of X per dataset
    assert set(collection.obs()["src_path"]) == set(inputs)  # load_adata keeps the paths
    loader = Loader(batch_size=240, chunk_size=240, preload_nchunks=1, to=None).use_collection(
        collection
    )
    x = _values(next(iter(loader))["X"])
    names = collection.obs().index
    by_name = {}
    for p in inputs:
        a = ad.read_h5ad(p) if p.endswith(".h5ad") else ad.read_zarr(p)
        dense = _values(a.X)
        for i, n in enumerate(a.obs_names):
            by_name[n] = [dense[i, 3], dense[i, 1], 0.0]
    np.testing.assert_array_equal(x, np.array([by_name[n] for n in names], dtype=np.float32))
    with pytest.raises(ValueError, match="var_subset and var_names mean the same"):
        DatasetCollection(tmp_path / "x.zarr").add_adatas(inputs, var_subset=genes, var_names=genes)
    with pytest.raises(ValueError, match="give compression"):
        DatasetCollection(tmp_path / "x.zarr").add_adatas(
            inputs, compression="lz4", n_obs_per_chunk=8
        )
    with pytest.raises(ValueError, match="merge must be one of"):
        DatasetCollection(tmp_path / "x.zarr").add_adatas(inputs, merge="outer")
    with pytest.raises(ValueError, match="zarr v3 compressor"):
        DatasetCollection(tmp_path / "x.zarr").add_adatas(inputs, zarr_compressor="lz4")


def _by_name(paths: list[str], key: str) -> dict[str, np.ndarray]:
    """Each input row's values of element ``key`` (a layer: by gene name), by obs name."""
    out = {}
    for path in paths:
        a = ad.read_h5ad(path)
        elem = (
            a.layers[key.split("/")[1]] if key.startswith("layers/") else a.obsm[key.split("/")[1]]
        )
        dense = _values(elem)
        for i, name in enumerate(a.obs_names):
            out[name] = (
                pd.Series(dense[i], index=a.var_names) if key.startswith("layers/") else dense[i]
            )
    return out


@pytest.mark.parametrize("layout", [{}, {"compression": "lz4"}, {"n_obs_per_chunk": 8}])
def test_layers_and_obsm_are_carried_and_streamed(tmp_path, layout):
    paths = []
    for i in range(2):
        a = _adata(50 + i, 40 + 10 * i, extras=True)
        a.var_names = [f"g{j + 4 * i}" for j in range(12)]  # genes differ: layers are aligned
        a.layers["counts"] = a.layers["counts"].astype(np.int32)
        paths.append(write_adata(a, tmp_path / f"e{i}.h5ad"))
    collection = DatasetCollection(tmp_path / "e.zarr").add_adatas(
        paths, dataset_size=30, rng=2, progress=False, **layout
    )
    genes = collection.var_names
    for key in ("layers/counts", "obsm/X_pca", "obsm/image"):
        want = _by_name(paths, key)
        got_all = []
        for group in collection:
            names = ad.io.read_elem(group["obs"]).index
            elem = group[key]
            data = ad.io.sparse_dataset(elem) if isinstance(elem, zarr.Group) else elem
            values = _values(data[:]) if isinstance(elem, zarr.Group) else elem[:]
            for row, name in zip(values, names, strict=True):
                if key.startswith("layers/"):
                    expected = want[name].reindex(genes, fill_value=0).to_numpy()
                else:
                    expected = want[name]
                np.testing.assert_array_equal(row, expected)
            got_all.append(values)
        assert sum(len(v) for v in got_all) == 90
    # anndata opens each dataset with them; the Loader streams them as the reference's docs do.
    first = ad.read_zarr(tmp_path / "e.zarr" / collection.dataset_names[0])
    assert set(first.layers) == {"counts"}
    assert set(first.obsm) == {"X_pca", "image"}
    stored = first.layers["counts"].dtype  # the default, packed layout stores counts narrower
    assert stored == np.int32 if layout else (stored.itemsize < 4 and np.can_cast(stored, np.int32))
    layers = [ad.io.sparse_dataset(g["layers"]["counts"]) for g in collection]
    groups = [g["layers"]["counts"] for g in collection]  # as the reference's docs write it
    images = [g["obsm"]["image"] for g in collection]
    for datasets, shape in ((layers, (len(genes),)), (groups, (len(genes),)), (images, (2, 3, 2))):
        loader = Loader(batch_size=16, chunk_size=4, preload_nchunks=4, shuffle=True, to=None)
        rows = [b["X"] for b in loader.add_datasets(datasets)]
        assert sum(r.shape[0] for r in rows) == 90
        assert rows[0].shape[1:] == shape
        if datasets is not images:  # the Loader yields the inputs' dtype
            assert rows[0].dtype == np.int32


def test_elements_not_in_every_input_are_said(tmp_path):
    a, b = _adata(60, 20, extras=True), _adata(61, 20)
    b.layers["counts"] = b.X.copy()
    paths = [write_adata(a, tmp_path / "a.h5ad"), write_adata(b, tmp_path / "b.h5ad")]
    with pytest.warns(UserWarning, match="obsm/X_pca, obsm/image are not in every input"):
        collection = DatasetCollection(tmp_path / "c.zarr").add_adatas(paths, progress=False)
    assert set(collection.datasets[0]["layers"].keys()) == {"counts"}
    assert "obsm" not in collection.datasets[0]
    # An append must bring what every dataset holds.
    with pytest.raises(ValueError, match=r"holds \['layers/counts'\] in every dataset"):
        collection.add_adatas([write_adata(_adata(62, 5), tmp_path / "n.h5ad")], progress=False)


@pytest.mark.parametrize("compressor", ["gzip", None])
def test_h5ad_collections(tmp_path, inputs, compressor):
    folder = tmp_path / "h5ad_collection"
    collection = DatasetCollection(folder, is_collection_h5ad=True).add_adatas(
        inputs, dataset_size=100, h5ad_compressor=compressor, rng=4, progress=False
    )
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["annbatch-collection.json"] + [f"dataset_00000{k}.h5ad" for k in range(3)]
    with h5py.File(folder / "dataset_000000.h5ad", "r") as f:
        assert f["X"]["data"].compression == compressor
    with pytest.raises(ValueError, match="collection of h5ad files"):
        list(collection)
    # The Loader reads every row once, with its values and obs; anndata reads each file.
    want = {}
    for path in inputs:
        a = ad.read_h5ad(path) if path.endswith(".h5ad") else ad.read_zarr(path)
        want.update(zip(a.obs_names, _values(a.X), strict=True))
    loader = Loader(batch_size=32, shuffle=True, to=None).use_collection(collection)
    seen = []
    for batch in loader:
        for name, row in zip(batch["obs"].index, _values(batch["X"]), strict=True):
            np.testing.assert_array_equal(row, want[name])
        seen.extend(batch["obs"].index)
    assert sorted(seen) == sorted(want)
    assert collection.obs(["cell_type"]).shape == (240, 1)
    assert ad.read_h5ad(folder / "dataset_000002.h5ad").n_obs == 40
    # Opened again (the manifest says what it is); a rerun writes nothing; appends are not built.
    again = DatasetCollection(folder)
    assert again.is_collection_h5ad
    assert again.n_obs == 240
    with pytest.warns(UserWarning, match="nothing was written"):
        again.add_adatas(
            inputs, dataset_size=100, h5ad_compressor=compressor, rng=4, progress=False
        )
    with pytest.raises(annbatch.errors.CollectionCompleteError, match="append=True"):
        DatasetCollection(folder).add_adatas(
            [write_adata(_adata(90, 30), tmp_path / "n.h5ad")], progress=False
        )
    # A folder of h5ad files without our manifest (another tool's collection) reads too.
    (folder / "annbatch-collection.json").unlink()
    foreign = DatasetCollection(folder, is_collection_h5ad=True)
    assert foreign.n_obs == 240
    assert len(Loader(batch_size=240, to=None).use_collection(foreign)) == 1


def test_reference_user_script(tmp_path, inputs):
    """A script written for the reference's current release, run unchanged."""
    from annbatch import Loader as RefLoader
    from annbatch.io import DatasetCollection as RefCollection

    collection = RefCollection(zarr.open_group(tmp_path / "script.zarr", mode="w"))
    collection.add_adatas(inputs, shuffle=True, rng=np.random.default_rng(0), n_obs_per_chunk=16)
    loader = RefLoader(
        batch_size=32, chunk_size=16, preload_nchunks=4, shuffle=True, to=None, return_index=True
    )
    loader.use_collection(collection)
    seen = []
    for batch in loader:
        assert set(batch) == {"X", "obs", "var", "index"}
        assert sp.issparse(batch["X"])
        assert batch["var"] is None
        seen.append(batch["index"])
    assert sorted(np.concatenate(seen).tolist()) == list(range(240))
    assert len(loader) == len(seen) == 8
    assert annbatch.samplers.RandomSampler is type(loader.batch_sampler)


# ------------------------------------------------------------- review findings, pinned down
def test_shuffle_chunk_size_larger_than_a_dataset_keeps_dataset_sizes(tmp_path, inputs):
    collection = DatasetCollection(tmp_path / "big_runs.zarr").add_adatas(
        inputs, dataset_size=50, shuffle_chunk_size=70, rng=0, progress=False
    )
    assert [g["obs"]["_index"].shape[0] for g in collection] == [50, 50, 50, 50, 40]
    assert sorted(collection.obs().index) == sorted(
        pd.concat(
            [(ad.read_h5ad(p) if p.endswith(".h5ad") else ad.read_zarr(p)).obs for p in inputs]
        ).index
    )


def test_groupby_needs_the_same_categories(tmp_path):
    a, b = _adata(70, 10), _adata(71, 10)
    b.obs["cell_type"] = b.obs["cell_type"].cat.add_categories(["DC"])
    paths = [write_adata(a, tmp_path / "a.h5ad"), write_adata(b, tmp_path / "b.h5ad")]
    with pytest.raises(ValueError, match="groupby column 'cell_type' has categories"):
        DatasetCollection(tmp_path / "g.zarr").add_adatas(
            paths, groupby="cell_type", progress=False
        )


def test_write_sharded_from_a_backed_anndata(tmp_path):
    adata = _adata(72, 60, extras=True)
    path = write_adata(adata, tmp_path / "backed.h5ad")
    backed = ad.read_h5ad(path, backed="r")
    try:
        write_sharded(tmp_path / "from_backed.zarr", backed, n_obs_per_chunk=16)
    finally:
        backed.file.close()
    back = ad.read_zarr(tmp_path / "from_backed.zarr")
    np.testing.assert_array_equal(_values(back.X), _values(adata.X))
    np.testing.assert_array_equal(_values(back.layers["counts"]), _values(adata.layers["counts"]))


def _interrupt_at(prefix: str):
    from annbatch.collection import _build

    def hook(step: str) -> None:
        if step.startswith(prefix):
            raise KeyboardInterrupt(step)

    _build.crash_hook = hook
    return _build


def test_resume_refuses_other_elements_or_obs(tmp_path):
    a = _adata(73, 30, extras=True)
    path = write_adata(a, tmp_path / "a.h5ad")
    build = _interrupt_at("write dataset")
    try:
        with pytest.raises(KeyboardInterrupt):
            DatasetCollection(tmp_path / "r.zarr").add_adatas([path], progress=False)
    finally:
        build.crash_hook = None

    def without_a_layer(p):
        adata = ad.read_h5ad(p)
        del adata.obsm["X_pca"]
        return adata

    def without_a_column(p):
        adata = ad.read_h5ad(p)
        del adata.obs["seed"]
        return adata

    for load in (without_a_layer, without_a_column):
        with pytest.raises(FileExistsError, match="an interrupted build"):
            DatasetCollection(tmp_path / "r.zarr").add_adatas(
                [path], load_adata=load, progress=False
            )
    DatasetCollection(tmp_path / "r.zarr").add_adatas(
        [path], progress=False
    )  # the same call resumes
    assert DatasetCollection(tmp_path / "r.zarr").n_obs == 30


def test_h5ad_build_interrupted_while_converting_refuses_other_inputs(tmp_path, inputs):
    folder = tmp_path / "h5"
    build = _interrupt_at("convert")
    try:
        with pytest.raises(KeyboardInterrupt):
            DatasetCollection(folder, is_collection_h5ad=True).add_adatas(
                inputs[:1], progress=False
            )
    finally:
        build.crash_hook = None
    assert DatasetCollection(folder).is_collection_h5ad  # recognised while half-built
    with pytest.raises(RuntimeError, match="finished collection"):
        DatasetCollection(folder, is_collection_h5ad=True).add_adatas(inputs[1:], progress=False)
    DatasetCollection(folder, is_collection_h5ad=True).add_adatas(inputs[:1], progress=False)
    assert DatasetCollection(folder).n_obs == 60


@pytest.mark.parametrize("merge", ["same", "unique", "first", "only"])
def test_merge_combines_var_columns_as_anndata_concat(tmp_path, merge):
    a, b = _adata(80, 10), _adata(81, 10)
    a.var["symbol"] = [f"S{j}" for j in range(12)]
    b.var["symbol"] = [f"S{j}" if j != 3 else "other" for j in range(12)]
    a.var["only_a"] = np.arange(12)
    b.var_names = [f"g{j + 2}" for j in range(12)]  # g2..g13: an outer join of genes
    paths = [write_adata(a, tmp_path / "a.h5ad"), write_adata(b, tmp_path / "b.h5ad")]
    collection = DatasetCollection(tmp_path / "m.zarr").add_adatas(
        paths, merge=merge, progress=False
    )
    want = ad.concat([ad.read_h5ad(p)[:0] for p in paths], join="outer", merge=merge).var.reindex(
        collection.var_names
    )
    for group in collection:
        got = ad.io.read_elem(group["var"])
        assert list(got.columns) == list(want.columns)
        for column in want.columns:
            np.testing.assert_array_equal(
                got[column].astype(object).where(got[column].notna(), None),
                want[column].astype(object).where(want[column].notna(), None),
            )
    # An append keeps the collection's var columns.
    collection.add_adatas([write_adata(_adata(82, 5), tmp_path / "c.h5ad")], progress=False)
    assert list(ad.io.read_elem(collection.datasets[-1]["var"]).columns) == list(want.columns)


# --------------------------------------------------------------------------- without X
def _images(seed: int, n_obs: int, *, x: bool = False) -> ad.AnnData:
    """An AnnData whose rows are images in obsm (rank 4), with no X unless ``x``."""
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {"label": pd.Categorical(rng.choice(["a", "b"], n_obs), categories=["a", "b"])},
        index=[f"i{seed}_{k}" for k in range(n_obs)],
    )
    images = rng.integers(0, 256, (n_obs, 3, 4, 5), dtype=np.uint8)
    var = pd.DataFrame(index=[f"g{j}" for j in range(4)])
    matrix = rng.random((n_obs, 4)).astype(np.float32) if x else None
    return ad.AnnData(X=matrix, obs=obs, var=var if x else None, obsm={"images": images})


@pytest.mark.parametrize("as_files", [False, True])
def test_collection_of_anndata_without_x_holds_its_obsm(tmp_path, as_files):
    adatas = [_images(s, n) for s, n in ((70, 90), (71, 60))]
    want = {
        name: img for a in adatas for name, img in zip(a.obs_names, a.obsm["images"], strict=True)
    }
    inputs: list = adatas
    if as_files:
        inputs = [write_adata(a, tmp_path / f"img{k}.h5ad") for k, a in enumerate(adatas)]
    collection = DatasetCollection(tmp_path / "img.zarr").add_adatas(
        inputs, dataset_size=64, rng=3, progress=False
    )
    assert collection.n_obs == 150
    assert [d["encoding"] for d in collection.info()["datasets"]] == ["none"] * 3
    # anndata reads each dataset: no X, the images by obs name.
    for group in collection:
        adata = ad.read_zarr(group.store_path)
        assert adata.X is None
        for name, image in zip(adata.obs_names, adata.obsm["images"], strict=True):
            np.testing.assert_array_equal(image, want[name])
    # The Loader streams the obsm array (the reference's documented use), every row once.
    datasets = [g["obsm"]["images"] for g in collection]
    names = collection.obs([]).index
    stored = dict(zip(names, np.concatenate([d[:] for d in datasets]), strict=True))
    assert all(np.array_equal(stored[n], want[n]) for n in want)
    loader = Loader(batch_size=32, chunk_size=8, preload_nchunks=4, shuffle=True, to=None)
    rows = np.concatenate([b["X"] for b in loader.add_datasets(datasets)])
    assert rows.shape == (150, 3, 4, 5)
    assert rows.dtype == np.uint8
    got = sorted(r.tobytes() for r in rows)
    assert got == sorted(img.tobytes() for img in want.values())
    # use_collection's default loads X: it says what to stream instead.
    with pytest.raises(annbatch.errors.UnsupportedDatasetError, match=r"holds no X.*obsm/images"):
        Loader(batch_size=32).use_collection(collection)
    # An append keeps it so: inputs with X are refused, inputs without join.
    with pytest.raises(IncompatibleDatasetsError, match="has X but the collection"):
        collection.add_adatas([_images(72, 10, x=True)], progress=False)
    collection.add_adatas([_images(73, 20)], progress=False)
    assert collection.n_obs == 170


def test_inputs_without_x_must_all_lack_it_and_hold_an_array(tmp_path):
    with pytest.raises(IncompatibleDatasetsError, match="has X but AnnData 0 has none"):
        DatasetCollection(tmp_path / "a.zarr").add_adatas(
            [_images(80, 10), _images(81, 10, x=True)], progress=False
        )
    bare = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(4)]))
    with pytest.raises(IncompatibleDatasetsError, match="holds nothing to stream"):
        DatasetCollection(tmp_path / "b.zarr").add_adatas([bare], progress=False)
    other = _images(82, 10)
    other.obsm["pixels"] = other.obsm.pop("images")
    with (
        pytest.warns(UserWarning, match="not in every input"),
        pytest.raises(IncompatibleDatasetsError, match="share no layer or obsm"),
    ):
        DatasetCollection(tmp_path / "c.zarr").add_adatas([_images(83, 10), other], progress=False)
    assert not (tmp_path / "a.zarr").exists()
    assert not (tmp_path / "c.zarr").exists()


def test_h5ad_collection_appends(tmp_path, inputs):
    folder = tmp_path / "h5"
    collection = DatasetCollection(folder, is_collection_h5ad=True).add_adatas(
        inputs[:2], dataset_size=100, rng=1, progress=False
    )
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5ad")}
    extra = _adata(95, 70)
    extra.var_names = [f"g{j + 6}" for j in range(12)]  # half the genes are new: dropped
    path = write_adata(extra, tmp_path / "extra.h5ad")
    with pytest.warns(UserWarning, match="6 genes of the new inputs are not in the collection"):
        collection.add_adatas([path], dataset_size=100, progress=False)
    # The earlier files are untouched; the new rows are in new files, aligned to the genes.
    assert {p: before[p] for p in before} == {
        p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5ad") if p.name in before
    }
    again = DatasetCollection(folder)
    assert again.n_obs == sum(ad.read_h5ad(f).n_obs for f in folder.glob("*.h5ad"))
    new = ad.concat([ad.read_h5ad(folder / n) for n in again.dataset_names if n not in before])
    assert sorted(new.obs_names) == sorted(extra.obs_names)
    genes = list(again.var_names)
    dense = pd.DataFrame(_values(extra.X), index=extra.obs_names, columns=extra.var_names)
    expected = dense.reindex(columns=genes, fill_value=0).loc[new.obs_names].to_numpy()
    np.testing.assert_array_equal(_values(new.X), expected)
    loader = Loader(batch_size=64, to=None).use_collection(again)
    assert sum(b["X"].shape[0] for b in loader) == again.n_obs
    # The same data again is refused; another obs type too.
    with pytest.raises(annbatch.errors.DuplicateInputError):
        again.add_adatas(
            [write_adata(extra, tmp_path / "extra2.h5ad")], append=True, progress=False
        )
    assert not (folder / "_annbatch_build.zarr").exists()
