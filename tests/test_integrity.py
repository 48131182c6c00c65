"""Read path integrity: structural checks when data is added, per-window index checks, shard
index and checksum verification, clear errors, the zarr fallback, and ``annbatch verify``."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import annbatch._core.chunks.layout as zarr_layout
from annbatch import DatasetCollection, Loader, load_x_and_obs, verify
from annbatch._cli import main as cli
from annbatch._core.chunks import COMPLETE_ATTR, direct_array
from annbatch._core.sources import as_row_source
from annbatch.errors import (
    AnnbatchError,
    ChecksumMismatchError,
    ClosedDatasetError,
    CorruptChunkError,
    CorruptDataError,
    StoreReadError,
)

if TYPE_CHECKING:
    from pathlib import Path

N_OBS, N_VAR = 60, 8


def _matrix(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = (rng.random((N_OBS, N_VAR)) < 0.5) * (
        1 + np.arange(N_OBS * N_VAR).reshape(N_OBS, N_VAR)
    )
    return sp.csr_matrix(dense.astype(np.float32))


def _write_zarr(path: Path, x, **kwargs) -> Path:
    ad.settings.zarr_write_format = 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = zarr.open_group(path, mode="w")
        ad.io.write_elem(group, "X", x, dataset_kwargs=kwargs)
        ad.io.write_elem(group, "obs", pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]))
    return path


def _loader(**kwargs) -> Loader:
    return Loader(chunk_size=5, preload_nchunks=4, batch_size=10, shuffle=True, to=None, **kwargs)


def _epoch(loader: Loader) -> list:
    return list(loader)


def _poke(path: Path, values, at: int) -> None:
    """Overwrite entries of a 1-D uncompressed, unsharded zarr array, chunk file by chunk file."""
    array = zarr.open_array(path, mode="r+")
    array[at : at + len(values)] = values


# ------------------------------------------------------------------ checks when a dataset is added
@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda p: p.__setitem__(3, p[2] - 1), "decreases at row 2"),
        (lambda p: p.__setitem__(0, 1), "starts at 1"),
        (lambda p: p.__setitem__(-1, p[-1] + 5), "ends at"),
    ],
)
def test_bad_indptr_is_refused_when_added(tmp_path, damage, match):
    path = _write_zarr(tmp_path / "a.zarr", _matrix(), chunks=(16,))
    indptr = zarr.open_array(path / "X" / "indptr", mode="r+")
    values = indptr[...]
    damage(values)
    indptr[...] = values
    x = load_x_and_obs(zarr.open_group(path, mode="r")).X
    with pytest.raises(CorruptDataError, match=match) as info:
        _loader().add_dataset(x)
    assert str(path) in str(info.value)


def test_indptr_of_wrong_length_is_refused():
    m = _matrix()
    bad = m.copy()
    bad.indptr = m.indptr[:-1]
    bad._shape = m.shape
    with pytest.raises(CorruptDataError, match=f"needs {N_OBS + 1}"):
        _loader().add_dataset(bad)


@pytest.mark.parametrize("bad_index", [N_VAR, 10**6, -1])
@pytest.mark.parametrize("compressed", [False, True])
def test_column_index_out_of_range_raises_before_any_batch_is_built(
    tmp_path, bad_index, compressed
):
    path = _write_zarr(
        tmp_path / "a.zarr", _matrix(), chunks=(16,), compressors=None if not compressed else "auto"
    )
    _poke(path / "X" / "indices", [bad_index], at=37)
    x = load_x_and_obs(zarr.open_group(path, mode="r")).X
    with pytest.raises(
        CorruptDataError, match=rf"column index {bad_index} .* outside \[0, {N_VAR}\)"
    ) as info:
        _epoch(_loader().add_dataset(x))
    assert str(path) in str(info.value)


def test_column_index_out_of_range_in_h5ad_and_memory(tmp_path):
    m = _matrix()
    bad = m.copy()
    bad.indices[5] = N_VAR + 3
    with pytest.raises(CorruptDataError, match="outside"):
        _epoch(_loader().add_dataset(bad))
    path = tmp_path / "a.h5ad"
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "X", m)
        f["X"]["indices"][5] = -7
    with h5py.File(path, "r") as f, pytest.raises(CorruptDataError, match=str(path)):
        _epoch(_loader().add_dataset(ad.io.sparse_dataset(f["X"])))


# ------------------------------------------------------------------------- shard index entries
def _shard_file(array_path: Path) -> Path:
    return max(
        (p for p in (array_path / "c").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )


@pytest.mark.parametrize("entry", [(2**62, 10), (0, 2**62), (2**64 - 2, 2**64 - 2), (1, 10**9)])
def test_shard_index_entry_outside_the_file_is_a_clear_error(tmp_path, entry):
    path = _write_zarr(
        tmp_path / "a.zarr", _matrix().toarray(), chunks=(5, N_VAR), shards=(20, N_VAR)
    )
    shard = _shard_file(path / "X")
    raw = bytearray(shard.read_bytes())
    n = 4  # inner chunks per shard
    index = np.frombuffer(bytes(raw[-4 - 16 * n : -4]), dtype="<u8").reshape(-1, 2).copy()
    index[1] = entry
    import google_crc32c

    raw[-4 - 16 * n :] = index.tobytes() + int(google_crc32c.value(index.tobytes())).to_bytes(
        4, "little"
    )
    shard.write_bytes(bytes(raw))
    array = zarr.open_group(path, mode="r")["X"]
    with pytest.raises(CorruptChunkError, match="outside its chunk data") as info:
        _epoch(_loader().add_dataset(array))
    assert str(shard) in str(info.value)


def test_shard_index_checksum_is_verified(tmp_path):
    path = _write_zarr(
        tmp_path / "a.zarr", _matrix().toarray(), chunks=(5, N_VAR), shards=(20, N_VAR)
    )
    shard = _shard_file(path / "X")
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # a byte of the index; its CRC32C no longer matches
    shard.write_bytes(bytes(raw))
    array = zarr.open_group(path, mode="r")["X"]
    with pytest.raises(ChecksumMismatchError, match="index of shard"):
        _epoch(_loader().add_dataset(array))


# ---------------------------------------------------------------------------------- checksums
def _collection(tmp_path: Path, compression: str) -> Path:
    rng = np.random.default_rng(1)
    adata = ad.AnnData(
        X=sp.random(300, 40, density=0.3, format="csr", dtype=np.float32, rng=rng),
        obs=pd.DataFrame({"k": np.arange(300)}, index=[f"c{i}" for i in range(300)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(40)]),
    )
    out = tmp_path / f"coll_{compression}.zarr"
    DatasetCollection(out).add_adatas([adata], compression=compression, progress=False)
    return out


def _data_shard(collection: Path) -> Path:
    return max((collection.rglob("X/data/c/*")), key=lambda p: p.stat().st_size)


def test_collections_carry_a_checksum_on_every_array(tmp_path):
    out = _collection(tmp_path, "none")
    for meta in out.rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        if doc.get("node_type") != "array":
            continue
        codecs = doc["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            codecs = codecs[0]["configuration"]["codecs"]
        assert codecs[-1]["name"] == "crc32c", meta
    assert all(d["checksum"] for d in DatasetCollection(out).info()["datasets"])


@pytest.mark.parametrize(("compression", "verify_checksums"), [("lz4", False), ("none", True)])
def test_damaged_chunk_of_a_collection_is_caught_by_its_checksum(
    tmp_path, compression, verify_checksums
):
    out = _collection(tmp_path, compression)
    shard = _data_shard(out)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x5A  # inside the first chunk's data
    shard.write_bytes(bytes(raw))
    loader = _loader(verify_checksums=verify_checksums).use_collection(DatasetCollection(out))
    with pytest.raises(ChecksumMismatchError, match="CRC32C") as info:
        _epoch(loader)
    assert str(out) in str(info.value)


@pytest.mark.parametrize(
    ("compression", "lost"),
    [
        ("none", "data"),
        ("packed-lz4", "data"),
        ("lz4", "data"),
        ("lz4", "indptr"),
        ("packed-lz4", "indices"),
    ],
)
def test_a_chunk_missing_from_a_collection_is_an_error_not_zeros(tmp_path, compression, lost):
    """zarr reads a chunk that does not exist as the fill value; a collection writes every
    chunk and says so (COMPLETE_ATTR), so one lost in a copy is damage, in the Loader and in
    verify; without the attribute (stores written elsewhere) the fill value stays."""
    out = _collection(tmp_path, compression)
    arrays = [a for _, a in zarr.open_group(out, mode="r").arrays()] + [
        zarr.open_array(m.parent, mode="r")
        for m in out.rglob("X/*/zarr.json")
        if json.loads(m.read_text())["node_type"] == "array"
    ]
    assert arrays
    assert all(a.attrs[COMPLETE_ATTR] is True for a in arrays)
    shard = max(out.rglob(f"X/{lost}/c/*"), key=lambda p: p.stat().st_size)
    shard.unlink()
    with pytest.raises(CorruptChunkError, match=r"is missing.*every chunk was written") as info:
        _epoch(_loader().use_collection(DatasetCollection(out)))
    assert str(out) in str(info.value)
    problems = verify(out)
    assert problems
    assert any("is missing" in p.problem and p.array.endswith(f"X/{lost}") for p in problems)
    assert all("/X" in p.array for p in problems)  # (and indptr's structure, read by zarr)
    if lost != "data":
        return
    # The same store without the record reads the missing chunk as zarr does: the fill value.
    data = zarr.open_array(shard.parent.parent, mode="r+")
    del data.attrs[COMPLETE_ATTR]
    batches = list(_loader().use_collection(DatasetCollection(out)))
    assert any((b["X"].data == 0).any() for b in batches)  # values of the lost chunk: 0


def test_partial_reads_of_uncompressed_chunks_are_not_verified_by_default(tmp_path):
    """The documented trade-off: the fast path reads only the wanted rows' bytes."""
    out = _collection(tmp_path, "none")
    shard = _data_shard(out)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x5A
    shard.write_bytes(bytes(raw))
    loader = Loader(chunk_size=1, preload_nchunks=7, batch_size=7, to=None)
    rows = sum(b["X"].shape[0] for b in loader.use_collection(DatasetCollection(out)))
    assert rows == 300


