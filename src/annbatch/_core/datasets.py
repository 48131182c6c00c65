"""Row sources: one adapter per kind of input array, all read through the same interface.

The Loader only ever talks to :class:`RowSource`: a 2-D (or N-D) array of rows that can be
read as contiguous row ranges. Adapters exist for dense ``zarr.Array``, ``h5py.Dataset`` and
``numpy.ndarray``, and for CSR matrices stored by anndata (zarr or HDF5) or held by scipy.
HDF5 handles cannot cross process boundaries, so adapters pickle them as (file, name) and
reopen them read-only in the receiving process (DataLoader workers).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import anndata.abc
import h5py
import numpy as np
import scipy.sparse as sp
import zarr

from annbatch._core.direct import DirectArray, direct_array
from annbatch._core.ranges import expand_ranges
from annbatch._core.types import ReadJob, csr_from_arrays
from annbatch._core.validate import check_indices, check_indptr
from annbatch.errors import (
    AnnbatchError,
    ClosedDatasetError,
    CorruptDataError,
    StoreReadError,
    UnsupportedDatasetError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from annbatch._core.types import Block

ACCEPTED = (
    "zarr.Array, h5py.Dataset, anndata.abc.CSRDataset (zarr or h5ad), numpy.ndarray "
    "or scipy.sparse CSR"
)


class RowSource(Protocol):
    """An array of rows that the Loader can read by contiguous row ranges."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape; axis 0 indexes rows."""

    @property
    def dtype(self) -> np.dtype:
        """Element dtype."""

    @property
    def is_sparse(self) -> bool:
        """Whether rows come back as ``scipy.sparse.csr_matrix``."""

    @property
    def dataset_type(self) -> type:
        """The user-facing type of the input (``zarr.Array``, ``anndata.abc.CSRDataset``...)."""

    @property
    def reads_chunks_once(self) -> bool:
        """Whether :meth:`read_job` decodes each on-disk chunk once per call by itself, so the
        planner need not merge ranges that share a chunk."""

    def read(self, start: int, stop: int) -> Block:
        """Rows ``start:stop`` as a numpy array or a CSR matrix."""

    def read_job(self, starts: np.ndarray, stops: np.ndarray, n_tasks: int) -> ReadJob:
        """The work of reading rows ``starts[i]:stops[i]`` (sorted, disjoint), one range after
        another, split into about ``n_tasks`` tasks."""

    def check_open(self) -> None:
        """Raise :class:`~annbatch.errors.ClosedDatasetError` if the source can no longer be read."""

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        """Whether rows ``row_a < row_b`` lie in one on-disk chunk, so reading the rows
        between them decodes nothing more."""

    def describe(self) -> str:
        """A short human-readable name for error messages."""


@dataclass(frozen=True, slots=True)
class _H5Ref:
    """A picklable stand-in for an h5py object: the file it lives in and its name there."""

    filename: str
    name: str

    def open(self) -> Any:
        return h5py.File(self.filename, mode="r")[self.name]


def _h5_state(obj: Any) -> Any:
    if isinstance(obj, h5py.Dataset | h5py.Group):
        if not obj.id.valid:
            msg = "cannot send an HDF5 dataset whose file is closed to another process"
            raise ClosedDatasetError(msg)
        return _H5Ref(obj.file.filename, obj.name)
    return obj


def _h5_restore(obj: Any) -> Any:
    return obj.open() if isinstance(obj, _H5Ref) else obj


def _check_h5_open(obj: Any, what: str) -> None:
    if isinstance(obj, h5py.Dataset | h5py.Group) and not obj.id.valid:
        msg = (
            f"{what} belongs to an HDF5 file that has been closed; keep the h5py.File (or the "
            "backed AnnData) open for as long as the Loader reads from it"
        )
        raise ClosedDatasetError(msg)


def _describe_array(arr: Any) -> str:
    if isinstance(arr, h5py.Dataset | h5py.Group):
        try:
            return f"{arr.name} in {arr.file.filename}"
        except (ValueError, RuntimeError):  # closed file: h5py can no longer resolve names
            return "HDF5 object in a closed file"
    if isinstance(arr, zarr.Array | zarr.Group):
        return f"{arr.store_path}"
    return "in-memory array"


