"""Arrays of many datasets read as one stack (annbatch._core.chunks.stacked and .small): a
window's obs columns, CSR row pointers, values and column indices of every dataset it touches,
each in one plan. Real zarr arrays and collections on disk; every read compared with the
stored values; damage named by the dataset it is in."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import Crc32cCodec

from annbatch._core.chunks import ChunkReader, direct_array
from annbatch._core.chunks.small import read_small, read_stacked, reads_small, stack_bases
from annbatch.errors import ChecksumMismatchError, CorruptChunkError

if TYPE_CHECKING:
    from pathlib import Path

LENGTHS = (1000, 2500, 17, 640)

LAYOUTS = {
    # as collections write obs: chunks with CRC32C, one shard per array
    "sharded-crc": lambda n: {
        "chunks": (64,),
        "shards": (max(1, -(-n // 64)) * 64,),
        "compressors": [Crc32cCodec()],
    },
    # several shards of several chunks, no checksums
    "sharded": lambda n: {"chunks": (64,), "shards": (256,), "compressors": None},
    # a file per chunk
    "unsharded": lambda n: {"chunks": (64,), "compressors": None},
}


def _arrays(
    root: Path, layout: str, dtype: str = "int64"
) -> tuple[list[np.ndarray], list[zarr.Array]]:
    rng = np.random.default_rng(0)
    values, arrays = [], []
    for k, n in enumerate(LENGTHS):
        v = rng.integers(-(2**40), 2**40, n).astype(dtype)
        a = zarr.create_array(root / f"a{k}", shape=(n,), dtype=dtype, **LAYOUTS[layout](n))
        a[:] = v
        values.append(v)
        arrays.append(a)
    return values, arrays


def _readers(arrays: list[zarr.Array], *, verify: bool) -> list[ChunkReader]:
    readers = [direct_array(a, verify_checksums=verify) for a in arrays]
    assert all(r is not None and reads_small(r) for r in readers)
    return readers  # type: ignore[return-value]


@st.composite
def _ranges(draw: st.DrawFn) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sorted, disjoint (possibly empty) ranges of each array."""
    out = []
    for n in LENGTHS:
        cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=12))))
        pairs = list(zip(cuts[::2], cuts[1::2], strict=False))
        out.append(
            (
                np.array([a for a, _ in pairs], dtype=np.int64),
                np.array([b for _, b in pairs], dtype=np.int64),
            )
        )
    return out


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, *_arrays(root, request.param)


@settings(max_examples=25, deadline=None)
@given(ranges=_ranges(), verify=st.booleans())
def test_stacked_reads_equal_the_arrays(stored, ranges, verify: bool) -> None:
    _, values, arrays = stored
    readers = _readers(arrays, verify=verify)
    bases = stack_bases(readers)
    assert bases is not None
    starts = np.concatenate([a + b for (a, _), b in zip(ranges, bases.tolist(), strict=True)])
    stops = np.concatenate([e + b for (_, e), b in zip(ranges, bases.tolist(), strict=True)])
    out = np.full(int(np.sum(stops - starts)), -1, dtype=np.int64)
    read_stacked(readers, bases, starts, stops, out)
    expected = np.concatenate(
        [
            v[a:b]
            for v, (s, e) in zip(values, ranges, strict=True)
            for a, b in zip(s, e, strict=True)
        ]
        or [np.empty(0, dtype=np.int64)]
    )
    np.testing.assert_array_equal(out, expected)
    again = np.full_like(out, -1)  # the chunks located by the first read (ChunkTable)
    read_stacked(readers, bases, starts, stops, again)
    np.testing.assert_array_equal(again, expected)
    # one array alone: the same path
    s, e = ranges[1]
    one = np.empty(int(np.sum(e - s)), dtype=np.int64)
    read_small(readers[1], s, e, one)
    np.testing.assert_array_equal(
        one, np.concatenate([values[1][a:b] for a, b in zip(s, e, strict=True)] or [one])
    )