def test_undamaged_collection_reads_the_same_with_and_without_verification(tmp_path):
    out = _collection(tmp_path, "none")
    epochs = []
    for verify_checksums in (False, True):
        loader = Loader(
            chunk_size=16,
            preload_nchunks=4,
            batch_size=32,
            return_index=True,
            to=None,
            verify_checksums=verify_checksums,
        ).use_collection(DatasetCollection(out))
        rows = {}
        for batch in loader:
            for i, row in zip(batch["index"], batch["X"].toarray(), strict=True):
                rows[int(i)] = row
        epochs.append(np.stack([rows[i] for i in range(300)]))
    np.testing.assert_array_equal(epochs[0], epochs[1])


# ------------------------------------------------------------------------------------ errors
def test_h5py_file_closed_mid_iteration_gives_closed_dataset_error(tmp_path):
    path = tmp_path / "a.h5ad"
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "X", _matrix().toarray())
    f = h5py.File(path, "r")
    loader = Loader(chunk_size=5, preload_nchunks=1, batch_size=5, read_ahead=0, to=None)
    it = iter(loader.add_dataset(f["X"]))
    next(it)
    f.close()
    with pytest.raises(ClosedDatasetError, match="closed"):
        next(it)


def test_zarr_read_failure_names_the_store_and_rows(tmp_path):
    # Chunks that split the columns are read through zarr-python: damage one.
    path = _write_zarr(tmp_path / "a.zarr", _matrix().toarray(), chunks=(5, 4))
    victim = path / "X" / "c" / "3" / "1"
    victim.write_bytes(b"\x00garbage" * 3)
    array = zarr.open_group(path, mode="r")["X"]
    assert direct_array(array) is None
    with pytest.raises(StoreReadError, match=r"reading rows \d+:\d+ of zarr.Array .*a.zarr/X"):
        _epoch(_loader().add_dataset(array))


