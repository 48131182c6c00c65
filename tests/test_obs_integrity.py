"""A collection's obs and var get X's guarantees: every chunk written and recorded, checksummed,
and read through a path that checks them; ``verify`` checks everything the manifest names (every
dataset there) and works on h5ad collections; ``info`` says when a collection is damaged."""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from _adata_files import write_adata
from annbatch import DatasetCollection, Loader, verify
from annbatch._cli import main as cli
from annbatch._core.chunks import COMPLETE_ATTR
from annbatch.errors import (
    AnnbatchError,
    ChecksumMismatchError,
    CorruptChunkError,
    MissingDataError,
    StoreReadError,
)

if TYPE_CHECKING:
    from pathlib import Path

N_OBS, N_VAR, DONORS = 120, 6, 3


def _inputs(folder: Path) -> list[str]:
    """Three donors' files; every column has a chunk of only fill values somewhere (zeros,
    the first category, empty strings) so that unwritten chunks would show."""
    paths = []
    for k in range(DONORS):
        rng = np.random.default_rng(k)
        x = sp.random(N_OBS, N_VAR, density=0.5, format="csr", dtype=np.float32, random_state=k)
        obs = pd.DataFrame(
            {
                "donor": pd.Categorical(
                    [f"donor{k}"] * N_OBS, categories=["donor0", "donor1", "donor2"]
                ),
                "zeros": np.zeros(N_OBS, dtype=np.int64),
                "score": rng.random(N_OBS),
                "note": [f"note{k}_{i}" for i in range(N_OBS)],
            },
            index=[f"cell{k}_{i}" for i in range(N_OBS)],
        )
        var = pd.DataFrame(
            {"symbol": [f"SYM{j}" for j in range(N_VAR)]}, index=[f"g{j}" for j in range(N_VAR)]
        )
        paths.append(write_adata(ad.AnnData(X=x, obs=obs, var=var), folder / f"donor{k}.h5ad"))
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A zarr and an h5ad collection of the three donors (3 datasets each), built once."""
    root = tmp_path_factory.mktemp("built")
    inputs = _inputs(root)
    options = {"dataset_size": 150, "progress": False, "merge": "same", "rng": 0}
    DatasetCollection(root / "coll.zarr").add_adatas(inputs, **options)
    DatasetCollection(root / "coll_h5ad", is_collection_h5ad=True).add_adatas(inputs, **options)
    return {"zarr": root / "coll.zarr", "h5ad": root / "coll_h5ad", "inputs": root}


@pytest.fixture
def zarr_copy(built: dict[str, Path], tmp_path: Path) -> Path:
    return shutil.copytree(built["zarr"], tmp_path / "coll.zarr")


@pytest.fixture
def h5ad_copy(built: dict[str, Path], tmp_path: Path) -> Path:
    return shutil.copytree(built["h5ad"], tmp_path / "coll_h5ad")


def _use(path: Path, *, obs_index: bool = False) -> Loader:
    loader = Loader(batch_size=10, chunk_size=5, preload_nchunks=2, to=None)
    return loader.use_collection(DatasetCollection(path, mode="r"), obs_index=obs_index)


def _read(path: Path, *, obs_index: bool = False) -> list[dict]:
    """An epoch of the collection: obs columns are read window by window, so damage to them
    shows while reading (the index, read only when asked for, when the Loader is made)."""
    return list(_use(path, obs_index=obs_index))


def _flip(path: Path, at: int, n: int = 4) -> None:
    raw = bytearray(path.read_bytes())
    for k in range(at, min(at + n, len(raw))):
        raw[k] ^= 0x5A
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------ written and recorded
def test_every_obs_and_var_array_records_every_chunk_written(zarr_copy):
    """As X's: a chunk of only fill values is written too, and each array says so."""
    for key in ("obs", "var"):
        arrays = [
            p.parent
            for p in zarr_copy.glob(f"dataset_*/{key}/**/zarr.json")
            if json.loads(p.read_text())["node_type"] == "array"
        ]
        assert arrays
        for folder in arrays:
            array = zarr.open_array(folder, mode="r")
            assert array.attrs.get(COMPLETE_ATTR) is True, folder
            assert array.nchunks_initialized == array.nchunks, folder  # zeros' chunks too
            codecs = json.loads((folder / "zarr.json").read_text())["codecs"]
            if codecs[0]["name"] == "sharding_indexed":  # obs: each chunk inside its shard
                codecs = codecs[0]["configuration"]["codecs"]
            assert codecs[-1]["name"] == "crc32c", folder


