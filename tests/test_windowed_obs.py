"""A collection's obs read window by window (issue 27): values, types and alignment with X exact
for any chunk / preload / batch / worker combination, damage caught, the index read only when
asked for, and a Loader that pickles to a handle, not to the data."""

from __future__ import annotations

import itertools
import pickle
import shutil
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _adata_files import write_adata
from annbatch import DatasetCollection, Loader, load_x_and_obs
from annbatch._core.obs import StoredObs
from annbatch._core.sources.indptr import StoredIndptr
from annbatch.collection._layout import OBS_CODECS
from annbatch.errors import ChecksumMismatchError, CollectionChangedError, CorruptDataError

if TYPE_CHECKING:
    from pathlib import Path

N_VAR = 4
SIZES = (700, 450, 900)  # rows of the three inputs
WINDOWED = ["cell_type", "donor", "uid", "score", "flag", "count"]


def _input(i: int, n: int, first: int) -> ad.AnnData:
    """Input ``i``: rows ``first .. first + n`` of the row space; X's first column is the
    row's ``uid``, so that every batch can check obs against X."""
    rng = np.random.default_rng(i)
    uid = np.arange(first, first + n)
    x = np.zeros((n, N_VAR), dtype=np.float32)
    x[:, 0] = uid
    x[:, 1:] = rng.integers(0, 3, (n, N_VAR - 1))
    count = pd.array(rng.integers(0, 50, n), dtype="Int64")
    count[rng.random(n) < 0.2] = pd.NA
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], n)),
            "donor": pd.Categorical([f"donor{i}"] * n),  # categories differ between inputs
            "uid": uid,
            "score": rng.random(n).astype(np.float32),
            "flag": rng.random(n) < 0.5,
            "count": count,
            "note": [f"note {u}" for u in uid],  # strings: held, not windowed
        },
        index=[f"cell{u}" for u in uid],
    )
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(N_VAR)]))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """A sparse collection of three inputs in several datasets, and all its inputs' obs."""
    folder = tmp_path_factory.mktemp("windowed")
    paths, frames, first = [], [], 0
    for i, n in enumerate(SIZES):
        adata = _input(i, n, first)
        adata.X = sp.csr_matrix(adata.X)
        paths.append(write_adata(adata, folder / f"in{i}.h5ad"))
        frames.append(adata.obs)
        first += n
    path = folder / "coll.zarr"
    DatasetCollection(path).add_adatas(paths, dataset_size=600, progress=False)
    expected = pd.concat(frames)
    expected["donor"] = expected["donor"].astype(
        pd.CategoricalDtype([f"donor{i}" for i in range(len(SIZES))])
    )
    return path, expected


def _loader(path: Path, **kwargs) -> Loader:
    index = kwargs.pop("obs_index", False)
    loader = Loader(to=None, return_index=True, **kwargs)
    return loader.use_collection(DatasetCollection(path, mode="r"), obs_index=index)


def _check_batch(batch: dict, expected: pd.DataFrame, *, names: bool) -> np.ndarray:
    """Check one batch's obs against X (aligned) and the inputs (exact); its uids."""
    obs = batch["obs"]
    uid = np.asarray(batch["X"][:, [0]].toarray()).ravel().astype(np.int64)
    np.testing.assert_array_equal(obs["uid"].to_numpy(), uid)  # obs aligned with X
    want = expected.iloc[uid]  # uid = position in the inputs' row space
    for column in expected.columns:
        got, exp = obs[column], want[column]
        assert got.dtype == exp.dtype, column
        np.testing.assert_array_equal(got.isna().to_numpy(), exp.isna().to_numpy())
        np.testing.assert_array_equal(
            got[~got.isna()].to_numpy(), exp[~exp.isna()].to_numpy(), err_msg=column
        )
    if names:
        np.testing.assert_array_equal(obs.index.to_numpy(), want.index.to_numpy())
    else:  # indexed by global position
        np.testing.assert_array_equal(obs.index.to_numpy(), batch["index"])
    return uid


def test_collections_read_obs_per_window_and_indptr_in_part(built):
    path, _ = built
    loader = _loader(path, batch_size=10)
    tables = loader._data.obs
    assert len(tables) == 4  # 2,050 rows in datasets of 600
    for table in tables:
        assert isinstance(table, StoredObs)
        assert sorted(table._windowed) == sorted([*WINDOWED, "src_path"])
        assert list(table._held) == ["note"]
        assert not table.has_index
    assert all(isinstance(s._indptr, StoredIndptr) for s in loader._data.sources)


