"""A damaged store never crashes the process or yields wrong data.

Small pristine stores of every kind the Loader reads (zarr v3 dense and CSR, sharded or not,
compressed or not; collections; h5ad dense and CSR, chunked+gzip or contiguous) are built once.
Each case copies one, damages it once (bytes of a chunk, a truncated or deleted chunk file, a
shard index entry, the array metadata, an indptr or indices value), and runs one shuffled epoch
in a child process (``_corruption_child.py``), which reports how it ended. Acceptable:

- an :class:`annbatch.errors.AnnbatchError` whose message names the store;
- every row exactly as in the pristine store (the damage missed what is read, or was repaired);
- zarr / h5py refusing to open the store before annbatch is involved;
- the rows that zarr / h5py themselves read from the damaged store, only where the damage
  cannot be detected: no checksum covers it and the store stays valid (bytes of an uncompressed
  chunk, an in-range column index, a deleted chunk that reads as the fill value, a consistent
  metadata change). Collections carry a checksum per chunk: any change of their bytes must be
  caught.

Never acceptable: a crash (signal, timeout), another exception escaping, or other values.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anndata as ad
import google_crc32c
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import _corruption_child as child
import annbatch

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

# About 3 minutes on 2 cores: a child process (~1.5 s of imports) per case.
pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("_corruption_child.py")
CHILD_TIMEOUT_S = 60
N_OBS, N_VAR = 160, 8
MISSING = 2**64 - 1  # a shard index entry of an inner chunk never written


# ---------------------------------------------------------------------------- the stores
@dataclass(frozen=True)
class Pristine:
    name: str
    family: str  # "zarr", "collection" or "h5ad"
    kind: str  # "dense" or "csr"
    path: Path
    reference: Path  # .npz of the values, written by _corruption_child.save_reference
    checksummed: bool  # every chunk carries a checksum: changed bytes must be detected


# name: (family, kind, compression, sharded)
STORES: dict[str, tuple[str, str, str, bool]] = {
    "zarr-dense-zstd-sharded": ("zarr", "dense", "zstd", True),
    "zarr-dense-zstd": ("zarr", "dense", "zstd", False),
    "zarr-dense-raw": ("zarr", "dense", "none", False),
    "zarr-dense-raw-sharded": ("zarr", "dense", "none", True),
    "zarr-csr-zstd-sharded": ("zarr", "csr", "zstd", True),
    "zarr-csr-zstd": ("zarr", "csr", "zstd", False),
    "zarr-csr-raw": ("zarr", "csr", "none", False),
    "zarr-csr-raw-sharded": ("zarr", "csr", "none", True),
    "collection-csr-none": ("collection", "csr", "none", True),
    "collection-csr-lz4": ("collection", "csr", "lz4", True),
    "collection-dense-none": ("collection", "dense", "none", True),
    "collection-dense-lz4": ("collection", "dense", "lz4", True),
    "h5ad-dense-gzip": ("h5ad", "dense", "gzip", False),
    "h5ad-dense-contiguous": ("h5ad", "dense", "none", False),
    "h5ad-csr-gzip": ("h5ad", "csr", "gzip", False),
    "h5ad-csr-contiguous": ("h5ad", "csr", "none", False),
}


def _matrices(seed: int) -> tuple[np.ndarray, sp.csr_matrix, pd.DataFrame]:
    """Values that identify their row: X[i, j] = 1000 * seed + N_VAR * i + j + 1."""
    dense = (np.arange(N_OBS * N_VAR, dtype=np.float32).reshape(N_OBS, N_VAR) + 1) + 1000 * seed
    mask = np.random.default_rng(seed).random(dense.shape) < 0.5
    csr = sp.csr_matrix(np.where(mask, dense, 0).astype(np.float32))
    obs = pd.DataFrame({"row": np.arange(N_OBS)}, index=[f"s{seed}_cell{i}" for i in range(N_OBS)])
    return dense, csr, obs


def _write_zarr(path: Path, x: Any, obs: pd.DataFrame, compression: str, sharded: bool) -> None:
    ad.settings.zarr_write_format = 3
    group = zarr.open_group(path, mode="w")
    if isinstance(x, np.ndarray):
        kwargs: dict[str, Any] = {"chunks": (5, N_VAR)}
        if sharded:
            kwargs["shards"] = (20, N_VAR)
    else:  # ~16 entries per chunk: many chunks
        kwargs = {"chunks": (16,)}
        if sharded:
            kwargs["shards"] = (64,)
    if compression == "none":
        kwargs["compressors"] = None
    ad.io.write_elem(group, "X", x, dataset_kwargs=kwargs)
    ad.io.write_elem(group, "obs", obs)


def _write_h5ad(path: Path, x: Any, obs: pd.DataFrame, compression: str) -> None:
    """Written with h5py itself, so that "contiguous" really is (anndata chunks CSR arrays)."""
    kwargs: dict[str, Any] = {}
    with h5py.File(path, "w") as f:
        if isinstance(x, np.ndarray):
            if compression == "gzip":
                kwargs = {"chunks": (5, N_VAR), "compression": "gzip"}
            f.create_dataset("X", data=x, **kwargs)
            f["X"].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
        else:
            if compression == "gzip":
                kwargs = {"chunks": (16,), "compression": "gzip"}
            group = f.create_group("X")
            group.attrs.update(
                {"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": x.shape}
            )
            for key in ("data", "indices", "indptr"):
                group.create_dataset(key, data=getattr(x, key), **kwargs)
        ad.io.write_elem(f, "obs", obs)


def _write_collection(path: Path, inputs: Path, kind: str, compression: str) -> None:
    inputs.mkdir()
    paths = []
    for seed in (1, 2):
        dense, csr, obs = _matrices(seed)
        adata = ad.AnnData(
            X=dense if kind == "dense" else csr,
            obs=obs,
            var=pd.DataFrame(index=[f"g{j}" for j in range(N_VAR)]),
        )
        if seed == 1:
            paths.append(inputs / "input1.h5ad")
            adata.write_h5ad(paths[-1])
        else:
            paths.append(inputs / "input2.zarr")
            adata.write_zarr(paths[-1])
    annbatch.DatasetCollection(path).add_adatas(
        [str(p) for p in paths], dataset_size=120, compression=compression, progress=False, rng=0
    )


@pytest.fixture(scope="session")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pristine]:
    root = tmp_path_factory.mktemp("pristine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's and zarr's notes about formats
        return _build_pristine(root)


def _build_pristine(root: Path) -> dict[str, Pristine]:
    dense, csr, obs = _matrices(0)
    stores = {}
    for name, (family, kind, compression, sharded) in STORES.items():
        x = dense if kind == "dense" else csr
        if family == "zarr":
            path = root / f"{name}.zarr"
            _write_zarr(path, x, obs, compression, sharded)
        elif family == "h5ad":
            path = root / f"{name}.h5ad"
            _write_h5ad(path, x, obs, compression)
        else:
            path = root / f"{name}.zarr"
            _write_collection(path, root / f"{name}-inputs", kind, compression)
        parts = child.reference(family, str(path))
        if family != "collection":  # the harness reads back what was written
            got = parts[0]["X"] if kind == "dense" else _csr(parts[0])
            assert np.array_equal(
                got if kind == "dense" else got.toarray(), x if kind == "dense" else x.toarray()
            )
        else:
            assert len(parts) > 1, "a collection of several datasets"
        ref = root / f"{name}.npz"
        child.save_reference(parts, child.obs_names(family, str(path)), str(ref))
        stores[name] = Pristine(name, family, kind, path, ref, checksummed=family == "collection")
    return stores


def _csr(part: dict[str, Any]) -> sp.csr_matrix:
    return sp.csr_matrix(
        (part["data"], part["indices"], part["indptr"]), shape=tuple(part["shape"])
    )


# ------------------------------------------------------------------------------ choosing
class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""

    def choice(self, options: Sequence[Any]) -> Any:
        """One of ``options``."""


class RandomChooser:
    """Seeded choices, for the deterministic cases."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self._rng.randint(lo, hi)

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self._rng.randrange(len(options))]