def test_arrays_of_other_layouts_are_not_stacked(tmp_path: Path) -> None:
    _, a = _arrays(tmp_path / "a", "sharded")
    _, b = _arrays(tmp_path / "b", "sharded", dtype="int32")
    assert stack_bases(_readers(a[:1] + b[:1], verify=False)) is None  # dtypes differ
    assert stack_bases(_readers(a, verify=False) + _readers(a, verify=True)) is None  # policy


def _damage_chunk(array_dir: Path) -> None:
    shard = sorted((array_dir / "c").iterdir())[0]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF  # a byte of the first chunk's values
    shard.write_bytes(bytes(raw))


def test_damage_is_named_by_its_array(tmp_path: Path) -> None:
    values, arrays = _arrays(tmp_path, "sharded-crc")
    _damage_chunk(tmp_path / "a2")
    readers = _readers(arrays, verify=True)
    bases = stack_bases(readers)
    assert bases is not None
    names = [f"column {k}" for k in range(len(readers))]
    starts = bases + 0
    stops = bases + np.array(LENGTHS)
    out = np.empty(sum(LENGTHS), dtype=np.int64)
    with pytest.raises(ChecksumMismatchError, match=r"^column 2: .*a2.*CRC32C"):
        read_stacked(readers, bases, starts, stops, out, names=names)
    # reads that do not touch the damaged chunk succeed
    keep = [0, 1, 3]
    read_stacked(
        readers, bases, starts[keep], stops[keep], out[: sum(LENGTHS[k] for k in keep)], names=names
    )
    np.testing.assert_array_equal(
        out[: sum(LENGTHS[k] for k in keep)], np.concatenate([values[k] for k in keep])
    )


@pytest.mark.parametrize("damage", ["checksum", "cut"])
def test_damage_inside_a_run_of_adjacent_chunks(tmp_path: Path, damage: str) -> None:
    """Chunks read whole that lie back to back in a shard share one read: damage to the
    middle one of three (a changed byte, or the shard cut inside it) names that chunk, and
    reads of the chunks before it still succeed."""
    values, arrays = _arrays(tmp_path, "sharded-crc")
    readers = _readers(arrays, verify=True)
    bases = stack_bases(readers)
    assert bases is not None
    shard = sorted((tmp_path / "a1" / "c").iterdir())[0]
    raw = bytearray(shard.read_bytes())
    stored = 64 * 8 + 4  # a chunk of 64 int64 entries and its CRC32C
    if damage == "checksum":
        raw[3 * stored + 9] ^= 0xFF  # chunk 3's values
        expected: type[Exception] = ChecksumMismatchError
    else:
        raw = raw[: 3 * stored + 100]  # chunk 3 cut short, and the index with it
        expected = CorruptChunkError
    out = np.empty(3 * 64, dtype=np.int64)
    starts, stops = bases[1:2] + 2 * 64, bases[1:2] + 5 * 64  # chunks 2, 3 and 4 of a1
    read_stacked(readers, bases, starts, stops, out)  # the chunks located before the damage
    np.testing.assert_array_equal(out, values[1][2 * 64 : 5 * 64])
    shard.write_bytes(bytes(raw))
    with pytest.raises(expected, match=r"inner chunk 3 of shard c/0 \(entries from 192\) of .*a1 "):
        read_stacked(readers, bases, starts, stops, out)
    read_stacked(readers, bases, starts - 64, stops - 128, out[:128])  # chunks 1 and 2
    np.testing.assert_array_equal(out[:128], values[1][64 : 3 * 64])