@settings(
    max_examples=7, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunk_size=st.sampled_from([2, 5, 16, 37, 128, 300]),
    preload_nchunks=st.integers(1, 6),
    batch_size=st.integers(1, 250),
    shuffle=st.booleans(),
    names=st.booleans(),
)
def test_obs_values_and_alignment_exact(
    built, chunk_size, preload_nchunks, batch_size, shuffle, names
):
    path, expected = built
    loader = _loader(
        path,
        chunk_size=chunk_size,
        preload_nchunks=preload_nchunks,
        batch_size=min(batch_size, chunk_size * preload_nchunks),
        shuffle=shuffle,
        obs_index=names,
    )
    seen = np.concatenate([_check_batch(b, expected, names=names) for b in loader])
    np.testing.assert_array_equal(np.sort(seen), np.arange(sum(SIZES)))  # each row once


def _uids(loader: Loader) -> np.ndarray:
    """The uid of each row of ``loader``'s collection, from X (one unshuffled epoch)."""
    uid = np.empty(loader.n_obs, dtype=np.int64)
    for batch in loader:
        uid[batch["index"]] = np.asarray(batch["X"][:, [0]].toarray()).ravel()
    return uid


@st.composite
def _runs(draw, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted, disjoint runs of ``range(n_rows)`` and positions into their rows (any order,
    repeats allowed, as a sampler drawing with replacement gives)."""
    edges = sorted(draw(st.sets(st.integers(0, n_rows), min_size=2, max_size=12)))
    pairs = list(itertools.pairwise(edges))
    keep = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    pairs = [p for p, k in zip(pairs, keep, strict=True) if k] or pairs[:1]
    starts = np.array([a for a, _ in pairs], dtype=np.int64)
    stops = np.array([b for _, b in pairs], dtype=np.int64)
    n = int(np.sum(stops - starts))
    positions = np.array(
        draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=3 * n)), dtype=np.int64
    )
    return starts, stops, positions


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(runs=_runs(sum(SIZES)), names=st.booleans())
def test_obs_of_sorted_runs_equal_obs_of_their_rows(built, runs, names):
    """What a window's reads hand the obs reader (its rows as sorted runs, possibly across
    datasets, and each batch row's place in them) gives what the rows themselves give."""
    path, expected = built
    loader = _loader(path, batch_size=10, obs_index=names)
    uid_of_row = _uids(loader)
    obs = loader._data.obs_rows()
    starts, stops, positions = runs
    rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)])
    rows = rows[positions]
    got = obs.take_runs(starts, stops, positions)
    pd.testing.assert_frame_equal(got, obs.take(rows))
    np.testing.assert_array_equal(got["uid"].to_numpy(), uid_of_row[rows])  # aligned with X
    want = expected.iloc[uid_of_row[rows]]
    for column in expected.columns:
        g, w = got[column], want[column]
        np.testing.assert_array_equal(g.isna().to_numpy(), w.isna().to_numpy())
        np.testing.assert_array_equal(g[~g.isna()].to_numpy(), w[~w.isna()].to_numpy())
    if names:
        np.testing.assert_array_equal(got.index.to_numpy(), want.index.to_numpy())
    else:
        np.testing.assert_array_equal(got.index.to_numpy(), rows)


@pytest.mark.parametrize(
    ("starts", "stops", "offsets", "cut"),
    [
        ([0], [10], [0, 10], [(0, 10, 0)]),
        ([5, 12], [8, 30], [0, 10, 20, 40], [(5, 8, 0), (12, 20, 1), (20, 30, 2)]),
        # empty datasets (offsets that repeat) get no runs
        ([50], [150], [0, 100, 100, 200], [(50, 100, 0), (100, 150, 2)]),
        ([0], [300], [0, 100, 100, 100, 200, 300], [(0, 100, 0), (100, 200, 3), (200, 300, 4)]),
        ([], [], [0, 5], []),
    ],
)
def test_runs_are_cut_where_datasets_begin(starts, stops, offsets, cut):
    from annbatch._core.obs import _split_runs

    a, b, d = _split_runs(
        np.array(starts, dtype=np.int64),
        np.array(stops, dtype=np.int64),
        np.array(offsets, dtype=np.int64),
    )
    assert list(zip(a.tolist(), b.tolist(), d.tolist(), strict=True)) == cut


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [2])
def test_obs_exact_in_spawn_workers(built, num_workers):
    from torch.utils.data import DataLoader

    path, expected = built
    loader = _loader(path, chunk_size=16, preload_nchunks=4, batch_size=32, shuffle=True)
    data = DataLoader(
        loader, batch_size=None, num_workers=num_workers, multiprocessing_context="spawn"
    )
    seen = np.concatenate([_check_batch(b, expected, names=False) for b in data])
    np.testing.assert_array_equal(np.sort(seen), np.arange(sum(SIZES)))


