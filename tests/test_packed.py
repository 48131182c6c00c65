"""Packed collection layouts: values stored in the narrowest exact integer type, CSR indices in
uint16, read back exactly and in the inputs' dtype (or the stored one, on request)."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from annbatch import DatasetCollection, Loader
from annbatch._cli import main as cli
from annbatch._narrow import VALUES_DTYPE_ATTR, narrow_values, narrowest
from annbatch.errors import CorruptDataError


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([0, 1, 255], "float32", "uint8"),
        ([0, 256], "float32", "uint16"),
        ([0, 65_535], "float32", "uint16"),
        ([0, 65_536], "float32", None),  # uint32 is no narrower than float32
        ([0, 65_536], "float64", "uint32"),
        ([0, 2**32 - 1], "float64", "uint32"),
        ([0, 2**32], "float64", None),
        ([-128, 127], "float32", "int8"),
        ([-129, 127], "float32", "int16"),
        ([-32_768, 32_767], "float64", "int16"),
        ([-32_769, 0], "float32", None),
        ([-(2**31), 0], "float64", "int32"),
        ([0, 300], "int64", "uint16"),
        ([-1, 40_000], "int32", None),
        ([0, 3], "uint8", None),
        ([0, 1.5], "float32", None),
        ([0, np.nan], "float32", None),
        ([0, np.inf], "float64", None),
        ([-0.0, 1], "float32", None),  # -0.0 would read back as 0.0
        ([], "float32", None),
    ],
)
def test_narrowest_exact_type(values, dtype, expected):
    got = narrowest(np.array(values, dtype=dtype))
    assert got == (None if expected is None else np.dtype(expected))
    if got is not None:  # and it is exact
        assert np.array_equal(np.array(values, dtype=dtype).astype(got).astype(dtype), values)


def test_narrowest_checks_every_block(monkeypatch):
    """The checks run a block at a time: a bad value in the last block still counts."""
    import annbatch._narrow as narrow

    monkeypatch.setattr(narrow, "_BLOCK", 4)
    assert narrowest(np.array([1, 2, 3, 4, 5, 6, 7, 0.5], dtype=np.float32)) is None
    assert narrowest(np.array([1, 2, 3, 4, 5, 6, 7, 300], dtype=np.float32)) == np.uint16


@pytest.mark.parametrize(
    ("n_var", "index_type"), [(256, "uint8"), (65_536, "uint16"), (65_537, "int32")]
)
def test_csr_indices_narrowed_to_fit_the_columns(n_var, index_type):
    x = sp.csr_matrix(([1.0, 2.0], [0, n_var - 1], [0, 1, 2]), shape=(2, n_var), dtype=np.float32)
    packed, was = narrow_values(x)
    assert packed.indices.dtype == np.dtype(index_type)
    assert was == np.float32
    assert packed.data.dtype == np.uint8
    assert (packed.astype(np.float32) != x).nnz == 0


EDGES = {
    "float32 uint8 edge": ("float32", [0, 1, 254, 255]),
    "float32 above uint8": ("float32", [0, 255, 256]),
    "float32 uint16 edge": ("float32", [1, 65_535]),
    "float32 above uint16": ("float32", [1, 65_536]),
    "float64 above uint16": ("float64", [1, 65_536, 2**32 - 1]),
    "float32 int8 edge": ("float32", [-128, 127]),
    "float32 below int8": ("float32", [-129, 5]),
    "float32 fractions": ("float32", [0.25, 3]),
    "int64 counts": ("int64", [0, 7, 1_000]),
    "int32 uint8 edge": ("int32", [255, 0]),
}


def _adata(dtype: str, values: list, n_obs: int = 60, n_var: int = 40, seed: int = 0) -> ad.AnnData:
    """Rows whose nonzeros cycle through ``values`` (zeros dropped by CSR), a layer and an
    obsm array of the same values, dense."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((n_obs, n_var), dtype=dtype)
    mask = rng.random((n_obs, n_var)) < 0.3
    cycle = np.resize(np.array(values, dtype=dtype), int(mask.sum()))
    dense[mask] = cycle
    adata = ad.AnnData(
        X=sp.csr_matrix(dense),
        layers={"dense": dense.copy()},
        obsm={"rows": dense[:, :3].copy()},
        obs=pd.DataFrame(index=[f"s{seed}c{i}" for i in range(n_obs)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_var)]),
    )
    return adata