def test_damaged_shard_index_of_an_array_not_read(tmp_path: Path) -> None:
    """A stack's table cannot be made when one array's shard index is damaged: reads of the
    other arrays go chunk by chunk and succeed; a read of the damaged shard names it."""
    values, arrays = _arrays(tmp_path, "sharded")
    shard = sorted((tmp_path / "a2" / "c").iterdir())[0]
    raw = bytearray(shard.read_bytes())
    raw[-6] ^= 0xFF  # inside the shard index, covered by its CRC32C
    shard.write_bytes(bytes(raw))
    readers = _readers(arrays, verify=False)
    bases = stack_bases(readers)
    assert bases is not None
    starts, stops = bases[[0, 1, 3]] + 5, bases[[0, 1, 3]] + 15
    out = np.empty(30, dtype=np.int64)
    for _ in range(2):
        read_stacked(readers, bases, starts, stops, out)
        np.testing.assert_array_equal(out, np.concatenate([values[k][5:15] for k in (0, 1, 3)]))
    with pytest.raises(ChecksumMismatchError, match=r"index of shard .*a2.*CRC32C"):
        read_stacked(readers, bases, bases[2:3] + 5, bases[2:3] + 15, out[:10])


def test_chunks_never_written_beside_written_ones(tmp_path: Path) -> None:
    """Chunks read in part (located all at once) and chunks never written (the fill value)
    in one read, over a shard never written at all too."""
    arrays, values = [], []
    for k, n in enumerate((700, 300)):
        a = zarr.create_array(
            tmp_path / f"a{k}", shape=(n,), dtype="int64", chunks=(64,), shards=(256,),
            compressors=None, fill_value=-7,
        )  # fmt: skip
        a[0:64] = np.arange(64)
        if n > 600:
            a[520:600] = np.arange(80) + 1000  # chunks 8 and 9 of shard 2; shard 1 never written
        arrays.append(a)
        values.append(a[...])
    readers = _readers(arrays, verify=False)
    bases = stack_bases(readers)
    assert bases is not None
    local = [(np.array([3, 60, 250, 500, 590]), np.array([40, 70, 300, 530, 700])),
             (np.array([0, 70]), np.array([10, 300]))]  # fmt: skip
    starts = np.concatenate([a + b for (a, _), b in zip(local, bases.tolist(), strict=True)])
    stops = np.concatenate([e + b for (_, e), b in zip(local, bases.tolist(), strict=True)])
    expected = np.concatenate(
        [v[a:b] for v, (s, e) in zip(values, local, strict=True) for a, b in zip(s, e, strict=True)]
    )
    for _ in range(2):
        out = np.zeros(expected.size, dtype=np.int64)
        read_stacked(readers, bases, starts, stops, out)
        np.testing.assert_array_equal(out, expected)


def test_shard_cut_short_after_its_chunks_were_located(tmp_path: Path) -> None:
    """A shard truncated after a read located its chunks (their places are kept): the next
    read of them is an error naming the array, not stale or zeroed values."""
    _, arrays = _arrays(tmp_path, "sharded")
    readers = _readers(arrays, verify=False)
    bases = stack_bases(readers)
    assert bases is not None
    out = np.empty(100, dtype=np.int64)
    starts, stops = bases[1:2] + 1, bases[1:2] + 101
    read_stacked(readers, bases, starts, stops, out)
    shard = sorted((tmp_path / "a1" / "c").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CorruptChunkError, match=r"a1.*(ends before|truncated)"):
        read_stacked(readers, bases, starts, stops, out)


def test_short_chunk_is_an_error(tmp_path: Path) -> None:
    _, arrays = _arrays(tmp_path, "unsharded")
    chunk = tmp_path / "a1" / "c" / "3"
    chunk.write_bytes(chunk.read_bytes()[:100])
    readers = _readers(arrays, verify=False)
    bases = stack_bases(readers)
    assert bases is not None
    out = np.empty(10, dtype=np.int64)
    with pytest.raises(CorruptChunkError, match="a1"):
        read_stacked(readers, bases, bases[1:2] + 200, bases[1:2] + 210, out)


# --------------------------------------------------------------------------------------------
# A Loader over a collection: a window's rows of every dataset read as one plan.