def test_in_memory_obs_matches(built):
    """``load_adata`` keeps obs in memory, as before: the same values and types; and
    ``Loader._obs`` (read by scvi-tools) gives every dataset's obs whole."""
    path, expected = built
    windowed = _loader(path, batch_size=1000, obs_index=True)
    held = Loader(batch_size=1000, to=None).use_collection(
        DatasetCollection(path, mode="r"), load_adata=load_x_and_obs
    )
    whole = pd.concat(held._obs)
    frames = windowed._obs
    assert [len(f) for f in frames] == [len(f) for f in held._obs]
    pd.testing.assert_frame_equal(pd.concat(frames), whole)
    pd.testing.assert_frame_equal(
        whole[expected.columns], expected.loc[whole.index], check_categorical=False
    )


def test_a_loader_pickles_to_a_handle(built, tmp_path):
    """What workers and ranks receive does not grow with the rows: no obs, no indptr."""
    path, _ = built
    small = len(pickle.dumps(_loader(path, batch_size=10)))
    rng = np.random.default_rng(0)
    n = 40_000
    big = ad.AnnData(
        X=sp.random(n, N_VAR, density=0.5, format="csr", dtype=np.float32),
        obs=pd.DataFrame(
            {"cell_type": pd.Categorical(rng.choice(["B", "T"], n)), "n": np.arange(n)},
            index=[f"c{i}" for i in range(n)],
        ),
    )
    big_path = tmp_path / "big.zarr"
    DatasetCollection(big_path).add_adatas(
        [write_adata(big, tmp_path / "big.h5ad")], dataset_size=10_000, progress=False
    )
    large = len(pickle.dumps(_loader(big_path, batch_size=10)))
    assert large < 5_000, large  # the collection's location, not its datasets
    assert small < 5_000, small


def test_a_pickled_loader_reopens_its_collection(built, tmp_path):
    """What a worker receives reads the same rows; a collection appended to in between is
    an error there, not rows the main process does not know of."""
    path, expected = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    loader = _loader(copy, batch_size=100, chunk_size=10, preload_nchunks=10)
    sent = pickle.loads(pickle.dumps(loader))
    assert [s.shape for s in sent._data.sources] == [s.shape for s in loader._data.sources]
    seen = np.concatenate([_check_batch(b, expected, names=False) for b in sent])
    np.testing.assert_array_equal(np.sort(seen), np.arange(sum(SIZES)))
    extra = _input(9, 50, sum(SIZES))
    extra.X = sp.csr_matrix(extra.X)
    DatasetCollection(copy).add_adatas(
        [write_adata(extra, tmp_path / "extra.h5ad")], append=True, progress=False
    )
    with pytest.raises(CollectionChangedError, match="changed since the Loader was made"):
        pickle.loads(pickle.dumps(loader))


def test_damaged_obs_chunk_is_caught_while_reading(built, tmp_path):
    path, _ = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    shard = copy / "dataset_000001" / "obs" / "cell_type" / "codes" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0x5A  # inside the first chunk's bytes
    shard.write_bytes(bytes(raw))
    loader = _loader(copy, batch_size=50)  # opening reads no obs rows
    with pytest.raises(ChecksumMismatchError, match="obs column 'cell_type'") as info:
        list(loader)
    assert "dataset_000001" in str(info.value)


def test_a_code_outside_the_categories_is_an_error(built, tmp_path):
    """A checksum-valid code that names no category (a bug in a writer) never becomes a
    label: an error naming the column."""
    path, _ = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    codes = zarr.open_array(copy / "dataset_000000" / "obs" / "cell_type" / "codes", mode="r+")
    codes[7] = 100
    with pytest.raises(CorruptDataError, match=r"cell_type.*code 100 is outside its 3 categories"):
        list(_loader(copy, batch_size=50))