class DrawChooser:
    """Choices drawn by hypothesis (so that they shrink and are reported)."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def integer(self, lo: int, hi: int) -> int:
        return self._data.draw(st.integers(lo, hi))

    def choice(self, options: Sequence[Any]) -> Any:
        return self._data.draw(st.sampled_from(list(options)))


# ------------------------------------------------------------------------------- damages
@dataclass(frozen=True)
class Damage:
    kind: str
    mode: str
    target: str  # relative to the store
    detail: str
    undetectable: bool  # nothing can tell (no checksum; the store may still be valid)
    content: bool  # the bytes of a chunk changed (a per-chunk checksum would catch it)

    def __str__(self) -> str:
        return f"{self.kind}:{self.mode} of {self.target} ({self.detail})"


@dataclass(frozen=True)
class ZarrArray:
    path: Path
    name: str  # "X", "data", "indices" or "indptr"
    meta: dict[str, Any]

    @property
    def sharding(self) -> dict[str, Any] | None:
        codecs = self.meta["codecs"]
        return codecs[0]["configuration"] if codecs[0]["name"] == "sharding_indexed" else None

    @property
    def index_bytes(self) -> tuple[int, bool]:
        """(size of a shard index in bytes, whether it sits at the end of the shard)."""
        cfg = self.sharding
        assert cfg is not None
        outer = self.meta["chunk_grid"]["configuration"]["chunk_shape"]
        entries = int(np.prod([o // i for o, i in zip(outer, cfg["chunk_shape"], strict=True)]))
        checksum = any(c["name"] == "crc32c" for c in cfg["index_codecs"])
        return 16 * entries + 4 * checksum, cfg.get("index_location", "end") == "end"

    def chunk_files(self) -> list[Path]:
        return sorted(p for p in (self.path / "c").rglob("*") if p.is_file())


def _zarr_arrays(store: Pristine, root: Path) -> list[ZarrArray]:
    if store.family == "zarr":
        xs = [root / "X"]
    else:
        state = json.loads((root / "zarr.json").read_text())["attributes"][child.COLLECTION_ATTR]
        xs = [root / d["name"] / "X" for d in state["datasets"]]
    dirs = (
        xs if store.kind == "dense" else [x / k for x in xs for k in ("data", "indices", "indptr")]
    )
    return [ZarrArray(d, d.name, json.loads((d / "zarr.json").read_text())) for d in dirs]


def _h5_datasets(store: Pristine) -> list[str]:
    return ["X"] if store.kind == "dense" else ["X/data", "X/indices", "X/indptr"]


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _xor(path: Path, offset: int, length: int, ch: Chooser) -> str:
    with open(path, "r+b") as f:
        f.seek(offset)
        raw = bytearray(f.read(length))
        for k in range(len(raw)):
            raw[k] ^= ch.integer(1, 255)
        f.seek(offset)
        f.write(raw)
    return f"{len(raw)} bytes at {offset}"


def damage_xor(store: Pristine, root: Path, ch: Chooser) -> Damage:
    """Random bytes inside a chunk (zarr) or a dataset's stored data (h5ad)."""
    if store.family == "h5ad":
        name = ch.choice(_h5_datasets(store))
        with h5py.File(root, "r") as f:
            dsid = f[name].id
            if f[name].chunks is None:
                where, start, size = "contiguous data", dsid.get_offset(), dsid.get_storage_size()
            else:
                k = ch.integer(0, dsid.get_num_chunks() - 1)
                info = dsid.get_chunk_info(k)
                where, start, size = f"chunk {k}", info.byte_offset, info.size
        offset = start + ch.integer(0, size - 1)
        length = ch.integer(1, min(8, start + size - offset))
        detail = _xor(root, offset, length, ch)
        return Damage("xor", where, name, detail, undetectable=True, content=True)
    array = ch.choice(_zarr_arrays(store, root))
    path = ch.choice(array.chunk_files())
    size = path.stat().st_size
    offset = ch.integer(0, size - 1)
    length = ch.integer(1, min(8, size - offset))
    in_index = False
    if array.sharding is not None:
        index, at_end = array.index_bytes
        lo, hi = (size - index, size) if at_end else (0, index)
        in_index = offset < hi and offset + length > lo
    detail = _xor(path, offset, length, ch)
    mode = "shard-index bytes" if in_index else "chunk bytes"
    return Damage("xor", mode, _rel(path, root), detail, undetectable=not in_index, content=True)