def _epoch(datasets: list, **kwargs) -> tuple[np.ndarray, np.dtype, np.ndarray]:
    loader = Loader(
        batch_size=16,
        chunk_size=4,
        preload_nchunks=8,
        shuffle=True,
        to=None,
        return_index=True,
        **kwargs,
    ).add_datasets(datasets)
    batches = list(loader)
    x = [b["X"].toarray() if sp.issparse(b["X"]) else np.asarray(b["X"]) for b in batches]
    index = np.concatenate([b["index"] for b in batches])
    return np.concatenate(x), batches[0]["X"].dtype, index


@pytest.mark.parametrize("compression", ["packed", "packed-lz4"])
@pytest.mark.parametrize("case", list(EDGES))
def test_packed_round_trip_is_exact(tmp_path, compression, case):
    """X (CSR), a dense layer and an obsm array come back with the stored values and the
    inputs' dtype from the Loader; stored narrower (when exactly possible); anndata reads the
    same values."""
    dtype, values = EDGES[case]
    adata = _adata(dtype, values)
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas(
        [adata], compression=compression, dataset_size=25, shuffle=False, progress=False
    )
    groups = list(collection)
    order = np.concatenate([g["obs"]["_index"][...] for g in groups])
    expected = adata[order]
    for key, element in (("X", "X"), ("layer", "layers/dense"), ("obsm", "obsm/rows")):
        truth = {"X": expected.X, "layer": expected.layers["dense"], "obsm": expected.obsm["rows"]}[
            key
        ]
        truth = truth.toarray() if sp.issparse(truth) else np.asarray(truth)
        datasets = [g[element] for g in groups]
        x, got_dtype, index = _epoch(datasets)
        assert got_dtype == np.dtype(dtype)
        np.testing.assert_array_equal(x, truth[index])
        stored = zarr.open_group(tmp_path / "c.zarr")[f"{groups[0].basename}/{element}"]
        stored_values = stored["data"] if isinstance(stored, zarr.Group) else stored
        want = narrowest(np.asarray(values, dtype=dtype))
        if want is not None:
            assert stored_values.dtype == want
            assert stored.attrs[VALUES_DTYPE_ATTR] == dtype
            _, narrow_dtype, _ = _epoch(datasets, stored_dtype=True)
            assert narrow_dtype == want
        else:
            assert stored_values.dtype == np.dtype(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read = [ad.io.read_elem(g[element]) for g in groups]
        read = [r.toarray() if sp.issparse(r) else r for r in read]
        np.testing.assert_array_equal(np.concatenate(read).astype(dtype), truth)


def test_anndata_reads_a_packed_dataset(tmp_path):
    adata = _adata("float32", [1, 2, 300])
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas([adata], progress=False)
    group = next(iter(collection))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = ad.read_zarr(tmp_path / "c.zarr" / group.basename)
    assert read.X.dtype == np.uint16
    assert read.X.indices.dtype == np.uint8
    names = read.obs_names.to_numpy()
    np.testing.assert_array_equal(read.X.toarray(), adata[names].X.toarray())


def test_appends_and_rebuilds_keep_the_inputs_dtype(tmp_path):
    """An append whose values need a wider type than the first datasets' still reads back as
    float32; a collection built from a packed collection's datasets keeps float32."""
    first = _adata("float32", [1, 2, 3], seed=0)
    second = _adata("float32", [1, 70_000], seed=1)  # float32 holds it; uint16 does not
    path = tmp_path / "c.zarr"
    DatasetCollection(path).add_adatas([first], dataset_size=30, progress=False)
    collection = DatasetCollection(path).add_adatas(
        [second], dataset_size=30, append=True, progress=False
    )
    stored = {g["X"]["data"].dtype for g in collection}
    assert stored == {np.dtype(np.uint8), np.dtype(np.float32)}
    groups = list(collection)
    x, dtype, index = _epoch([g["X"] for g in groups])
    assert dtype == np.float32
    names = np.concatenate([g["obs"]["_index"][...] for g in groups])
    both = ad.concat([first, second])
    np.testing.assert_array_equal(x, both[names].X.toarray()[index])
    # a collection of the collection's datasets: widened inputs, the same dtype
    again = DatasetCollection(tmp_path / "again.zarr").add_adatas(
        groups, compression="none", progress=False
    )
    assert {g["X"]["data"].dtype for g in again} == {np.dtype(np.float32)}
    x2, _dtype2, index2 = _epoch([g["X"] for g in again])
    names2 = np.concatenate([g["obs"]["_index"][...] for g in again])
    np.testing.assert_array_equal(x2, both[names2].X.toarray()[index2])


def test_h5ad_collection_holds_the_inputs_dtype(tmp_path):
    adata = _adata("float32", [1, 2, 3])
    collection = DatasetCollection(tmp_path / "h5", is_collection_h5ad=True).add_adatas(
        [adata], progress=False
    )
    files = sorted((tmp_path / "h5").glob("*.h5ad"))
    assert files
    with h5py.File(files[0], "r") as f:
        assert f["X"]["data"].dtype == np.float32
        assert f["layers"]["dense"].dtype == np.float32
    assert collection.n_obs == adata.n_obs


@pytest.mark.parametrize("declared", ["banana", "int8", "object", "S4", "i4,,", ">f4", "float16"])
def test_damaged_dtype_attribute_is_a_clear_error(tmp_path, declared):
    adata = _adata("float32", [1, 2, 300])
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas([adata], progress=False)
    group = next(iter(collection))
    zarr.open_group(tmp_path / "c.zarr")[group.basename]["X"].attrs[VALUES_DTYPE_ATTR] = declared
    with pytest.raises(CorruptDataError, match=VALUES_DTYPE_ATTR):
        Loader(batch_size=4, chunk_size=4, preload_nchunks=1).add_dataset(group["X"])


def test_stored_dtype_must_be_a_bool():
    from annbatch.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="stored_dtype must be a bool"):
        Loader(batch_size=4, chunk_size=4, preload_nchunks=1, stored_dtype="yes")  # type: ignore[arg-type]