def test_zarr_csr_is_named_by_its_store(tmp_path):
    path = _write_zarr(tmp_path / "a.zarr", _matrix(), chunks=(16,))
    x = load_x_and_obs(zarr.open_group(path, mode="r")).X
    described = as_row_source(x, where="dataset 0").describe()
    assert "in-memory" not in described
    assert f"{path}/X" in described
    with pytest.raises(
        AnnbatchError, match=r"has type numpy.ndarray; .* have type anndata.abc.CSRDataset"
    ):
        _loader().add_dataset(x).add_dataset(np.zeros((3, N_VAR), dtype=np.float32))


# ---------------------------------------------------------------------------- zarr fallback
@pytest.mark.parametrize("moved", ["metadata-class", "attribute", "major-version"])
def test_moved_zarr_internals_fall_back_to_zarr_python(tmp_path, monkeypatch, moved):
    path = _write_zarr(tmp_path / "a.zarr", _matrix(), chunks=(16,), shards=(32,))
    x = load_x_and_obs(zarr.open_group(path, mode="r")).X
    assert direct_array(x.group["data"]) is not None
    if moved == "metadata-class":  # zarr.core.metadata.v3.ArrayV3Metadata moved elsewhere
        import zarr.core.metadata.v3 as v3

        monkeypatch.delattr(v3, "ArrayV3Metadata")
    elif moved == "attribute":  # an attribute the rules read is gone (e.g. encode_chunk_key)

        def gone(array, z):
            raise AttributeError("'ArrayV3Metadata' object has no attribute 'encode_chunk_key'")

        monkeypatch.setattr(zarr_layout, "_layout_of", gone)
    else:
        monkeypatch.setattr(zarr, "__version__", "4.0.0")
    zarr_layout._internals.cache_clear()
    try:
        assert direct_array(x.group["data"]) is None
        loader = Loader(chunk_size=7, preload_nchunks=3, batch_size=9, return_index=True, to=None)
        loader.add_dataset(x)
        want = _matrix().toarray()
        seen = 0
        for batch in loader:
            np.testing.assert_array_equal(batch["X"].toarray(), want[batch["index"]])
            seen += batch["X"].shape[0]
        assert seen == N_OBS
    finally:
        monkeypatch.undo()
        zarr_layout._internals.cache_clear()