@contextmanager
def read_errors(source: RowSource, rows: str) -> Iterator[None]:
    """Turn a failure of the library underneath (h5py, zarr, a codec, the OS) while reading
    ``rows`` of ``source`` into a :class:`~annbatch.errors.StoreReadError` that names them,
    or a :class:`~annbatch.errors.ClosedDatasetError` if the source's file was closed."""
    try:
        yield
    except (AnnbatchError, MemoryError):
        raise
    except Exception as e:
        source.check_open()  # an HDF5 file closed mid-iteration: say so
        msg = f"reading {rows} of {source.describe()} failed: {type(e).__name__}: {e}"
        raise StoreReadError(msg) from e


def _chunk_len(array: Any) -> int | None:
    """Length along axis 0 of one on-disk chunk (None: not chunked, or in memory)."""
    if isinstance(array, zarr.Array | h5py.Dataset) and array.chunks is not None:
        return int(array.chunks[0])
    return None


def _read_into(
    blocks: list[Any], i: int, read: Callable[[int, int], Block], start: int, stop: int
) -> None:
    blocks[i] = read(start, stop)


def _per_range_job(
    read: Callable[[int, int], Block], starts: np.ndarray, stops: np.ndarray
) -> ReadJob:
    """One task per range, each calling ``read``: for sources read through zarr or h5py."""
    blocks: list[Any] = [None] * len(starts)
    tasks = [
        partial(_read_into, blocks, i, read, start, stop)
        for i, (start, stop) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True))
    ]
    return ReadJob(tasks, lambda: blocks)


def _owned(values: Any, *, in_memory: bool) -> np.ndarray:
    """``values`` as an array the Loader may hand out: copied when it views a user's array."""
    return np.array(values) if in_memory else np.asarray(values)


class DenseSource:
    """Dense rows from a ``zarr.Array``, ``h5py.Dataset`` or ``numpy.ndarray`` (axis 0 = rows)."""

    is_sparse = False

    def __init__(
        self, array: zarr.Array | h5py.Dataset | np.ndarray, *, verify_checksums: bool = False
    ) -> None:
        self._array = array
        self._type: type = type(array) if not isinstance(array, np.ndarray) else np.ndarray
        self._direct = direct_array(array, verify_checksums=verify_checksums)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self._array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._array.dtype)

    @property
    def dataset_type(self) -> type:
        return self._type

    @property
    def reads_chunks_once(self) -> bool:
        return self._direct is not None

    def read_job(self, starts: np.ndarray, stops: np.ndarray, n_tasks: int) -> ReadJob:
        if self._direct is None:
            return _per_range_job(self.read, starts, stops)
        out = np.empty((int(np.sum(stops - starts)), *self.shape[1:]), dtype=self.dtype)
        return ReadJob(self._direct.tasks(starts, stops, out, n_tasks), lambda: [out])

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
        return _owned(rows, in_memory=isinstance(self._array, np.ndarray))

    def check_open(self) -> None:
        _check_h5_open(self._array, self.describe())

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        rows = _chunk_len(self._array)
        return rows is not None and row_a // rows == row_b // rows

    def describe(self) -> str:
        return f"{self._type.__module__.split('.')[0]}.{self._type.__name__} ({_describe_array(self._array)})"

    def __getstate__(self) -> dict[str, Any]:
        return {"array": _h5_state(self._array), "type": self._type, "direct": self._direct}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._array = _h5_restore(state["array"])
        self._type = state["type"]
        self._direct = state["direct"]


def _direct_pair(
    data: Any, indices: Any, *, verify_checksums: bool
) -> tuple[DirectArray, DirectArray] | None:
    direct_data = direct_array(data, verify_checksums=verify_checksums)
    direct_indices = direct_array(indices, verify_checksums=verify_checksums)
    if direct_data is None or direct_indices is None:
        return None
    return direct_data, direct_indices