def test_info_shows_stored_types(tmp_path, capsys):
    adata = _adata("float32", [1, 2, 300])
    DatasetCollection(tmp_path / "c.zarr").add_adatas([adata], progress=False)
    assert cli(["info", str(tmp_path / "c.zarr")]) == 0
    out = capsys.readouterr().out
    assert "uint16 + uint8 indices" in out
    assert "float32" in out
    assert "B/nnz" in out


def test_a_backed_anndata_of_a_packed_dataset_is_read_widened(tmp_path):
    """An AnnData opened with X on disk (load_x_and_obs) from a packed collection is an input
    in the dtype its values had."""
    from annbatch import load_x_and_obs

    adata = _adata("float32", [1, 2, 300])
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas([adata], progress=False)
    backed = [load_x_and_obs(g) for g in collection]
    again = DatasetCollection(tmp_path / "again.zarr").add_adatas(
        backed, compression="none", progress=False
    )
    assert {g["X"]["data"].dtype for g in again} == {np.dtype(np.float32)}
    x, _, index = _epoch([g["X"] for g in again])
    names = np.concatenate([g["obs"]["_index"][...] for g in again])
    np.testing.assert_array_equal(x, adata[names].X.toarray()[index])


def test_a_collection_keeps_its_layout_when_none_is_given(tmp_path):
    """Without compression=, repeating the call that built a collection (in a layout that is
    no longer the default) writes nothing, and an append uses the collection's layout."""
    path = tmp_path / "c.zarr"
    first, second = _adata("float32", [1, 2], seed=0), _adata("float32", [3, 4], seed=1)
    DatasetCollection(path).add_adatas([first], compression="none", progress=False)
    with pytest.warns(UserWarning, match="nothing was written"):
        DatasetCollection(path).add_adatas([first], progress=False)
    collection = DatasetCollection(path).add_adatas([second], append=True, progress=False)
    assert {g["X"]["data"].dtype for g in collection} == {np.dtype(np.float32)}
    assert {d["codec"] for d in collection.info()["datasets"]} == {"none"}


