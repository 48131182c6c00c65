"""Scrub a store: read every chunk of every array, check it, and name every bad one.

``annbatch verify STORE`` and :func:`annbatch.verify` run this over a zarr store (an AnnData
store or a whole collection), an h5ad file, or a collection of h5ad files. A collection's
manifest is checked first: every dataset it names must be there, with the rows, genes and
elements it records (:mod:`annbatch.collection._check`). Each chunk is read on its own, so one
bad chunk is reported and the scrub goes on:

- zarr arrays that annbatch's chunk reader understands are read with it, with every check it
  makes (shard index entries inside their file, CRC32C of shard indexes and of every chunk that
  carries one, the decoded size); other zarr arrays are read through zarr-python chunk by chunk;
  a chunk missing from an array that records every chunk as written (every array of a
  collection: X, layers, obsm, obs and var) is reported, not read as the fill value;
- HDF5 datasets are read chunk by chunk (or in blocks, when not chunked) through h5py;
- CSR matrices in anndata's encoding get the Loader's structural checks: ``indptr`` (length,
  starts at 0, never decreases, ends at the stored entries) and every column index in range.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import zarr

from annbatch._core.chunks import COMPLETE_ATTR, direct_array, read_whole
from annbatch._core.frames import missing_chunks
from annbatch._core.validate import check_indices, check_indptr
from annbatch._stores import is_url, open_zarr
from annbatch.errors import AnnbatchError, InvalidArgumentError, StoreReadError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_BLOCK_BYTES = 64 * 2**20  # rows read at once from an array that is not chunked
_MISSING = (
    "missing, but the array records that every chunk was written; the store is incomplete "
    "(an interrupted copy or upload?) or damaged"
)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a store."""

    array: str
    """The array (or group), as a path inside the store."""
    chunk: str
    """The chunk (its key, or the rows), or ``"-"`` for the array as a whole."""
    problem: str
    """What was wrong."""

    def __str__(self) -> str:
        return f"{self.array} [{self.chunk}]: {self.problem}"


def verify(path: str | os.PathLike[str]) -> list[Problem]:
    """Read and check every chunk of every array of a store; return what is wrong (empty: all
    good).

    Parameters
    ----------
    path
        A zarr store's directory (an AnnData store or an annbatch collection) or an ``.h5ad``
        file; or the URL of a zarr store in object storage (credentials from the environment).
    """
    path = os.fspath(path)
    if is_url(path):  # object storage: credentials from the environment
        try:
            remote = open_zarr(path)
        except StoreReadError as e:
            return [Problem("/", "-", str(e))]
        return _manifest(path, remote) + list(_scrub_zarr(remote))
    if not os.path.exists(path):
        msg = f"{path} does not exist"
        raise InvalidArgumentError(msg)
    if _is_h5ad_collection(path):
        return _verify_h5ad_collection(path)
    if os.path.isfile(path):
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            return [Problem("/", "-", f"not readable as an HDF5 file: {e}")]
        with f:
            return list(_scrub_h5(f))
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as e:
        return [Problem("/", "-", f"not readable as a zarr group: {type(e).__name__}: {e}")]
    return _manifest(path, root) + list(_scrub_zarr(root))


def _manifest(path: str, root: zarr.Group) -> list[Problem]:
    """What an annbatch collection's manifest names and its store lacks (nothing for other
    stores)."""
    from annbatch.collection import DatasetCollection
    from annbatch.collection._check import manifest_problems
    from annbatch.collection._collection import ATTR

    if ATTR not in root.attrs:
        return []
    try:
        return manifest_problems(DatasetCollection(path, mode="r"))
    except AnnbatchError as e:
        return [Problem("/", "-", str(e))]


def _is_h5ad_collection(path: str) -> bool:
    """Whether ``path`` is a folder of h5ad datasets (an annbatch h5ad collection, or
    ``.h5ad`` files in a folder that is not a zarr group)."""
    from annbatch.collection._h5ad import MANIFEST, SCRATCH

    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "zarr.json")):
        return False
    names = os.listdir(path)
    return MANIFEST in names or SCRATCH in names or any(n.endswith(".h5ad") for n in names)


def _verify_h5ad_collection(path: str) -> list[Problem]:
    """An h5ad collection: its manifest against its files, then every dataset of every file
    (checksums where the files carry them, CSR structure)."""
    from annbatch.collection import DatasetCollection
    from annbatch.collection._check import manifest_problems

    try:
        collection = DatasetCollection(path, mode="r", is_collection_h5ad=True)
        problems = manifest_problems(collection)
        state = collection._state()
    except (AnnbatchError, OSError, ValueError) as e:
        return [Problem("/", "-", f"not readable as an h5ad collection: {e}")]
    if state is None or state["state"] != "complete":
        return problems
    unreadable = {p.array for p in problems if p.chunk == "-"}
    for entry in state["datasets"]:
        name = entry["name"]
        file = os.path.join(path, name)
        if f"/{name}" in unreadable or not os.path.isfile(file):
            continue
        try:
            f = h5py.File(file, "r")
        except OSError:
            continue  # reported by manifest_problems
        with f:
            problems += _scrub_h5(f, f"/{name}")
    return problems