# --------------------------------------------------------------- a missing or damaged chunk
@pytest.mark.parametrize(
    ("array", "column"),
    [("donor/codes", "donor"), ("note", "note"), ("zeros", "zeros"), ("_index", "index")],
)
def test_a_missing_obs_chunk_fails_the_loader_and_verify(zarr_copy, capsys, array, column):
    """The issue's case: without a check, a lost chunk of codes reads as code 0 (another
    donor's label) and verify passed."""
    (zarr_copy / "dataset_000001" / "obs" / array / "c" / "0").unlink()
    with pytest.raises(CorruptChunkError, match="is missing") as info:
        _read(zarr_copy, obs_index=column == "index")
    assert column in str(info.value)
    assert "dataset_000001" in str(info.value)
    with pytest.raises(CorruptChunkError, match=column):
        DatasetCollection(zarr_copy, mode="r").obs()
    problems = verify(zarr_copy)
    assert [p.array for p in problems] == [f"/dataset_000001/obs/{array}"], problems
    assert "missing" in problems[0].problem
    assert cli(["verify", str(zarr_copy)]) == 1
    assert f"dataset_000001/obs/{array}" in capsys.readouterr().out


@pytest.mark.parametrize(("array", "column"), [("donor/codes", "donor"), ("note", "note")])
def test_damaged_obs_chunk_fails_the_loader_and_verify(zarr_copy, array, column):
    chunk = zarr_copy / "dataset_000002" / "obs" / array / "c" / "0"
    _flip(chunk, chunk.stat().st_size // 2)
    with pytest.raises(ChecksumMismatchError) as info:
        _read(zarr_copy)
    assert f"obs column {column!r}" in str(info.value)
    assert "dataset_000002" in str(info.value)
    problems = verify(zarr_copy)
    assert [p.array for p in problems] == [f"/dataset_000002/obs/{array}"], problems


@pytest.mark.parametrize(("array", "damage"), [("symbol/values", "delete"), ("_index", "flip")])
def test_a_missing_or_damaged_var_chunk_is_caught(zarr_copy, built, array, damage):
    chunk = zarr_copy / "dataset_000000" / "var" / array / "c" / "0"
    if damage == "delete":
        chunk.unlink()
    else:
        _flip(chunk, chunk.stat().st_size // 2)
    problems = verify(zarr_copy)
    assert [p.array for p in problems] == [f"/dataset_000000/var/{array}"], problems
    # An append reads the collection's var (to keep its columns) through the checked path.
    extra = write_adata(
        ad.AnnData(
            X=sp.csr_matrix(np.ones((4, N_VAR), dtype=np.float32)),
            obs=pd.DataFrame(index=[f"new{i}" for i in range(4)]),
            var=pd.DataFrame(index=[f"g{j}" for j in range(N_VAR)]),
        ),
        zarr_copy.parent / "extra.h5ad",
    )
    with pytest.raises(CorruptChunkError, match="var") as info:
        DatasetCollection(zarr_copy).add_adatas([extra], append=True, progress=False)
    assert "dataset_000000" in str(info.value)


def test_a_collection_built_before_obs_was_recorded_still_opens(zarr_copy):
    """Collections built before obs and var recorded their chunks (no attribute; chunks of
    fill values were not written then) read as before: a missing chunk cannot be told from
    one never written, so it reads as zarr reads it; damaged bytes still fail their
    checksum."""
    for meta in zarr_copy.glob("dataset_*/*/**/zarr.json"):
        doc = json.loads(meta.read_text())
        if "/X/" not in str(meta) and COMPLETE_ATTR in doc.get("attributes", {}):
            del doc["attributes"][COMPLETE_ATTR]
            meta.write_text(json.dumps(doc))
    assert verify(zarr_copy) == []
    assert len(DatasetCollection(zarr_copy, mode="r").obs()) == DONORS * N_OBS
    (zarr_copy / "dataset_000001" / "obs" / "score" / "c" / "0").unlink()
    batches = list(_use(zarr_copy))
    assert sum(len(b["obs"]) for b in batches) == DONORS * N_OBS
    chunk = zarr_copy / "dataset_000001" / "obs" / "donor" / "codes" / "c" / "0"
    _flip(chunk, chunk.stat().st_size // 2)
    with pytest.raises(ChecksumMismatchError, match="donor"):
        _read(zarr_copy)


# ----------------------------------------------------------------- a missing dataset folder
def test_a_missing_dataset_folder_fails_verify_info_and_the_loader(zarr_copy, capsys):
    shutil.rmtree(zarr_copy / "dataset_000001")
    problems = verify(zarr_copy)
    assert [p.array for p in problems] == ["/dataset_000001"], problems
    assert cli(["verify", str(zarr_copy)]) == 1
    out = capsys.readouterr()
    assert "/dataset_000001 [-]: missing" in out.out
    assert cli(["info", str(zarr_copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("annbatch info: error:")
    assert "dataset_000001" in err
    assert "Traceback" not in err
    with pytest.raises(MissingDataError, match="dataset_000001") as info:
        _use(zarr_copy)
    assert isinstance(info.value, FileNotFoundError)


def test_a_dataset_whose_rows_differ_from_the_manifest_is_reported(zarr_copy, capsys):
    """info reads no chunk, but it compares what the manifest records with the store."""
    shutil.rmtree(zarr_copy / "dataset_000002")
    shutil.copytree(zarr_copy / "dataset_000000", zarr_copy / "dataset_000002")
    problems = verify(zarr_copy)
    assert problems
    assert all(p.array.startswith("/dataset_000002") for p in problems), problems
    assert any("manifest records" in p.problem for p in problems)
    assert cli(["info", str(zarr_copy)]) == 1
    assert "damaged" in capsys.readouterr().err


# ----------------------------------------------------------------------- h5ad collections
def test_info_and_verify_work_on_an_h5ad_collection(built, capsys):
    path = built["h5ad"]
    assert cli(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{DONORS} datasets, {DONORS * N_OBS:,} rows x {N_VAR:,} genes" in out
    assert "dataset_000000.h5ad" in out
    assert "csr_matrix" in out
    assert verify(path) == []
    assert cli(["verify", str(path)]) == 0
    assert "no problems" in capsys.readouterr().out


def test_a_damaged_h5ad_collection_is_reported(h5ad_copy, capsys):
    target = h5ad_copy / "dataset_000001.h5ad"
    with h5py.File(target, "r") as f:
        codes = f["obs/donor/codes"]
        assert codes.compression == "gzip"
        chunk = codes.id.get_chunk_info(0)
    with open(target, "r+b") as f:  # the compressed codes of the first chunk
        f.seek(chunk.byte_offset + chunk.size // 2)
        f.write(bytes(b ^ 0x5A for b in f.read(8)))
        f.seek(chunk.byte_offset + chunk.size // 2)
    (h5ad_copy / "dataset_000002.h5ad").unlink()
    problems = verify(h5ad_copy)
    arrays = [p.array for p in problems]
    assert "/dataset_000002.h5ad" in arrays, problems
    assert "/dataset_000001.h5ad/obs/donor/codes" in arrays, problems
    assert cli(["verify", str(h5ad_copy)]) == 1
    assert "dataset_000002.h5ad [-]: missing" in capsys.readouterr().out
    assert cli(["info", str(h5ad_copy)]) == 1
    err = capsys.readouterr().err
    assert "dataset_000002.h5ad" in err
    assert "Traceback" not in err
    with pytest.raises(MissingDataError, match=r"dataset_000002\.h5ad"):
        _use(h5ad_copy)
    (h5ad_copy / "dataset_000001.h5ad").rename(h5ad_copy / "dataset_000002.h5ad")
    shutil.copy(h5ad_copy / "dataset_000000.h5ad", h5ad_copy / "dataset_000001.h5ad")
    with pytest.raises(StoreReadError, match=r"obs column 'donor' of .*dataset_000002\.h5ad"):
        _use(h5ad_copy)


def test_an_h5ad_file_that_is_not_hdf5_is_reported(h5ad_copy, capsys):
    (h5ad_copy / "dataset_000000.h5ad").write_bytes(b"not an HDF5 file")
    problems = verify(h5ad_copy)
    assert [p.array for p in problems] == ["/dataset_000000.h5ad"], problems
    assert "not readable as an HDF5 file" in problems[0].problem
    assert cli(["info", str(h5ad_copy)]) == 1
    assert "dataset_000000.h5ad" in capsys.readouterr().err
    with pytest.raises(AnnbatchError):
        _use(h5ad_copy)


def test_chunks_of_only_zeros_are_written_and_read(tmp_path):
    """A healthy collection whose X has a chunk of zero rows (inputs not shuffled: a block
    of empty rows) reads whole: every chunk is written, and none is reported missing."""
    n_obs, n_var = 3000, 256  # 1,024 rows per chunk, 3 chunks in one shard
    x = np.zeros((n_obs, n_var), dtype=np.float32)
    x[:10] = 1
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_obs)]))
    path = write_adata(adata, tmp_path / "zeros.h5ad")
    out = tmp_path / "zeros.zarr"
    DatasetCollection(out).add_adatas([path], progress=False, compression="none", shuffle=False)
    array = zarr.open_array(out / "dataset_000000" / "X", mode="r")
    assert array.attrs[COMPLETE_ATTR] is True
    rows = sum(b["X"].shape[0] for b in _use(out))
    assert rows == n_obs
    assert verify(out) == []