def test_uint64_indices_are_read(tmp_path):
    """uint64 column indices (which widen to no integer type together with int32) are read as
    scipy's index types."""
    x = sp.csr_matrix(np.array([[0, 1.0, 0], [2.0, 0, 3.0]], dtype=np.float32))
    group = zarr.open_group(tmp_path / "s.zarr", mode="w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.io.write_elem(group, "X", x)
    data = group["X"]["indices"][...]
    del group["X"]["indices"]
    group["X"].create_array("indices", data=data.astype(np.uint64))
    loader = Loader(batch_size=2, chunk_size=2, preload_nchunks=1, to=None, shuffle=False)
    batch = next(iter(loader.add_dataset(zarr.open_group(tmp_path / "s.zarr")["X"])))
    assert batch["X"].indices.dtype in (np.int32, np.int64)
    np.testing.assert_array_equal(batch["X"].toarray(), x.toarray())


@pytest.mark.parametrize(
    ("nnz_per_row", "n_obs", "expected_rows"),
    [(1, 20_000, 16_384), (8, 8_000, 2_048), (200, 3_000, 1_310), (1_500, 400, 174)],
)
def test_packed_lz4_value_chunks_hold_about_a_fixed_number_of_rows(
    tmp_path, nnz_per_row, n_obs, expected_rows
):
    """packed-lz4's values are chunked by rows: rows with few nonzeros get small chunks (a
    chunk is decoded whole for any of its rows), rows of UMI-like counts the largest; every
    row comes back exactly."""
    from annbatch.collection._layout import (
        PACKED_LZ4_CHUNK,
        PACKED_LZ4_CHUNK_ROWS,
        PACKED_LZ4_MIN_CHUNK,
    )

    n_var = max(2 * nnz_per_row, 10)
    rng = np.random.default_rng(0)
    cols = np.stack([rng.choice(n_var, nnz_per_row, replace=False) for _ in range(n_obs)])
    cols.sort(axis=1)
    x = sp.csr_matrix(
        (
            rng.integers(1, 50, n_obs * nnz_per_row).astype("float32"),
            cols.ravel(),
            np.arange(0, n_obs * nnz_per_row + 1, nnz_per_row),
        ),
        shape=(n_obs, n_var),
    )
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]))
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas(
        [adata], dataset_size=n_obs, shuffle=False, progress=False
    )
    (group,) = list(collection)
    chunk = group["X"]["data"].chunks[0]
    want = min(PACKED_LZ4_CHUNK, max(PACKED_LZ4_MIN_CHUNK, nnz_per_row * PACKED_LZ4_CHUNK_ROWS))
    assert chunk == min(want, x.nnz)
    assert chunk // nnz_per_row == min(expected_rows, n_obs)
    loader = Loader(
        chunk_size=64, preload_nchunks=4, batch_size=100, shuffle=True, to=None, return_index=True
    )
    loader.use_collection(collection)
    got = [(b["X"], b["index"]) for b in loader]
    index = np.concatenate([i for _, i in got])
    np.testing.assert_array_equal(np.sort(index), np.arange(n_obs))
    values = sp.vstack([b for b, _ in got]).toarray()
    np.testing.assert_array_equal(values, x.toarray()[index])