def damage_truncate(store: Pristine, root: Path, ch: Chooser) -> Damage:
    """A chunk or shard file (zarr), or the whole file (h5ad), cut short."""
    path = (
        root
        if store.family == "h5ad"
        else ch.choice(ch.choice(_zarr_arrays(store, root)).chunk_files())
    )
    size = path.stat().st_size
    new = ch.integer(0, size - 1)
    os.truncate(path, new)
    target = path.name if store.family == "h5ad" else _rel(path, root)
    return Damage(
        "truncate", "cut", target, f"{size} -> {new} bytes", undetectable=False, content=True
    )


def damage_delete(store: Pristine, root: Path, ch: Chooser) -> Damage:
    """A chunk or shard file deleted (zarr reads it as the fill value)."""
    array = ch.choice(_zarr_arrays(store, root))
    path = ch.choice(array.chunk_files())
    path.unlink()
    # zarr reads a chunk never written as the fill value, and a store cannot tell a deleted
    # chunk from one never written; a collection records that every chunk was written, so
    # there the loss must be caught.
    lost = store.family != "collection"
    return Damage("delete", "file", _rel(path, root), "deleted", undetectable=lost, content=False)


SHARD_INDEX_MODES = (
    "huge_offset",
    "huge_nbytes",
    "past_end",
    "into_index",
    "shift",
    "zero_nbytes",
    "swap",
    "missing",
)