# ------------------------------------------------------------------------------ verify (scrub)
def test_verify_a_good_collection_store_and_h5ad(tmp_path, capsys):
    out = _collection(tmp_path, "lz4")
    assert verify(out) == []
    store = _write_zarr(tmp_path / "a.zarr", _matrix(), chunks=(16,), shards=(32,))
    assert verify(store) == []
    path = tmp_path / "a.h5ad"
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "X", _matrix(), dataset_kwargs={"chunks": (16,), "compression": "gzip"})
    assert verify(path) == []
    assert cli(["verify", str(out)]) == 0
    assert "no problems" in capsys.readouterr().out


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_verify_names_every_bad_chunk_and_exits_nonzero(tmp_path, capsys, compression):
    out = _collection(tmp_path, compression)
    shard = _data_shard(out)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x5A
    shard.write_bytes(bytes(raw))
    indices = next(out.rglob("X/indices/c/*"))
    raw = bytearray(indices.read_bytes())
    raw[8] ^= 0x01
    indices.write_bytes(bytes(raw))
    problems = verify(out)
    arrays = sorted({p.array.rsplit("/", 1)[-1] for p in problems})
    assert arrays == ["data", "indices"], problems
    assert all("CRC32C" in p.problem for p in problems)
    assert cli(["verify", str(out)]) == 1
    printed = capsys.readouterr()
    assert "X/data" in printed.out
    assert "X/indices" in printed.out