@pytest.mark.parametrize("strategy", ["concat-shuffle", "shuffle-concat"])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
@pytest.mark.parametrize(
    ("stacked", "values", "window_dtype"),
    [
        (True, ([1, 2, 300], [1, 2, 300]), {"uint16"}),
        (False, ([1, 2, 300], [1, 2, 300]), {"uint16"}),
        (False, ([-3, 2, 7], [-3, 2, 7]), {"int8"}),
        # a uint8 and a uint16 dataset: uint16 where a window holds rows of both
        (False, ([1, 2, 3], [1, 300]), {"uint8", "uint16"}),
    ],
    ids=["stacked", "own-layouts", "signed", "uint8-and-uint16"],
)
def test_windows_keep_stored_values_and_batches_are_cast_when_cut(
    tmp_path, monkeypatch, strategy, dense, batch_size, stacked, values, window_dtype
):
    """A packed collection's windows hold the values as stored (uint8, uint16, int8; the
    widest type of the datasets a window holds rows of), and every batch is cast to the inputs' dtype as it is cut:
    exact values, the inputs' dtype, sparse or dense, small windows (cut on the calling
    thread) and large ones (on the read threads), datasets of one layout (read as one stack)
    or each of its own."""
    import annbatch._core.sources.csr as csr
    import annbatch._core.window as window
    import annbatch.collection._layout as layout

    if stacked:  # chunks of 64 entries: every dataset's arrays of one layout
        for name in ("SPARSE_CHUNK", "SPARSE_CHUNK_UNCOMPRESSED", "PACKED_LZ4_CHUNK"):
            monkeypatch.setattr(layout, name, 64)
    stacked_reads: list[bool] = []
    stacked_job = csr.CSRSource._stacked_job

    def recording_stack(self, *args, **kwargs):
        job = stacked_job(self, *args, **kwargs)
        stacked_reads.append(job is not None)
        return job

    monkeypatch.setattr(csr.CSRSource, "_stacked_job", recording_stack)

    seen: list[np.dtype] = []
    assemble = window.assemble

    def recording(blocks, *args, **kwargs):
        seen.extend(b.dtype for b in blocks)
        return assemble(blocks, *args, **kwargs)

    monkeypatch.setattr(window, "assemble", recording)
    adatas = [_adata("float32", v, n_obs=300, seed=s) for s, v in enumerate(values)]
    # One dataset per input: each keeps the narrowest type of its own values.
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas(
        adatas, dataset_size=300, shuffle=False, progress=False
    )
    truth = sp.vstack([a.X for a in adatas]).toarray()
    groups = list(collection)
    order = np.concatenate([g["obs"]["_index"][...] for g in groups])
    names = np.concatenate([a.obs_names.to_numpy() for a in adatas])
    position = {name: i for i, name in enumerate(names)}
    expected = truth[[position[n] for n in order]]
    for chunk, preload in ((4, 16), (64, 8)):  # windows of 64 and of 512 rows
        seen.clear()
        loader = Loader(
            batch_size=batch_size, chunk_size=chunk, preload_nchunks=preload, shuffle=True,
            to=None, return_index=True, dense=dense, concat_strategy=strategy,
        ).use_collection(collection)  # fmt: skip
        batches = list(loader)
        assert {b["X"].dtype for b in batches} == {np.dtype("float32")}
        x = np.concatenate([np.asarray(b["X"]) if dense else b["X"].toarray() for b in batches])
        index = np.concatenate([b["index"] for b in batches])
        np.testing.assert_array_equal(np.sort(index), np.arange(expected.shape[0]))
        np.testing.assert_array_equal(x, expected[index])
        allowed = {np.dtype(d) for d in window_dtype}
        assert max(allowed, key=lambda d: d.itemsize) in seen  # windows of both datasets
        assert set(seen) <= allowed
    assert any(stacked_reads) == stacked