def _collection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: str):
    """A collection of 4 datasets whose X arrays have chunks of 64 entries (so a window's
    ranges start and end inside chunks and datasets share one layout), and the input rows."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    import annbatch.collection._layout as layout
    from annbatch import DatasetCollection

    for name in ("SPARSE_CHUNK", "SPARSE_CHUNK_UNCOMPRESSED", "PACKED_LZ4_CHUNK"):
        monkeypatch.setattr(layout, name, 64)
    rng = np.random.default_rng(3)
    n_obs, n_var = 400, 40
    dense = (rng.random((n_obs, n_var)) < 0.2) * rng.integers(1, 200, (n_obs, n_var))
    names = [f"cell{k}" for k in range(n_obs)]
    adata = ad.AnnData(
        X=sp.csr_matrix(dense.astype("float32")),
        obs=pd.DataFrame({"k": np.arange(n_obs)}, index=names),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_var)]),
    )
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    collection = DatasetCollection(tmp_path / f"{compression}.zarr").add_adatas(
        [str(path)], dataset_size=100, progress=False, rng=0, compression=compression
    )
    return collection, pd.DataFrame(dense.astype("float32"), index=names)


@pytest.mark.parametrize("compression", ["packed-lz4", "packed", "none", "zstd"])
def test_loader_reads_windows_of_many_datasets_as_one(tmp_path, monkeypatch, compression):
    from annbatch import Loader
    from annbatch._core.sources.csr import CSRSource

    collection, expected = _collection(tmp_path, monkeypatch, compression)
    assert len(collection) == 4
    stacked = []
    original = CSRSource._stacked_job

    def spy(self, *args, **kwargs):
        job = original(self, *args, **kwargs)
        stacked.append(job is not None)
        return job

    monkeypatch.setattr(CSRSource, "_stacked_job", spy)
    for chunk, preload in ((1, 40), (7, 9), (64, 4)):
        loader = Loader(
            chunk_size=chunk, preload_nchunks=preload, batch_size=16, shuffle=True, to=None
        )
        loader.use_collection(collection, obs_index=True)
        seen = []
        for batch in loader:
            names = batch["obs"].index
            np.testing.assert_array_equal(batch["X"].toarray(), expected.loc[names].to_numpy())
            seen.extend(names)
        assert sorted(seen) == sorted(expected.index)  # every row once
    assert stacked
    assert all(stacked)


def test_damaged_column_index_names_its_dataset(tmp_path, monkeypatch):
    from annbatch import Loader
    from annbatch.errors import CorruptDataError

    collection, _ = _collection(tmp_path, monkeypatch, "none")
    group = list(collection)[2]
    indices = group["X"]["indices"]
    values = indices[:]
    values[5] = 10_000  # a column index beyond the 40 genes
    indices[:] = values
    loader = Loader(chunk_size=50, preload_nchunks=8, batch_size=400, shuffle=False, to=None)
    loader.use_collection(collection)
    name = str(group.path if hasattr(group, "path") else group.name).strip("/").split("/")[-1]
    with pytest.raises(CorruptDataError, match=rf"{name}.*column index 10000 is outside \[0, 40\)"):
        for _ in loader:
            pass


def test_codecs_that_decode_by_their_settings_are_not_stacked(tmp_path: Path) -> None:
    """zarr v2 compressors such as Shuffle decode by their settings: arrays that differ in them
    are read one by one (stacked, the second decoded with the first's settings came back
    scrambled, without an error)."""
    import numcodecs

    from annbatch._core.chunks.stacked import StackedReader

    values = [np.arange(100, dtype="int64") * 1000 + 7, np.arange(100, dtype="int64") * 999 + 3]
    readers = []
    for k, size in enumerate((8, 4)):
        a = zarr.create_array(
            tmp_path / f"s{k}",
            shape=(100,),
            dtype="int64",
            chunks=(32,),
            zarr_format=2,
            compressors=numcodecs.Shuffle(elementsize=size),
            filters=None,
        )
        a[:] = values[k]
        readers.append(direct_array(a))
    assert all(r is not None for r in readers)
    assert StackedReader.of(readers) is None
    assert StackedReader.of([readers[0], readers[0]]) is not None  # same settings: stacked


def test_indptr_beyond_int64_names_its_dataset(tmp_path: Path) -> None:
    from annbatch._core.sources.indptr import StoredIndptr, stacked_pieces
    from annbatch.errors import CorruptDataError

    def stored(name: str, v: np.ndarray, where: str) -> StoredIndptr:
        a = zarr.create_array(
            tmp_path / name,
            shape=v.shape,
            dtype="uint64",
            chunks=(64,),
            shards=(256,),
            compressors=[Crc32cCodec()],
        )
        a[:] = v
        reader = direct_array(a)
        assert reader is not None
        return StoredIndptr(reader, n_obs=100, nnz=100, where=where)

    good = np.arange(101, dtype=np.uint64)
    bad = good.copy()
    bad[50] = 2**63 + 5
    indptrs = [stored("p0", good, "DS0"), stored("p1", bad, "DS1")]
    ranges = [(np.array([0]), np.array([10])), (np.array([40]), np.array([60]))]
    with pytest.raises(CorruptDataError, match=r"^DS1: indptr holds values beyond the int64"):
        stacked_pieces(indptrs, ranges)


# --------------------------------------------------------------------------------------------
# X's tasks locate their chunks through chunk tables (annbatch._core.chunks.table); a Loader's
# CSR datasets are stacked once (annbatch._core.sources.stack).


def _x_arrays(root: Path, compressed: bool) -> tuple[list[np.ndarray], list[zarr.Array]]:
    """1-D arrays like X's values: several shards of several chunks, with CRC32C; a chunk and
    a whole shard never written (the fill value) in the first."""
    from zarr.codecs import BloscCodec

    rng = np.random.default_rng(1)
    compressors = [BloscCodec(cname="lz4"), Crc32cCodec()] if compressed else [Crc32cCodec()]
    values, arrays = [], []
    for k, n in enumerate(LENGTHS):
        a = zarr.create_array(
            root / f"x{k}", shape=(n,), dtype="float32", chunks=(64,), shards=(256,),
            compressors=compressors, fill_value=-1.0,
        )  # fmt: skip
        v = rng.integers(0, 50, n).astype("float32")
        if k == 0:  # chunk 1 and shard 2 (entries 512:768) never written
            a[0:64] = v[0:64]
            a[128:512] = v[128:512]
            a[768:] = v[768:]
        else:
            a[:] = v
        values.append(a[...])
        arrays.append(a)
    return values, arrays


def _read_tasks(reader: ChunkReader, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    out = np.full(int(np.sum(stops - starts)), np.nan, dtype=reader.dtype)
    for task in reader.tasks(starts, stops, out, 3):
        task()
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["blosc", "uncompressed"])
def x_stored(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return _x_arrays(tmp_path_factory.mktemp("x"), request.param)


@settings(max_examples=25, deadline=None)
@given(ranges=_ranges())
def test_x_tasks_through_tables_equal_the_arrays(x_stored, ranges) -> None:
    """Reads located by chunk tables (of an array, and of a stack of arrays) equal the stored
    values and the per-chunk path's, never-written chunks and shards included."""
    import annbatch._core.chunks.table as table
    from annbatch._core.chunks.stacked import StackedReader

    values, arrays = x_stored
    readers = [direct_array(a) for a in arrays]
    stack = StackedReader.of(readers)  # type: ignore[arg-type]
    assert stack is not None
    bases = stack.bases.tolist()
    starts = np.concatenate([a + b for (a, _), b in zip(ranges, bases, strict=True)])
    stops = np.concatenate([e + b for (_, e), b in zip(ranges, bases, strict=True)])
    expected = np.concatenate(
        [
            v[a:b]
            for v, (s, e) in zip(values, ranges, strict=True)
            for a, b in zip(s, e, strict=True)
        ]
        or [np.empty(0, dtype="float32")]
    )
    smallest = table.LOCATE_MIN_CHUNKS
    try:
        table.LOCATE_MIN_CHUNKS = 1  # every task located through the table
        np.testing.assert_array_equal(_read_tasks(stack, starts, stops), expected)
        assert table.table_of(stack) is not None
        np.testing.assert_array_equal(_read_tasks(stack, starts, stops), expected)
    finally:
        table.LOCATE_MIN_CHUNKS = smallest
    np.testing.assert_array_equal(_read_tasks(stack, starts, stops), expected)  # as configured
    stack.chunk_table = False  # no table: chunk by chunk
    np.testing.assert_array_equal(_read_tasks(stack, starts, stops), expected)
    s, e = ranges[0]  # one array alone, with its own table
    alone = direct_array(arrays[0])
    assert alone is not None
    np.testing.assert_array_equal(
        _read_tasks(alone, s, e),
        np.concatenate([values[0][a:b] for a, b in zip(s, e, strict=True)] or [np.empty(0)]),
    )


