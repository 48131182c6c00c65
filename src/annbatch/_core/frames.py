"""obs and var (anndata ``dataframe`` elements) read with the chunk reader's checks.

anndata reads a dataframe through zarr-python, which reads a chunk that is not there as the
array's fill value: a lost chunk of a categorical's codes gives its rows the first category,
with no error. Here every zarr array of a frame is read through a path that checks it:

- numeric arrays (category codes, numbers, masks) through annbatch's chunk reader
  (:func:`annbatch._core.chunks.read_whole`): the CRC32C of every chunk, the decoded sizes, and,
  for an array that records that every chunk was written
  (:data:`~annbatch._core.chunks.COMPLETE_ATTR`, as every array of a collection does), no chunk
  missing;
- other arrays (strings, or layouts the chunk reader does not read) through zarr-python, which
  verifies their CRC32C, after checking that every chunk of an array that records them all is
  there (:func:`missing_chunks`).

A failure is an :mod:`annbatch.errors` class whose message names the column and the dataset.
HDF5 (h5ad) frames are read by anndata, their failures named the same way.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import h5py
import numpy as np
import zarr

from annbatch._core.chunks import COMPLETE_ATTR, direct_array, read_whole
from annbatch.errors import (
    AnnbatchError,
    ChecksumMismatchError,
    CorruptChunkError,
    StoreReadError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def read_frame(elem: Any, frame: zarr.Group | h5py.Group, kind: Literal["obs", "var"]) -> Any:
    """anndata's ``read_elem`` of ``elem`` (the dataframe ``frame`` itself, or one of its
    columns or its index), every array read with the checks above.

    Parameters
    ----------
    elem
        What to read: ``frame``, or a member of it.
    frame
        The dataframe group (a dataset's ``obs`` or ``var``), for naming columns in errors.
    kind
        ``"obs"`` or ``"var"``, for errors.
    """
    from anndata.experimental import read_dispatched

    def read(func: Callable[[Any], Any], _name: str, node: Any, *, iospec: Any) -> Any:
        if isinstance(node, zarr.Array):
            return read_checked(node, func, lambda: describe_column(node, frame, kind))
        if isinstance(node, h5py.Dataset):
            with _named(lambda: describe_column(node, frame, kind)):
                return func(node)
        return func(node)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on encodings
        return read_dispatched(elem, read)


def read_checked(array: zarr.Array, read: Callable[[Any], Any], what: Callable[[], str]) -> Any:
    """All of ``array`` (``read``: anndata's reader of it, for arrays the chunk reader cannot
    read); ``what`` names it in errors."""
    with _named(what):
        if direct_array(array) is not None:
            return read_whole(array)
        if array.attrs.get(COMPLETE_ATTR) is True:
            lost = missing_chunks(array)
            if lost:
                msg = (
                    f"{lost[0]} of the zarr array {array.store_path} is missing"
                    f"{f' (and {len(lost) - 1} more)' if len(lost) > 1 else ''}, but the array "
                    "records that every chunk was written; the store is incomplete (an "
                    "interrupted copy or upload?) or damaged"
                )
                raise CorruptChunkError(msg)
        return read(array)


def missing_chunks(array: zarr.Array) -> list[str]:
    """The stored objects (shards, or chunks where there are no shards) of ``array`` that are
    not in its store, as ``"chunk KEY"`` / ``"shard KEY"``."""
    if int(array.nchunks_initialized) >= int(array.nchunks):  # (counts whole shards)
        return []
    # Some are missing: which ones (one listing of the array's prefix).
    from zarr.core.sync import sync

    store = array.store_path.store
    prefix = array.store_path.path.rstrip("/")

    async def listed() -> set[str]:
        start = f"{prefix}/" if prefix else ""
        return {key.removeprefix(start) async for key in store.list_prefix(start)}

    present = sync(listed())
    noun = "shard" if array.shards else "chunk"
    keys = (array.metadata.encode_chunk_key(c) for c in np.ndindex(*_grid(array)))
    return [f"{noun} {key}" for key in keys if key not in present]


def _grid(array: zarr.Array) -> tuple[int, ...]:
    """Stored objects along each axis (shards, or chunks where there are no shards)."""
    outer = array.shards or array.chunks
    return tuple(-(-int(s) // int(c)) for s, c in zip(array.shape, outer, strict=True))


def describe_column(node: Any, frame: zarr.Group | h5py.Group, kind: str) -> str:
    """``node`` (an array of the dataframe ``frame``) as errors name it: the column (or the
    index) and the dataset."""
    node_path, frame_path = _path_of(node), _path_of(frame)
    relative = node_path.removeprefix(frame_path).strip("/")
    column = relative.split("/", 1)[0]
    dataset = frame_path.rsplit("/", 1)[0].strip("/")
    index = column == frame.attrs.get("_index")
    label = f"the {kind} index" if index else f"{kind} column {column!r}"
    where = _store_of(frame)
    return f"{label} of the dataset {dataset} in {where}" if dataset else f"{label} of {where}"


def _path_of(node: Any) -> str:
    return "/" + (node.name if isinstance(node, h5py.HLObject) else node.path).strip("/")


def _store_of(node: Any) -> str:
    if isinstance(node, h5py.HLObject):
        return str(node.file.filename)
    return str(node.store)


@contextmanager
def _named(what: Callable[[], str]) -> Iterator[None]:
    """Failures while reading become annbatch errors that start with ``what()``."""
    try:
        yield
    except MemoryError:
        raise
    except AnnbatchError as e:
        msg = f"{what()}: {e}"
        raise type(e)(msg) from e
    except OSError as e:  # h5py raises OSError both for I/O and for chunks that do not decode
        msg = f"{what()}: reading failed: {type(e).__name__}: {e}"
        raise StoreReadError(msg) from e
    except NotImplementedError:
        raise  # an encoding anndata cannot read: not damage
    except Exception as e:
        if type(e).__name__ == "IORegistryError":  # anndata: an unknown or newer encoding
            raise
        # zarr-python's crc32c codec raises ValueError; others whatever their codec raises
        kind = ChecksumMismatchError if "checksum" in str(e).lower() else CorruptChunkError
        msg = f"{what()}: a chunk does not decode ({type(e).__name__}: {e}); the store is damaged"
        raise kind(msg) from e