def test_verify_reports_bad_csr_structure_in_h5ad(tmp_path):
    path = tmp_path / "a.h5ad"
    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "X", _matrix())
        f["X"]["indptr"][4] = 0
        f["X"]["indices"][0] = N_VAR
    problems = verify(path)
    assert len(problems) == 1
    assert "decreases" in problems[0].problem


def test_verify_command_line_on_a_missing_path(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "annbatch", "verify", str(tmp_path / "nope.zarr")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr


# ----------------------------------------------------------- metadata that does not fit data
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(
    ("field", "value"),
    [("data_type", "float32"), ("data_type", "int16"), ("chunk_shape", [3, N_VAR])],
)
def test_metadata_that_does_not_fit_the_chunks_is_an_error(tmp_path, field, value, compressed):
    # float64 rows of 6 per chunk on disk; zarr.json then claims narrower values or fewer rows
    # per chunk: each chunk holds more bytes than the metadata says.
    x = _matrix().toarray().astype(np.float64)
    path = _write_zarr(
        tmp_path / "a.zarr", x, chunks=(6, N_VAR), compressors="auto" if compressed else None
    )
    meta_path = path / "X" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    if field == "data_type":
        meta["data_type"] = value
        meta["fill_value"] = 0
    else:
        meta["chunk_grid"]["configuration"]["chunk_shape"] = value
    meta_path.write_text(json.dumps(meta))
    array = zarr.open_group(path, mode="r")["X"]
    assert direct_array(array) is not None
    with pytest.raises(CorruptChunkError, match=r"a\.zarr/X") as info:
        _epoch(_loader().add_dataset(array))
    assert "chunk" in str(info.value)


def test_blosc_frame_whose_header_lies_is_an_error(tmp_path):
    import numcodecs

    x = _matrix().toarray()
    path = tmp_path / "v2.zarr"
    zarr.create_array(
        path, data=x, chunks=(6, N_VAR), zarr_format=2, compressors=numcodecs.Blosc(cname="lz4")
    )
    victim = path / "3.0"
    raw = bytearray(victim.read_bytes())
    raw[12:16] = (len(raw) + 1000).to_bytes(4, "little")  # cbytes beyond the frame
    victim.write_bytes(bytes(raw))
    array = zarr.open_array(path, mode="r")
    assert direct_array(array) is not None
    with pytest.raises(CorruptChunkError, match="blosc frame"):
        _epoch(_loader().add_dataset(array))


@pytest.mark.parametrize("verify_checksums", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_uncompressed_checksummed_chunks_read_exactly_whole_and_in_part(
    tmp_path, sharded, verify_checksums
):
    from zarr.codecs import Crc32cCodec

    values = np.arange(103 * N_VAR, dtype=np.float32).reshape(103, N_VAR)  # a partial last chunk
    kwargs = {"shards": (40, N_VAR)} if sharded else {}
    zarr.create_array(
        tmp_path / "a.zarr", data=values, chunks=(10, N_VAR), compressors=[Crc32cCodec()], **kwargs
    )
    array = zarr.open_array(tmp_path / "a.zarr", mode="r")
    direct = direct_array(array, verify_checksums=verify_checksums)
    assert direct is not None
    # Whole chunks (several in one task), parts of chunks, and the partial last chunk.
    starts, stops = np.array([0, 25, 33, 60, 95]), np.array([20, 27, 50, 80, 103])
    out = np.empty((int(np.sum(stops - starts)), N_VAR), dtype=np.float32)
    for task in direct.tasks(starts, stops, out, 2):
        task()
    np.testing.assert_array_equal(
        out, np.concatenate([values[a:b] for a, b in zip(starts, stops, strict=True)])
    )
