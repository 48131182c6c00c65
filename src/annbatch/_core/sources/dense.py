"""Dense rows: ``zarr.Array`` (read chunk by chunk by annbatch's own reader where it can),
``h5py.Dataset`` and ``numpy.ndarray``, axis 0 indexing rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._core.chunks import direct_array
from annbatch._core.failures import store_errors
from annbatch._core.sources._common import (
    block_per_part,
    check_h5_open,
    chunk_len,
    describe_array,
    h5_restore,
    h5_state,
    owned,
    per_range_job,
    read_errors,
)
from annbatch._core.types import ReadJob, empty_window
from annbatch._narrow import declared_dtype

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import h5py
    import zarr

    from annbatch._core.sources import RowSource
    from annbatch._core.types import Allocate


class DenseSource:
    """Dense rows from a ``zarr.Array``, ``h5py.Dataset`` or ``numpy.ndarray`` (axis 0 = rows)."""

    is_sparse = False

    def __init__(
        self,
        array: zarr.Array | h5py.Dataset | np.ndarray,
        *,
        verify_checksums: bool = False,
        stored_dtype: bool = False,
    ) -> None:
        self._array = array
        self._type: type = type(array) if not isinstance(array, np.ndarray) else np.ndarray
        stored = np.dtype(array.dtype)
        declared = None
        if not stored_dtype and not isinstance(array, np.ndarray):  # see annbatch._narrow
            with store_errors(lambda: f"reading the attributes of {self.describe()}"):
                attrs = array.attrs
                declared = declared_dtype(attrs, stored, self.describe())
        self._dtype = stored if declared is None else declared
        self._direct = direct_array(array, verify_checksums=verify_checksums)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        """The dtype rows are yielded in: the stored one, or the one a packed collection
        layout narrowed the values from (:mod:`annbatch._narrow`)."""
        return self._dtype

    @property
    def dataset_type(self) -> type:
        return self._type

    @property
    def reads_chunks_once(self) -> bool:
        return self._direct is not None

    def read_job(self, starts: np.ndarray, stops: np.ndarray, n_tasks: int) -> ReadJob:
        if self._direct is None:
            return per_range_job(self.read, starts, stops)
        out = np.empty((int(np.sum(stops - starts)), *self.shape[1:]), dtype=self.dtype)
        return ReadJob(self._direct.tasks(starts, stops, out, n_tasks), lambda: [out])

    def window_job(
        self,
        parts: Sequence[tuple[RowSource, np.ndarray, np.ndarray]],
        n_tasks: int,
        allocate: Allocate = empty_window,
        *,
        narrow: bool = False,
    ) -> ReadJob:
        """See :meth:`RowSource.window_job`: a block per part, in memory of its own, in
        :attr:`dtype` (``narrow`` changes nothing)."""
        return block_per_part(parts, n_tasks)

    def placed_tasks(
        self, starts: np.ndarray, stops: np.ndarray, dest: np.ndarray, out: np.ndarray, n_tasks: int
    ) -> list[Callable[[], None]]:
        """Tasks that copy rows ``starts[i]:stops[i]`` (sorted, disjoint) to rows ``dest[i]:``
        of ``out``. Only for a source that :attr:`reads_chunks_once`."""
        if self._direct is None:
            msg = f"{self.describe()} is not read chunk by chunk; use read_job"
            raise TypeError(msg)
        return self._direct.tasks(starts, stops, out, n_tasks, dst=dest)

    def read(self, start: int, stop: int) -> np.ndarray:
        # A slice of an in-memory array is a view: copy it, so that yielded batches (and the
        # tensors sharing their memory) never alias the user's array.
        with read_errors(self, f"rows {start}:{stop}"):
            rows = self._array[start:stop]
        return owned(rows, in_memory=isinstance(self._array, np.ndarray)).astype(
            self._dtype, copy=False
        )

    def check_open(self) -> None:
        check_h5_open(self._array, self.describe())

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        rows = chunk_len(self._array)
        return rows is not None and row_a // rows == row_b // rows

    def describe(self) -> str:
        return f"{self._type.__module__.split('.')[0]}.{self._type.__name__} ({describe_array(self._array)})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "array": h5_state(self._array),
            "type": self._type,
            "dtype": self._dtype,
            "direct": self._direct,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._array = h5_restore(state["array"])
        self._type = state["type"]
        self._dtype = state["dtype"]
        self._direct = state["direct"]