class CSRSource:
    """CSR rows from anndata's on-disk CSR encoding (zarr or HDF5), or from a scipy CSR matrix.

    ``indptr`` is held in memory (8 bytes per row) so that any row range maps to one
    contiguous slice of ``data`` and ``indices`` without an extra read.
    """

    is_sparse = True

    def __init__(
        self,
        data: Any,
        indices: Any,
        indptr: np.ndarray,
        shape: tuple[int, int],
        dataset_type: type,
        container: Any = None,
        *,
        verify_checksums: bool = False,
    ) -> None:
        self._data = data
        self._indices = indices
        self._shape = shape
        self._type = dataset_type
        self._container = container
        self._indptr = self._checked_indptr(indptr)
        self._direct = _direct_pair(data, indices, verify_checksums=verify_checksums)

    def _checked_indptr(self, indptr: np.ndarray) -> np.ndarray:
        """``indptr`` as int64, after checking the structure around it (see
        :mod:`annbatch._core.validate`)."""
        where = self.describe()
        for name, array in (("data", self._data), ("indices", self._indices)):
            if len(getattr(array, "shape", ())) != 1:
                msg = f"{where}: {name} must be a 1-D array, got shape {getattr(array, 'shape', None)}"
                raise CorruptDataError(msg)
        if np.dtype(self._indices.dtype).kind not in "iu":
            msg = f"{where}: column indices have dtype {self._indices.dtype}; expected integers"
            raise CorruptDataError(msg)
        if len(self._shape) != 2 or min(self._shape) < 0:
            msg = f"{where}: shape {self._shape} is not that of a matrix"
            raise CorruptDataError(msg)
        nnz = min(int(self._data.shape[0]), int(self._indices.shape[0]))
        return check_indptr(
            indptr,
            n_obs=self._shape[0],
            nnz=nnz,
            exact=not isinstance(self._data, np.ndarray),
            where=where,
        )

    @classmethod
    def from_anndata(
        cls, dataset: anndata.abc.CSRDataset, *, verify_checksums: bool = False
    ) -> CSRSource:
        group = dataset.group
        where = f"anndata.abc.CSRDataset ({_describe_array(group)})"
        missing = [k for k in ("data", "indices", "indptr") if k not in group]
        if missing:
            msg = (
                f"{where} has no {', '.join(missing)}; it is not a CSR matrix in anndata's encoding"
            )
            raise CorruptDataError(msg)
        try:
            indptr = np.asarray(group["indptr"][...])
            shape = tuple(int(n) for n in dataset.shape)
        except (AnnbatchError, MemoryError):
            raise
        except Exception as e:
            msg = f"reading indptr of {where} failed: {type(e).__name__}: {e}"
            raise StoreReadError(msg) from e
        return cls(
            group["data"],
            group["indices"],
            indptr,
            shape,  # type: ignore[arg-type]
            anndata.abc.CSRDataset,
            container=group,
            verify_checksums=verify_checksums,
        )

    @classmethod
    def from_scipy(cls, matrix: sp.csr_matrix | sp.csr_array) -> CSRSource:
        return cls(
            matrix.data,
            matrix.indices,
            matrix.indptr,
            tuple(int(n) for n in matrix.shape),  # type: ignore[arg-type]
            type(matrix),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._data.dtype)

    @property
    def dataset_type(self) -> type:
        return self._type

    @property
    def reads_chunks_once(self) -> bool:
        return self._direct is not None

    def nnz_of(self, starts: np.ndarray, stops: np.ndarray) -> int:
        """Stored entries in rows ``starts[i]:stops[i]``, all ranges together."""
        return int(np.sum(self._indptr[stops] - self._indptr[starts]))

    @property
    def index_dtype(self) -> np.dtype:
        """Dtype of the stored column indices."""
        return np.dtype(self._indices.dtype)

    def read_job(
        self,
        starts: np.ndarray,
        stops: np.ndarray,
        n_tasks: int,
        out: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> ReadJob:
        """See :meth:`RowSource.read_job`; ``out`` (data, indices) of :meth:`nnz_of` elements
        receives the entries, for a source that :attr:`reads_chunks_once`."""
        if self._direct is None:
            return _per_range_job(self.read, starts, stops)
        lo, hi = self._indptr[starts], self._indptr[stops]
        nnz = int(np.sum(hi - lo))
        if out is None:
            data = np.empty(nnz, dtype=self.dtype)
            indices = np.empty(nnz, dtype=self._indices.dtype)
        else:
            data, indices = out
        direct_data, direct_indices = self._direct
        half = max(1, n_tasks // 2)
        tasks = direct_data.tasks(lo, hi, data, half) + direct_indices.tasks(lo, hi, indices, half)
        rows = expand_ranges(starts, stops)
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(self._indptr[rows + 1] - self._indptr[rows], out=indptr[1:])
        shape = (rows.size, self._shape[1])

        def result() -> list[Block]:
            check_indices(indices, n_var=self._shape[1], where=self._rows_read(starts, stops))
            return [csr_from_arrays(data, indices, indptr, shape)]

        return ReadJob(tasks, result)

    def _rows_read(self, starts: np.ndarray, stops: np.ndarray) -> str:
        """The rows of a read, as named in errors."""
        span = f"rows {int(starts[0])}:{int(stops[-1])}" if len(starts) else "no rows"
        return f"{self.describe()}, {span}"

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        lo, hi = int(self._indptr[start]), int(self._indptr[stop])
        in_memory = isinstance(self._data, np.ndarray)  # see DenseSource.read
        with read_errors(self, f"rows {start}:{stop} (entries {lo}:{hi})"):
            data = _owned(self._data[lo:hi], in_memory=in_memory)
            indices = _owned(self._indices[lo:hi], in_memory=in_memory)
        if data.shape != (hi - lo,) or indices.shape != (hi - lo,):
            msg = (
                f"{self.describe()}, rows {start}:{stop}: read {data.size} values and "
                f"{indices.size} column indices where indptr says {hi - lo}; the store is damaged"
            )
            raise CorruptDataError(msg)
        check_indices(
            indices, n_var=self._shape[1], where=f"{self.describe()}, rows {start}:{stop}"
        )
        indptr = self._indptr[start : stop + 1] - lo
        return csr_from_arrays(data, indices, indptr, (stop - start, self._shape[1]))

    def check_open(self) -> None:
        _check_h5_open(self._container, self.describe())
        _check_h5_open(self._data, self.describe())

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        last_a, first_b = int(self._indptr[row_a + 1]) - 1, int(self._indptr[row_b])
        for array in (self._data, self._indices):
            elems = _chunk_len(array)
            if elems is None or last_a // elems != first_b // elems:
                return False
        return True

    def describe(self) -> str:
        if self._type is anndata.abc.CSRDataset:
            return f"anndata.abc.CSRDataset ({_describe_array(self._container)})"
        return f"scipy.sparse.{self._type.__name__}"

    def __getstate__(self) -> dict[str, Any]:
        state = {
            "data": self._data,
            "indices": self._indices,
            "container": self._container,
        }
        state = {k: _h5_state(v) for k, v in state.items()}
        return {
            **state,
            "indptr": self._indptr,
            "shape": self._shape,
            "type": self._type,
            "direct": self._direct,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._data = _h5_restore(state["data"])
        self._indices = _h5_restore(state["indices"])
        self._container = _h5_restore(state["container"])
        self._indptr = state["indptr"]
        self._shape = state["shape"]
        self._type = state["type"]
        self._direct = state["direct"]


def as_row_source(dataset: object, *, where: str, verify_checksums: bool = False) -> RowSource:
    """Wrap a user's array in the matching :class:`RowSource`, or explain why it cannot be.

    Parameters
    ----------
    dataset
        The array to read from.
    where
        How to name the dataset in errors, e.g. ``"dataset 2"``.
    verify_checksums
        Verify the checksum of every chunk read, also of chunks that are only partly wanted
        (see :func:`annbatch._core.direct.direct_array`).
    """
    if isinstance(dataset, anndata.abc.CSCDataset):
        msg = (
            f"{where} is a CSC matrix; the Loader reads rows and needs CSR. Rewrite the store "
            "with X as CSR (e.g. `adata.X = adata.X.tocsr()` before writing)."
        )
        raise UnsupportedDatasetError(msg)
    if isinstance(dataset, anndata.abc.CSRDataset):
        _check_h5_open(dataset.group, where)
        return CSRSource.from_anndata(dataset, verify_checksums=verify_checksums)
    if isinstance(dataset, sp.sparray | sp.spmatrix):
        if not isinstance(dataset, sp.csr_matrix | sp.csr_array):
            msg = f"{where} is a scipy.sparse matrix in {dataset.format.upper()} format; expected CSR (convert with `.tocsr()`)"
            raise UnsupportedDatasetError(msg)
        return CSRSource.from_scipy(dataset)
    if isinstance(dataset, zarr.Array | h5py.Dataset | np.ndarray):
        _check_h5_open(dataset, where)
        if dataset.ndim < 2:
            msg = f"{where} has shape {dataset.shape}; expected at least 2 dimensions (rows, columns, ...)"
            raise UnsupportedDatasetError(msg)
        return DenseSource(dataset, verify_checksums=verify_checksums)
    if isinstance(dataset, zarr.Group | h5py.Group):
        msg = (
            f"{where} is a {type(dataset).__name__}; if it holds a sparse matrix, open it with "
            "`anndata.io.sparse_dataset(group)` first"
        )
        raise UnsupportedDatasetError(msg)
    msg = f"{where} is a {type(dataset).__module__}.{type(dataset).__name__}; expected one of {ACCEPTED}"
    raise UnsupportedDatasetError(msg)