def test_older_collections_hold_large_compressed_obs_columns(built, tmp_path):
    """A collection written before obs was chunked for windows (one zstd chunk per column) is
    read as before: its columns held whole, exact."""
    path, expected = built
    copy = tmp_path / "old.zarr"
    shutil.copytree(path, copy)
    for group_path in sorted(copy.glob("dataset_*")):
        group = zarr.open_group(group_path, mode="r+")
        frame = ad.io.read_elem(group["obs"])
        del group["obs"]
        # as before: one chunk per column (zarr's default for these sizes, made explicit)
        ad.io.write_elem(group, "obs", frame, dataset_kwargs=OBS_CODECS | {"chunks": (10**5,)})
    loader = _loader(copy, batch_size=32, chunk_size=8, preload_nchunks=4, shuffle=True)
    table = loader._data.obs[0]
    assert isinstance(table, StoredObs)
    assert not table._windowed  # all held
    seen = np.concatenate([_check_batch(b, expected, names=False) for b in loader])
    np.testing.assert_array_equal(np.sort(seen), np.arange(sum(SIZES)))


def test_datasets_whose_categories_differ_in_order_keep_their_labels(tmp_path):
    """Codes mean what their own dataset's categories say: two datasets with the same
    categories in another order (pandas calls their dtypes equal) are not decoded with one
    of them, whether a window's rows come from one dataset or both."""
    from annbatch._core.obs import ObsRows
    from annbatch.collection._layout import obs_kwargs

    tables = []
    for i, order in enumerate((["a", "b"], ["b", "a"])):
        group = zarr.open_group(tmp_path / f"d{i}.zarr", mode="w", zarr_format=3)
        frame = pd.DataFrame(
            {"c": pd.Categorical(["a", "a", "b"], categories=order)}, index=["x", "y", "z"]
        )
        ad.io.write_elem(group, "obs", frame, dataset_kwargs=obs_kwargs(3))
        tables.append(StoredObs(group, 3))
    rows = ObsRows(tables, np.array([0, 3, 6]))
    for take in (np.arange(6), np.array([5, 0, 3, 2])):
        got = rows.take(take)["c"].astype(str).to_numpy()
        np.testing.assert_array_equal(got, np.array(["a", "a", "b"] * 2)[take])


# Opening a local collection: metadata read in one pass per dataset (collection/_snapshot.py),
# members built from it (_core/members.py), categories read once where datasets store them alike.


def test_snapshot_holds_what_zarr_reads(built):
    """A dataset opened from its metadata files has the same members, attributes and array
    metadata as zarr-python opens, and reads the same values."""
    from zarr.storage import LocalStore

    from annbatch._core.members import get_member, member
    from annbatch.collection._snapshot import open_snapshot

    path, _ = built
    for name in ("dataset_000000", "dataset_000001"):
        snap = open_snapshot(LocalStore(path, read_only=True), path, name)
        assert snap is not None
        plain = zarr.open_group(path / name, mode="r")
        assert dict(snap.attrs) == dict(plain.attrs)
        want = dict(plain.members(max_depth=None))
        got = dict(snap.members(max_depth=None))
        assert sorted(got) == sorted(want)
        for key, node in want.items():
            parent = snap
            for part in key.split("/"):
                parent = member(parent, part)
            assert type(parent) is type(node), key
            assert parent.metadata.to_dict() == node.metadata.to_dict() | (
                {"consolidated_metadata": parent.metadata.to_dict()["consolidated_metadata"]}
                if isinstance(node, zarr.Group)
                else {}
            ), key
            assert parent.store_path.path == f"{name}/{key}"
            if isinstance(node, zarr.Array):
                np.testing.assert_array_equal(parent[...], node[...])
        assert get_member(snap, "no such member") is None
        with pytest.raises(KeyError):
            member(snap, "no such member")


@pytest.mark.parametrize("damage", ["not json", "missing", "v2 metadata"])
def test_damaged_metadata_is_reported_as_zarr_reports_it(built, tmp_path, damage):
    """Metadata the snapshot cannot read sends the dataset to zarr-python, whose error the
    Loader reports as before (naming the dataset), never a half-opened dataset. A zarr.json
    holding zarr v2 metadata (no node_type: zarr-python refuses it) is one of those, although
    zarr's consolidated metadata would take it."""
    import json

    from annbatch.errors import AnnbatchError

    path, _ = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    meta = copy / "dataset_000001" / "obs" / "cell_type" / "zarr.json"
    if damage == "not json":
        meta.write_text("{ not json")
    elif damage == "missing":
        meta.unlink()
    else:
        attributes = json.loads(meta.read_text())["attributes"]
        meta.write_text(json.dumps({"zarr_format": 2, "attributes": attributes}))
    with pytest.raises(AnnbatchError) as info:
        list(_loader(copy, batch_size=50))
    assert "dataset_000001" in str(info.value) or "cell_type" in str(info.value)
    if damage == "v2 metadata":  # zarr's own words, not a member missing from the group
        assert "node_type" in str(info.value)