def damage_shard_index(
    store: Pristine, root: Path, ch: Chooser, mode: str | None = None, fix_crc: bool | None = None
) -> Damage:
    """One (offset, nbytes) entry of a shard index overwritten; its crc32c left stale or
    recomputed (then only bounds checks can tell)."""
    arrays = [a for a in _zarr_arrays(store, root) if a.sharding is not None]
    array = ch.choice(arrays)
    path = ch.choice(array.chunk_files())
    index_size, at_end = array.index_bytes
    checksum = index_size % 16 == 4
    raw = bytearray(path.read_bytes())
    start = len(raw) - index_size if at_end else 0
    n = (index_size - 4 * checksum) // 16
    entries = np.frombuffer(bytes(raw[start : start + 16 * n]), dtype="<u8").reshape(n, 2).copy()
    written = [k for k in range(n) if entries[k, 0] != MISSING] or list(range(n))
    j = ch.choice(written)
    mode = mode or ch.choice(SHARD_INDEX_MODES)
    if mode == "swap" and len(written) < 2:
        mode = "missing"
    before = entries.copy()
    if mode == "huge_offset":
        entries[j, 0] = 2**62 + ch.integer(0, 2**20)
    elif mode == "huge_nbytes":
        entries[j, 1] = 2**62 + ch.integer(0, 2**20)
    elif mode == "past_end":
        entries[j, 0] = len(raw) + ch.integer(0, 64)
    elif mode == "into_index":  # the chunk's bytes would overlap the index itself
        entries[j, 0] = max(0, start + 8 - int(entries[j, 1]) // 2)
    elif mode == "shift":
        entries[j, 0] = int(entries[j, 0]) + ch.integer(1, 7)
    elif mode == "zero_nbytes":
        entries[j, 1] = 0
    elif mode == "swap":
        k = ch.choice([k for k in written if k != j])
        entries[[j, k]] = entries[[k, j]]
    elif mode == "missing":
        entries[j] = MISSING
    else:
        raise ValueError(mode)
    raw[start : start + 16 * n] = entries.astype("<u8").tobytes()
    if checksum:
        if fix_crc is None:
            fix_crc = ch.choice([True, False])
        if fix_crc:
            crc = google_crc32c.value(bytes(raw[start : start + 16 * n]))
            raw[start + 16 * n : start + 16 * n + 4] = np.uint32(crc).tobytes()
    path.write_bytes(bytes(raw))
    valid = bool(fix_crc) or not checksum
    detail = f"entry {j}: {before[j].tolist()} -> {entries[j].tolist()}, crc {'fixed' if fix_crc else 'stale'}"
    undetectable = valid and (
        mode == "swap" or (mode == "missing" and store.family != "collection")
    )
    # An entry marked "never written" (with a valid index checksum) is a deleted chunk.
    content = not (valid and mode == "missing")
    return Damage("shard_index", mode, _rel(path, root), detail, undetectable, content=content)


ZARR_JSON_MODES = ("rows_bigger", "rows_smaller", "columns", "chunk_shape", "dtype")
DTYPES = ("float64", "float32", "int32", "uint32", "int64", "float16", "uint8", "int16")


def damage_zarr_json(
    store: Pristine, root: Path, ch: Chooser, mode: str | None = None, to: str | None = None
) -> Damage:
    """An array's zarr.json (or a CSR group's shape attribute) edited: still valid JSON of
    valid values, now disagreeing with the chunks."""
    array = ch.choice(_zarr_arrays(store, root))
    mode = mode or ch.choice(ZARR_JSON_MODES)
    meta_path = array.path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    shape = meta["shape"]
    undetectable = False
    if mode == "columns" and array.name != "X":  # a CSR matrix: its group's shape attribute
        meta_path = array.path.parent / "zarr.json"
        meta = json.loads(meta_path.read_text())
        old = meta["attributes"]["shape"][1]
        new = ch.choice([n for n in (old - 3, old - 1, old + 1, old + 5) if n > 0])
        meta["attributes"]["shape"][1] = new
        undetectable = new > old  # more columns: every index stays in range
        detail = f"X shape attribute columns {old} -> {new}"
    elif mode == "columns":
        old = shape[1]
        shape[1] = ch.choice([old - 3, old - 1, old + 1, old + 5])
        undetectable = True  # the chunks hold whole rows either way: what zarr reads
        detail = f"columns {old} -> {shape[1]}"
    elif mode in ("rows_bigger", "rows_smaller"):
        old = shape[0]
        shape[0] = old + ch.integer(1, 40) if mode == "rows_bigger" else ch.integer(0, old - 1)
        # data / indices longer than indptr says: nothing reads the extra elements
        undetectable = mode == "rows_bigger" and array.name in ("data", "indices")
        detail = f"shape[0] {old} -> {shape[0]}"
    elif mode == "chunk_shape":
        grid = meta["chunk_grid"]["configuration"]["chunk_shape"]
        cfg = array.sharding
        if cfg is not None and ch.choice(["inner", "outer"]) == "inner":
            inner = meta["codecs"][0]["configuration"]["chunk_shape"]
            old = inner[0]
            inner[0] = ch.choice(
                [d for d in range(1, grid[0] + 1) if grid[0] % d == 0 and d != old] or [old + 1]
            )
            detail = f"inner chunk_shape[0] {old} -> {inner[0]}"
        else:
            old = grid[0]
            grid[0] = ch.choice(
                [n for n in (old // 2, old - 1, old + 1, old * 2) if n > 0 and n != old]
            )
            detail = f"chunk_shape[0] {old} -> {grid[0]}"
    elif mode == "dtype":
        old = meta["data_type"]
        new = to or ch.choice([d for d in DTYPES if d != old])
        meta["data_type"] = new
        if np.dtype(new).kind != "f":
            meta["fill_value"] = int(meta["fill_value"])
        elif not isinstance(meta["fill_value"], str):
            meta["fill_value"] = float(meta["fill_value"])
        # the same item size: every chunk still decodes, to other values of another dtype
        undetectable = np.dtype(new).itemsize == np.dtype(old).itemsize
        detail = f"data_type {old} -> {new}"
    else:
        raise ValueError(mode)
    meta_path.write_text(json.dumps(meta, indent=2))
    return Damage("zarr_json", mode, _rel(meta_path, root), detail, undetectable, content=False)


INDPTR_MODES = ("random", "decrease", "huge", "negative", "shift", "first", "last")
INDICES_MODES = ("out_of_range", "negative", "in_range", "random")


def _value_damage(store: Pristine, root: Path, ch: Chooser, which: str, mode: str | None) -> Damage:
    """One value of indptr or indices overwritten through zarr / h5py: the chunk and its
    checksums stay consistent, only the value is wrong."""
    if store.family == "h5ad":
        f = h5py.File(root, "r+")
        array: Any = f[f"X/{which}"]
        target, n_var = f"X/{which}", int(f["X"].attrs["shape"][1])
    else:
        f = None
        located = ch.choice([a for a in _zarr_arrays(store, root) if a.name == which])
        array = zarr.open_array(located.path, mode="r+")
        target = _rel(located.path, root)
        n_var = int(
            json.loads((located.path.parent / "zarr.json").read_text())["attributes"]["shape"][1]
        )
    try:
        values = np.asarray(array[...])
        info = np.iinfo(values.dtype)
        big = min(info.max, 2**40)
        n = values.size
        modes = INDPTR_MODES if which == "indptr" else INDICES_MODES
        mode = mode or ch.choice(modes)
        i = ch.integer(0, n - 1)
        if which == "indptr":
            nnz = int(values[-1])
            if mode in ("decrease", "shift"):
                i = ch.integer(1, n - 2)
            if mode == "random":
                v = ch.integer(int(info.min), int(info.max))
            elif mode == "decrease":
                v = int(values[i - 1]) - ch.integer(1, 50)
            elif mode == "huge":
                v = min(nnz + ch.integer(1, big), int(info.max))
            elif mode == "negative":
                v = -ch.integer(1, big)
            elif mode == "shift":  # stays between its neighbours: a valid CSR, other rows
                v = ch.integer(int(values[i - 1]), int(values[i + 1]))
            elif mode == "first":
                i, v = 0, ch.integer(1, max(1, nnz))
            elif mode == "last":
                i, v = (
                    n - 1,
                    ch.choice([nnz - ch.integer(1, max(1, nnz)), nnz + ch.integer(1, 100)]),
                )
            else:
                raise ValueError(mode)
        elif mode == "out_of_range":
            v = ch.choice([n_var, n_var + 1, ch.integer(n_var, int(info.max))])
        elif mode == "negative":
            v = ch.choice([-1, int(info.min), ch.integer(int(info.min), -1)])
        elif mode == "in_range":
            v = ch.integer(0, n_var - 1)
        elif mode == "random":
            v = ch.integer(int(info.min), int(info.max))
        else:
            raise ValueError(mode)
        old = int(values[i])
        array[i] = v
    finally:
        if f is not None:
            f.close()
    # Written through zarr / h5py, which re-encode the chunk and recompute its checksums: a
    # consistent edit, not damage of bytes that any per-chunk checksum could catch.
    return Damage(which, mode, target, f"[{i}] {old} -> {v}", undetectable=True, content=False)


def damage_indptr(store: Pristine, root: Path, ch: Chooser, mode: str | None = None) -> Damage:
    return _value_damage(store, root, ch, "indptr", mode)


def damage_indices(store: Pristine, root: Path, ch: Chooser, mode: str | None = None) -> Damage:
    return _value_damage(store, root, ch, "indices", mode)


DAMAGES: dict[str, Callable[..., Damage]] = {
    "xor": damage_xor,
    "truncate": damage_truncate,
    "delete": damage_delete,
    "shard_index": damage_shard_index,
    "zarr_json": damage_zarr_json,
    "indptr": damage_indptr,
    "indices": damage_indices,
}


def applicable(store: Pristine) -> list[str]:
    kinds = ["xor", "truncate"]
    if store.family != "h5ad":
        kinds += ["delete", "zarr_json"]
        if STORES[store.name][3]:
            kinds.append("shard_index")
    if store.kind == "csr":
        kinds += ["indptr", "indices"]
    return kinds


# ------------------------------------------------------------------------------- running
@dataclass(frozen=True)
class LoaderArgs:
    batch_size: int = 16
    chunk_size: int = 8
    preload_nchunks: int = 4
    read_ahead: int = 1
    seed: int = 0


@st.composite
def loader_args(draw: st.DrawFn) -> LoaderArgs:
    chunk_size = draw(st.integers(1, 40))
    preload_nchunks = draw(st.integers(1, 6))
    return LoaderArgs(
        batch_size=draw(st.integers(1, min(48, chunk_size * preload_nchunks))),
        chunk_size=chunk_size,
        preload_nchunks=preload_nchunks,
        read_ahead=draw(st.integers(0, 2)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@dataclass(frozen=True)
class ChildRun:
    returncode: int | None  # None: killed at the timeout
    result: dict[str, Any] | None
    stderr: str

    def describe(self) -> str:
        tail = "\n".join(self.stderr.strip().splitlines()[-25:])
        return f"returncode {self.returncode}; result {json.dumps(self.result, indent=1)}\nstderr tail:\n{tail}"


def run_child(store: Pristine, path: Path, args: LoaderArgs) -> ChildRun:
    payload = {
        "family": store.family,
        "kind": store.kind,
        "path": str(path),
        "pristine": str(store.reference),
        "verify_checksums": store.checksummed,
        **vars(args),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(CHILD), json.dumps(payload)],
            timeout=CHILD_TIMEOUT_S,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return ChildRun(None, None, err)
    result = None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
    return ChildRun(proc.returncode, result, proc.stderr)


def verdict(store: Pristine, damage: Damage | None, run: ChildRun) -> str:
    """Empty if the run ended acceptably, else why not."""
    if run.returncode is None:
        return f"the child hung (no result within {CHILD_TIMEOUT_S} s)"
    if run.returncode < 0:
        return f"the child was killed by signal {-run.returncode}"
    if run.returncode != 0 or run.result is None:
        return f"the child exited with {run.returncode} without a result"
    res = run.result
    outcome = res["outcome"]
    if outcome == "harness_error":
        return f"the test harness failed, not the store: {res.get('message')}"
    if damage is None:
        return (
            "" if outcome == "ok_exact_pristine" else "an undamaged store did not read back exactly"
        )
    if outcome == "annbatch_error":
        if not res["names_store"]:
            return "the AnnbatchError does not name the damaged store"
        if res.get("before_error") == "equals_oracle":  # damaged rows yielded, then an error
            if store.checksummed and damage.content:
                return "changed bytes of a checksummed collection were yielded before the error"
            if not damage.undetectable:
                return "detectable damage was yielded as values before the error"
        return ""
    if outcome in ("ok_exact_pristine", "open_failed"):
        return ""
    if outcome == "ok_equals_oracle":
        if store.checksummed and damage.content:
            return "changed bytes of a checksummed collection were yielded, not detected"
        if not damage.undetectable:
            return "detectable damage was yielded as values"
        if not res["oracle_plausible"]:
            return f"an invalid store was yielded as values ({res.get('oracle_note')})"
        return ""
    if outcome == "other_error":
        return f"a non-annbatch error escaped: {res['error_type']}"
    return f"wrong values were yielded: {res.get('mismatch')}"


def check_damaged(
    store: Pristine,
    workdir: Path,
    apply: Callable[[Pristine, Path, Chooser], Damage],
    ch: Chooser,
    args: LoaderArgs,
) -> None:
    case = Path(tempfile.mkdtemp(prefix="case", dir=workdir))
    root = case / store.path.name
    if store.path.is_dir():
        shutil.copytree(store.path, root)
    else:
        shutil.copy(store.path, root)
    damage = apply(store, root, ch)
    run = run_child(store, root, args)
    problem = verdict(store, damage, run)
    assert not problem, f"{store.name}, {damage}, {args}: {problem}\n{run.describe()}"
    shutil.rmtree(case)  # kept where the assertion failed, for a look


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("damaged")


# --------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(STORES))
def test_undamaged_copy_reads_exactly(pristine, workdir, name):
    """The harness itself: a copy of each pristine store reads back exactly."""
    store = pristine[name]
    case = Path(tempfile.mkdtemp(prefix="pristine", dir=workdir))
    root = case / store.path.name
    if store.path.is_dir():
        shutil.copytree(store.path, root)
    else:
        shutil.copy(store.path, root)
    run = run_child(store, root, LoaderArgs(batch_size=7, chunk_size=5, preload_nchunks=3))
    problem = verdict(store, None, run)
    assert not problem, f"{name}: {problem}\n{run.describe()}"
    assert run.result is not None
    assert run.result["oracle_ok"]
    assert run.result["oracle_plausible"]
    assert run.result["rows_yielded"] == (N_OBS * 2 if store.family == "collection" else N_OBS)


# (store, damage, keyword arguments of the damage, seed of the other choices)
CASES: list[tuple[str, str, dict[str, Any], int]] = [
    ("zarr-csr-raw", "indptr", {"mode": "decrease"}, 0),
    ("zarr-csr-raw", "indptr", {"mode": "huge"}, 0),
    ("zarr-csr-raw", "indptr", {"mode": "negative"}, 0),
    ("zarr-csr-raw", "indptr", {"mode": "last"}, 0),
    ("zarr-csr-raw", "indptr", {"mode": "shift"}, 0),
    ("zarr-csr-raw", "indices", {"mode": "out_of_range"}, 0),
    ("zarr-csr-raw", "indices", {"mode": "negative"}, 0),
    ("zarr-csr-raw", "indices", {"mode": "in_range"}, 0),
    ("zarr-dense-raw", "xor", {}, 0),
    ("zarr-csr-zstd-sharded", "xor", {}, 2),
    ("zarr-dense-raw", "truncate", {}, 0),
    ("zarr-dense-zstd-sharded", "truncate", {}, 0),
    ("zarr-csr-zstd", "delete", {}, 3),
    ("zarr-dense-zstd-sharded", "shard_index", {"mode": "huge_offset", "fix_crc": True}, 0),
    ("zarr-dense-zstd-sharded", "shard_index", {"mode": "past_end", "fix_crc": False}, 0),
    ("zarr-dense-zstd-sharded", "shard_index", {"mode": "swap", "fix_crc": False}, 0),
    ("zarr-dense-zstd-sharded", "shard_index", {"mode": "swap", "fix_crc": True}, 0),
    ("zarr-dense-raw-sharded", "shard_index", {"mode": "huge_nbytes", "fix_crc": True}, 0),
    ("zarr-dense-raw-sharded", "shard_index", {"mode": "into_index", "fix_crc": True}, 0),
    ("zarr-csr-zstd-sharded", "shard_index", {"mode": "shift", "fix_crc": True}, 0),
    ("zarr-dense-raw", "zarr_json", {"mode": "dtype", "to": "float64"}, 0),
    ("zarr-dense-zstd", "zarr_json", {"mode": "dtype", "to": "float64"}, 0),
    ("zarr-dense-raw", "zarr_json", {"mode": "dtype", "to": "int32"}, 0),
    ("zarr-dense-zstd-sharded", "zarr_json", {"mode": "rows_bigger"}, 0),
    ("zarr-dense-raw", "zarr_json", {"mode": "chunk_shape"}, 0),
    ("zarr-dense-zstd", "zarr_json", {"mode": "chunk_shape"}, 0),
    ("zarr-csr-raw", "zarr_json", {"mode": "rows_smaller"}, 0),
    ("zarr-csr-zstd", "zarr_json", {"mode": "columns"}, 0),
    ("collection-csr-none", "xor", {}, 0),
    ("collection-dense-none", "delete", {}, 0),
    ("collection-csr-lz4", "shard_index", {"mode": "missing", "fix_crc": True}, 0),
    ("collection-csr-lz4", "indptr", {"mode": "huge"}, 0),
    ("collection-dense-lz4", "xor", {}, 0),
    ("h5ad-csr-contiguous", "indptr", {"mode": "decrease"}, 0),
    ("h5ad-csr-contiguous", "indices", {"mode": "out_of_range"}, 0),
    ("h5ad-csr-contiguous", "xor", {}, 0),
    ("h5ad-dense-gzip", "xor", {}, 0),
    ("h5ad-dense-contiguous", "truncate", {}, 0),
]


def _case_id(case: tuple[str, str, dict[str, Any], int]) -> str:
    store, kind, kwargs, seed = case
    return "-".join([store, kind, *(str(v) for v in kwargs.values()), str(seed)])


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_damage(pristine, workdir, case):
    name, kind, kwargs, seed = case
    store = pristine[name]
    assert kind in applicable(store)

    def apply(store: Pristine, root: Path, ch: Chooser) -> Damage:
        return DAMAGES[kind](store, root, ch, **kwargs)

    check_damaged(store, workdir, apply, RandomChooser(seed), LoaderArgs())


FAMILIES = {
    "zarr-dense": [n for n in STORES if n.startswith("zarr-dense")],
    "zarr-csr": [n for n in STORES if n.startswith("zarr-csr")],
    "collection": [n for n in STORES if n.startswith("collection")],
    "h5ad": [n for n in STORES if n.startswith("h5ad")],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example costs a process
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), args=loader_args())
def test_random_damage(pristine, workdir, family, data, args):
    store = pristine[data.draw(st.sampled_from(FAMILIES[family]), label="store")]
    kind = data.draw(st.sampled_from(applicable(store)), label="damage")
    check_damaged(store, workdir, DAMAGES[kind], DrawChooser(data), args)
