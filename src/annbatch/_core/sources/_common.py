"""What every row source shares: HDF5 handles that survive pickling, closed-file checks, names
for errors, and turning the failures of the libraries underneath into annbatch errors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import zarr

from annbatch._core.failures import store_errors
from annbatch._core.types import ReadJob
from annbatch.errors import ClosedDatasetError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from contextlib import AbstractContextManager

    from annbatch._core.sources import RowSource
    from annbatch._core.types import Block


@dataclass(frozen=True, slots=True)
class _H5Ref:
    """A picklable stand-in for an h5py object: the file it lives in and its name there."""

    filename: str
    name: str

    def open(self) -> Any:
        return h5py.File(self.filename, mode="r")[self.name]


def h5_state(obj: Any) -> Any:
    if isinstance(obj, h5py.Dataset | h5py.Group):
        if not obj.id.valid:
            msg = "cannot send an HDF5 dataset whose file is closed to another process"
            raise ClosedDatasetError(msg)
        return _H5Ref(obj.file.filename, obj.name)
    return obj


def h5_restore(obj: Any) -> Any:
    return obj.open() if isinstance(obj, _H5Ref) else obj


def check_h5_open(obj: Any, what: str) -> None:
    if isinstance(obj, h5py.Dataset | h5py.Group) and not obj.id.valid:
        msg = (
            f"{what} belongs to an HDF5 file that has been closed; keep the h5py.File (or the "
            "backed AnnData) open for as long as the Loader reads from it"
        )
        raise ClosedDatasetError(msg)


def describe_array(arr: Any) -> str:
    if isinstance(arr, h5py.Dataset | h5py.Group):
        try:
            return f"{arr.name} in {arr.file.filename}"
        except (ValueError, RuntimeError):  # closed file: h5py can no longer resolve names
            return "HDF5 object in a closed file"
    if isinstance(arr, zarr.Array | zarr.Group):
        return f"{arr.store_path}"
    return "in-memory array"


def read_errors(source: RowSource, rows: str) -> AbstractContextManager[None]:
    """A failure while reading ``rows`` of ``source`` becomes a
    :class:`~annbatch.errors.StoreReadError` that names them, or a
    :class:`~annbatch.errors.ClosedDatasetError` if the source's file was closed."""
    return store_errors(lambda: f"reading {rows} of {source.describe()}", first=source.check_open)


def chunk_len(array: Any) -> int | None:
    """Length along axis 0 of one on-disk chunk (None: not chunked, or in memory)."""
    if isinstance(array, zarr.Array | h5py.Dataset) and array.chunks is not None:
        return int(array.chunks[0])
    return None


def _read_into(
    blocks: list[Any], i: int, read: Callable[[int, int], Block], start: int, stop: int
) -> None:
    blocks[i] = read(start, stop)


def per_range_job(
    read: Callable[[int, int], Block], starts: np.ndarray, stops: np.ndarray
) -> ReadJob:
    """One task per range, each calling ``read``: for sources read through zarr or h5py."""
    blocks: list[Any] = [None] * len(starts)
    tasks = [
        partial(_read_into, blocks, i, read, start, stop)
        for i, (start, stop) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True))
    ]
    return ReadJob(tasks, lambda: blocks)


def owned(values: Any, *, in_memory: bool) -> np.ndarray:
    """``values`` as an array the Loader may hand out: copied when it views a user's array."""
    return np.array(values) if in_memory else np.asarray(values)


def block_per_part(
    parts: Sequence[tuple[RowSource, np.ndarray, np.ndarray]], n_tasks: int
) -> ReadJob:
    """A window's parts read by each source's own :meth:`RowSource.read_job`, as one job:
    all their tasks, then all their blocks in order."""
    jobs = [source.read_job(starts, stops, n_tasks) for source, starts, stops in parts]
    return ReadJob(
        [task for job in jobs for task in job.tasks],
        lambda: [block for job in jobs for block in job.result()],
    )