def test_an_array_with_zarr_v2_metadata_in_its_zarr_json_is_refused(built, tmp_path):
    """An obs column whose zarr.json holds zarr v2 array metadata (with v2 chunks beside it)
    is refused as zarr-python refuses it, not read as a v2 array."""
    import json

    from annbatch.errors import StoreReadError

    path, _ = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    column = copy / "dataset_000001" / "obs" / "uid"
    attributes = json.loads((column / "zarr.json").read_text())["attributes"]
    values = zarr.open_array(column, mode="r")[...]
    shutil.rmtree(column)
    v2 = zarr.create_array(
        column, shape=values.shape, chunks=values.shape, dtype=values.dtype, zarr_format=2
    )
    v2[...] = values
    document = json.loads((column / ".zarray").read_text())
    (column / ".zarray").unlink()
    (column / "zarr.json").write_text(json.dumps({**document, "attributes": attributes}))
    with pytest.raises(StoreReadError, match=r"dataset_000001.*node_type"):
        list(_loader(copy, batch_size=50))


def test_categories_stored_alike_are_read_once(built, monkeypatch):
    """Datasets whose categories arrays hold the same bytes share one read of them; datasets
    whose categories differ (donor: one per input) each read their own; labels exact."""
    import annbatch._core.obs as obs_module

    path, expected = built
    reads: list[str] = []
    original = obs_module.read_frame

    def counted(elem, frame, kind):
        reads.append(elem.store_path.path)
        return original(elem, frame, kind)

    monkeypatch.setattr(obs_module, "read_frame", counted)
    loader = _loader(path, batch_size=64, chunk_size=16, preload_nchunks=4, shuffle=True)
    n_datasets = len(DatasetCollection(path, mode="r"))
    cell_type = [r for r in reads if r.endswith("cell_type/categories")]
    donor = [r for r in reads if r.endswith("donor/categories")]
    assert len(cell_type) == 1 < n_datasets  # the same 3 categories everywhere
    assert 1 <= len(donor) <= n_datasets
    seen = np.concatenate([_check_batch(b, expected, names=False) for b in loader])
    np.testing.assert_array_equal(np.sort(seen), np.arange(sum(SIZES)))


def test_damaged_categories_are_caught_whatever_another_dataset_holds(built, tmp_path):
    """A dataset whose categories chunk is damaged differs in its bytes from the others', so
    it is read (and checked) on its own: an error naming it, never another dataset's labels."""
    from annbatch.errors import ChecksumMismatchError, CorruptChunkError

    path, _ = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    shard = copy / "dataset_000002" / "obs" / "cell_type" / "categories" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    shard.write_bytes(bytes(raw))
    with pytest.raises((ChecksumMismatchError, CorruptChunkError, CorruptDataError)) as info:
        _loader(copy, batch_size=50)
    assert "dataset_000002" in str(info.value)


def test_categories_in_a_linked_folder_are_read_per_dataset(built, tmp_path):
    """Categories whose chunks lie in a linked folder (which a walk of the array's folder does
    not enter) are not known by their bytes: two datasets whose categories have the same
    zarr.json but other chunks each get their own labels. (Written without the record that
    every chunk was written, as other writers do: annbatch then reads them through zarr.)"""
    from annbatch._core.chunks import COMPLETE_ATTR

    path, expected = built
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    # dataset_000001: the same categories in another order, its codes renumbered to match
    column = zarr.open_group(copy / "dataset_000001" / "obs" / "cell_type", mode="r+")
    order = np.array([2, 0, 1])
    column["categories"][...] = column["categories"][...][order]
    codes = column["codes"][...]
    column["codes"][...] = np.argsort(order)[codes].astype(codes.dtype)
    metadata = []
    for name in ("dataset_000000", "dataset_000001"):
        folder = copy / name / "obs" / "cell_type" / "categories"
        del zarr.open_array(folder, mode="r+").attrs[COMPLETE_ATTR]
        moved = tmp_path / f"{name}-categories-chunks"
        shutil.move(folder / "c", moved)
        (folder / "c").symlink_to(moved, target_is_directory=True)
        metadata.append((folder / "zarr.json").read_bytes())
    assert metadata[0] == metadata[1]
    seen = []
    for batch in _loader(copy, batch_size=100):
        uid = np.asarray(batch["X"][:, [0]].toarray()).ravel().astype(np.int64)
        np.testing.assert_array_equal(
            batch["obs"]["cell_type"].astype(str).to_numpy(),
            expected["cell_type"].iloc[uid].astype(str).to_numpy(),
        )
        seen.append(uid)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(sum(SIZES)))