def _scrub_zarr(group: zarr.Group, prefix: str = "") -> Iterator[Problem]:
    try:
        names = sorted(group.keys())
    except Exception as e:
        yield Problem(prefix or "/", "-", f"cannot list its members: {type(e).__name__}: {e}")
        return
    for name in names:
        where = f"{prefix}/{name}"
        try:  # opened one by one: bad metadata of one member does not hide its siblings
            member = group[name]
        except Exception as e:
            yield Problem(where, "-", f"cannot open: {type(e).__name__}: {e}")
            continue
        if isinstance(member, zarr.Group):
            yield from _scrub_zarr(member, where)
            if member.attrs.get("encoding-type") == "csr_matrix":
                yield from _check_csr(member, where)
        else:
            yield from _scrub_zarr_array(member, where)


def _scrub_zarr_array(array: zarr.Array, where: str) -> Iterator[Problem]:
    direct = direct_array(array, verify_checksums=True)
    if direct is not None:
        rows, n = direct.rows_per_chunk, int(array.shape[0])
        seen: set[str] = set()
        scratch = np.empty((min(rows, max(n, 1)), *direct.shape[1:]), dtype=direct.dtype)
        for c in range(-(-n // rows)):
            lo, hi = c * rows, min(n, (c + 1) * rows)
            try:
                for task in direct.tasks(np.array([lo]), np.array([hi]), scratch[: hi - lo], 1):
                    task()
            except AnnbatchError as e:
                if str(e) not in seen:  # a bad shard index fails each of its chunks alike
                    seen.add(str(e))
                    yield Problem(where, direct.chunk_name(c), str(e))
        return
    lost: set[str] = set()
    if array.attrs.get(COMPLETE_ATTR) is True:  # a chunk zarr would read as the fill value
        try:
            missing = missing_chunks(array)
        except Exception as e:
            missing = []
            yield Problem(where, "-", f"cannot list its chunks: {type(e).__name__}: {e}")
        for name in missing:
            lost.add(name.split(" ", 1)[1])
            yield Problem(where, name, _MISSING)
    counts = [-(-int(s) // int(c)) for s, c in zip(array.shape, array.chunks, strict=True)]
    for coords in np.ndindex(*counts):  # a 0-d array has one chunk, ()
        region = tuple(
            slice(i * int(c), (i + 1) * int(c)) for i, c in zip(coords, array.chunks, strict=True)
        )
        key = _chunk_key(array, coords)
        if array.shards is None and key in lost:
            continue  # (zarr would read it as the fill value)
        yield from _attempt(partial(array.__getitem__, region), where, key)


def _chunk_key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    try:
        return str(array.metadata.encode_chunk_key(coords))
    except Exception:
        return "/".join(map(str, coords)) or "0"


def _attempt(read: Callable[[], Any], where: str, chunk: str) -> Iterator[Problem]:
    try:
        read()
    except MemoryError:
        raise
    except Exception as e:
        yield Problem(where, chunk, f"{type(e).__name__}: {e}")


def _scrub_h5(group: h5py.Group, prefix: str = "") -> Iterator[Problem]:
    try:
        names = sorted(group)
    except Exception as e:
        yield Problem(prefix or "/", "-", f"cannot list its members: {type(e).__name__}: {e}")
        return
    for name in names:
        where = f"{prefix}/{name}"
        try:
            member = group[name]
            csr = (
                isinstance(member, h5py.Group) and member.attrs.get("encoding-type") == "csr_matrix"
            )
        except Exception as e:
            yield Problem(where, "-", f"cannot open: {type(e).__name__}: {e}")
            continue
        if isinstance(member, h5py.Group):
            yield from _scrub_h5(member, where)
            if csr:
                yield from _check_csr(member, where)
        elif isinstance(member, h5py.Dataset):
            yield from _scrub_h5_dataset(member, where)


def _scrub_h5_dataset(dataset: h5py.Dataset, where: str) -> Iterator[Problem]:
    if dataset.shape is None or dataset.ndim == 0:
        yield from _attempt(partial(dataset.__getitem__, ()), where, "-")
        return
    if dataset.chunks is not None:
        for region in dataset.iter_chunks():
            key = ",".join(f"{s.start}:{s.stop}" for s in region)
            yield from _attempt(partial(dataset.__getitem__, region), where, key)
        return
    row_bytes = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:], dtype=np.int64)))
    step = max(1, _BLOCK_BYTES // row_bytes)
    for lo in range(0, dataset.shape[0], step):
        hi = min(dataset.shape[0], lo + step)
        yield from _attempt(partial(dataset.__getitem__, slice(lo, hi)), where, f"rows {lo}:{hi}")


def _check_csr(group: Any, where: str) -> Iterator[Problem]:
    """The Loader's structural checks of a CSR matrix in anndata's encoding."""
    try:
        shape = tuple(int(n) for n in group.attrs["shape"])
        data, indices = group["data"], group["indices"]
        indptr = check_indptr(
            read_whole(group["indptr"]),
            n_obs=shape[0],
            nnz=min(int(data.shape[0]), int(indices.shape[0])),
            exact=True,
            where=f"{where}/indptr",
        )
        step = max(1, _BLOCK_BYTES // max(1, indices.dtype.itemsize))
        for lo in range(0, int(indptr[-1]), step):
            hi = min(int(indptr[-1]), lo + step)
            try:
                block = np.asarray(indices[lo:hi])
            except Exception:
                continue  # reported by the chunk scrub above
            check_indices(block, n_var=shape[1], where=f"{where}/indices, entries {lo}:{hi}")
    except AnnbatchError as e:
        yield Problem(where, "-", str(e))
    except Exception as e:
        yield Problem(where, "-", f"not a readable CSR matrix: {type(e).__name__}: {e}")