def test_no_table_beyond_its_shard_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import annbatch._core.chunks.table as table

    values, arrays = _x_arrays(tmp_path, compressed=True)
    monkeypatch.setattr(table, "LOCATE_MIN_CHUNKS", 1)
    monkeypatch.setattr(table, "TABLE_MAX_SHARDS", 2)  # LENGTHS[1] = 2500 entries: 10 shards
    reader = direct_array(arrays[1])
    assert reader is not None
    np.testing.assert_array_equal(
        _read_tasks(reader, np.array([5, 2000]), np.array([300, 2500])),
        np.concatenate([values[1][5:300], values[1][2000:2500]]),
    )
    assert table.table_of(reader) is None


def test_damaged_shard_index_outside_a_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard index that cannot be read leaves the array without a table: reads of other
    shards succeed as before, and a read of the damaged shard names it."""
    import annbatch._core.chunks.table as table

    values, arrays = _x_arrays(tmp_path, compressed=True)
    monkeypatch.setattr(table, "LOCATE_MIN_CHUNKS", 1)
    shard = tmp_path / "x1" / "c" / "3"
    raw = bytearray(shard.read_bytes())
    raw[-6] ^= 0xFF  # inside the shard index, covered by its CRC32C
    shard.write_bytes(bytes(raw))
    reader = direct_array(arrays[1])
    assert reader is not None
    np.testing.assert_array_equal(
        _read_tasks(reader, np.array([0]), np.array([700])), values[1][:700]
    )
    assert table.table_of(reader) is None
    with pytest.raises(ChecksumMismatchError, match=r"index of shard .*x1.*c.3.*CRC32C"):
        _read_tasks(reader, np.array([760]), np.array([800]))


def test_a_loaders_csr_datasets_share_one_stack(tmp_path, monkeypatch) -> None:
    """Every window of a Loader over several CSR datasets reads at the places of one stack of
    all of them, made once; a Loader that crosses a pickle (a DataLoader worker) is linked
    again; every row once, values and obs as stored."""
    import pickle

    import anndata as ad

    from annbatch import Loader
    from annbatch._core.sources.csr import CSRSource

    collection, expected = _collection(tmp_path, monkeypatch, "packed-lz4")
    placed = []
    original = CSRSource._stacked_job

    def spy(self, csr, pointers, n_tasks, allocate, placed_arg=None, **kwargs):
        placed.append(placed_arg is not None)
        return original(self, csr, pointers, n_tasks, allocate, placed_arg, **kwargs)

    monkeypatch.setattr(CSRSource, "_stacked_job", spy)
    by_collection = Loader(chunk_size=7, preload_nchunks=9, batch_size=16, shuffle=True, to=None)
    by_collection.use_collection(collection, obs_index=True)
    groups = list(collection)
    by_datasets = Loader(chunk_size=7, preload_nchunks=9, batch_size=16, shuffle=True, to=None)
    by_datasets.add_datasets(
        [g["X"] for g in groups], obs=[ad.io.read_elem(g["obs"]) for g in groups]
    )
    for loader in (
        by_collection,
        by_datasets,
        *(pickle.loads(pickle.dumps(x)) for x in (by_collection, by_datasets)),
    ):
        sources = loader._data.sources
        stack = sources[0]._place[0]
        assert stack.stacks() is not None
        assert [s._place for s in sources] == [(stack, k) for k in range(4)]
        seen = []
        for batch in loader:
            names = batch["obs"].index
            np.testing.assert_array_equal(batch["X"].toarray(), expected.loc[names].to_numpy())
            seen.extend(names)
        assert sorted(seen) == sorted(expected.index)
    assert placed
    assert all(placed)


def test_datasets_of_other_layouts_in_one_loader(tmp_path, monkeypatch) -> None:
    """Datasets whose arrays cannot be stacked (other codecs) share no stack: each window is
    read as before, every row once and as stored."""
    from annbatch import Loader

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, expected = _collection(tmp_path / "a", monkeypatch, "packed-lz4")
    other, _ = _collection(tmp_path / "b", monkeypatch, "zstd")
    import anndata as ad

    groups = [*list(one)[:2], *list(other)[2:]]  # two datasets of each
    obs = [ad.io.read_elem(g["obs"]) for g in groups]
    loader = Loader(chunk_size=9, preload_nchunks=7, batch_size=32, shuffle=True, to=None)
    loader.add_datasets([g["X"] for g in groups], obs=obs)
    stack = loader._data.sources[0]._place[0]
    assert stack.stacks() is None
    seen = []
    for batch in loader:
        names = batch["obs"].index
        np.testing.assert_array_equal(batch["X"].toarray(), expected.loc[names].to_numpy())
        seen.extend(names)
    assert sorted(seen) == sorted(n for o in obs for n in o.index)
    assert len(seen) == 400


def test_a_copy_that_adds_datasets_while_the_original_iterates(tmp_path, monkeypatch) -> None:
    """scvi-tools copies Loaders: datasets added to a copy while the original is in an epoch
    re-link the sources they share, and the original still yields every one of its rows
    once, as stored."""
    import copy

    import anndata as ad

    from annbatch import Loader

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    collection, expected = _collection(tmp_path / "a", monkeypatch, "packed-lz4")
    more, _ = _collection(tmp_path / "b", monkeypatch, "packed-lz4")
    loader = Loader(chunk_size=7, preload_nchunks=3, batch_size=8, shuffle=True, to=None)
    loader.use_collection(collection, obs_index=True)
    seen = []
    for i, batch in enumerate(loader):
        names = batch["obs"].index
        np.testing.assert_array_equal(batch["X"].toarray(), expected.loc[names].to_numpy())
        seen.extend(names)
        if i == 3:
            other = copy.copy(loader)
            groups = list(more)
            other.add_datasets(
                [g["X"] for g in groups], obs=[ad.io.read_elem(g["obs"]) for g in groups]
            )
    assert sorted(seen) == sorted(expected.index)
    assert other.n_obs == 2 * loader.n_obs
    rows = 0
    for batch in other:
        names = batch["obs"].index
        np.testing.assert_array_equal(batch["X"].toarray(), expected.loc[names].to_numpy())
        rows += len(names)
    assert rows == 800


_PINNED_FORK = """
import os, sys
import numpy as np, pandas as pd
from annbatch import DatasetCollection, Loader
from annbatch._core.chunks.descriptors import OPEN_FILES

expected = pd.read_pickle(sys.argv[2])
loader = Loader(chunk_size=7, preload_nchunks=9, batch_size=16, shuffle=True, to=None)
loader.use_collection(DatasetCollection(sys.argv[1], mode="r"), obs_index=True)


def epoch(e):
    loader.set_epoch(e)
    seen = []
    for batch in loader:
        names = batch["obs"].index
        np.testing.assert_array_equal(batch["X"].toarray(), expected.loc[names].to_numpy())
        np.testing.assert_array_equal(batch["obs"]["k"].to_numpy(), [int(n[4:]) for n in names])
        seen.extend(names)
    assert sorted(seen) == sorted(expected.index), "not every row once"


epoch(0)
assert OPEN_FILES.pinned > 0, "no table pinned its files"
# Descriptors the child opens first would take the numbers of the parent's pinned ones.
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    code = 1
    try:
        assert OPEN_FILES.pinned == 0
        epoch(1)
        epoch(2)
        os.write(write, str(OPEN_FILES.pinned).encode())
        code = 0
    finally:
        os._exit(code)
os.close(write)
pinned_in_child = os.read(read, 16).decode()
assert os.waitpid(pid, 0)[1] == 0, "the child failed"
epoch(3)  # the parent's pins are untouched by the child
print(pinned_in_child)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_pinned_files_in_a_forked_child(tmp_path, monkeypatch) -> None:
    """A Loader forked after an epoch (a DataLoader worker under ``fork``): the parent's
    pinned descriptors are closed in the child, whose reads pin their own; every row once,
    values and obs as stored, in the child and in the parent after it. In a process of its
    own, as the other fork tests."""
    import subprocess
    import sys

    collection, expected = _collection(tmp_path, monkeypatch, "packed-lz4")
    frame = tmp_path / "expected.pkl"
    expected.to_pickle(frame)
    done = subprocess.run(
        [sys.executable, "-c", _PINNED_FORK, str(collection.path), str(frame)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip()) > 0  # the child pinned its own


def test_pins_go_with_the_loader(tmp_path, monkeypatch) -> None:
    import gc

    from annbatch import Loader
    from annbatch._core.chunks.descriptors import OPEN_FILES

    collection, expected = _collection(tmp_path, monkeypatch, "packed-lz4")
    gc.collect()
    before = OPEN_FILES.pinned
    users = sum(e.users for e in OPEN_FILES._entries.values())
    loader = Loader(chunk_size=7, preload_nchunks=9, batch_size=16, shuffle=True, to=None)
    loader.use_collection(collection, obs_index=True)
    for batch in loader:
        np.testing.assert_array_equal(
            batch["X"].toarray(), expected.loc[batch["obs"].index].to_numpy()
        )
    assert OPEN_FILES.pinned > before
    del loader, batch
    gc.collect()
    OPEN_FILES.give_back_all([])
    assert OPEN_FILES.pinned == before
    assert sum(e.users for e in OPEN_FILES._entries.values()) == users


@pytest.mark.parametrize("room", [0, 5])
def test_tables_beyond_the_pin_bound_borrow_per_read(tmp_path, monkeypatch, room) -> None:
    """With room to pin no file, or one table's 4 files, the other tables borrow their files
    per read as before; every row once, values as stored."""
    import gc

    from annbatch import Loader
    from annbatch._core.chunks.descriptors import OPEN_FILES

    collection, expected = _collection(tmp_path, monkeypatch, "packed-lz4")
    gc.collect()
    before = OPEN_FILES.pinned
    monkeypatch.setattr(OPEN_FILES, "capacity", 2 * (before + room))
    loader = Loader(chunk_size=7, preload_nchunks=9, batch_size=16, shuffle=True, to=None)
    loader.use_collection(collection, obs_index=True)
    seen = []
    most = before
    for batch in loader:
        names = batch["obs"].index
        np.testing.assert_array_equal(batch["X"].toarray(), expected.loc[names].to_numpy())
        seen.extend(names)
        most = max(most, OPEN_FILES.pinned)
        assert OPEN_FILES.pinned <= before + room
    assert sorted(seen) == sorted(expected.index)
    assert most > before if room else most == before  # 5: one table of 4 files pinned
