"""CSR rows: matrices in anndata's on-disk CSR encoding (zarr or HDF5) and scipy CSR matrices.

The structure is checked (:mod:`annbatch._core.validate`): ``indptr`` once, in full, when it
is held in memory, or each window's pointers as they are read (:mod:`.indptr`); column indices
per window, while it is assembled.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import anndata.abc
import numpy as np
import scipy.sparse as sp

from annbatch._core.chunks import ChunkReader, direct_array, read_whole
from annbatch._core.chunks.stacked import StackedReader
from annbatch._core.failures import store_errors
from annbatch._core.members import get_member
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
from annbatch._core.sources.indptr import (
    HeldIndptr,
    StoredIndptr,
    piece_bounds,
    row_lengths,
    stacked_pieces,
)
from annbatch._core.types import ReadJob, csr_from_arrays, empty_window
from annbatch._core.validate import check_indices
from annbatch._narrow import declared_dtype
from annbatch.errors import CorruptDataError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from annbatch._core.sources import RowSource
    from annbatch._core.sources.indptr import Indptr
    from annbatch._core.sources.stack import CSRStack
    from annbatch._core.types import Allocate, Block


def _window_dtype(dtype: np.dtype, stored: Iterable[np.dtype], *, narrow: bool) -> np.dtype:
    """The dtype a window holds its values in: ``dtype`` (the yielded one), or with ``narrow``
    the common type of the ``stored`` dtypes of its datasets' values, where it casts to
    ``dtype`` safely (numpy's ``"safe"`` casting: the cast the decode made
    before, exact but for 64-bit integers to float64, which a packed layout never stores)."""
    if narrow:
        common = np.result_type(*stored)
        if np.can_cast(common, dtype, casting="safe"):
            return np.dtype(common)
    return np.dtype(dtype)


def _direct_pair(
    data: Any, indices: Any, *, verify_checksums: bool
) -> tuple[ChunkReader, ChunkReader] | None:
    direct_data = direct_array(data, verify_checksums=verify_checksums)
    direct_indices = direct_array(indices, verify_checksums=verify_checksums)
    if direct_data is None or direct_indices is None:
        return None
    return direct_data, direct_indices


class CSRSource:
    """CSR rows from anndata's on-disk CSR encoding (zarr or HDF5), or from a scipy CSR matrix.

    ``indptr`` is held in memory (8 bytes per row), or, where the chunk reader reads it in
    part, read per window (:mod:`annbatch._core.sources.indptr`): either way each row range
    maps to one contiguous slice of ``data`` and ``indices``.
    """

    is_sparse = True

    def __init__(
        self,
        data: Any,
        indices: Any,
        indptr: np.ndarray | Indptr,
        shape: tuple[int, int],
        dataset_type: type,
        container: Any = None,
        *,
        verify_checksums: bool = False,
        values_dtype: np.dtype | None = None,
    ) -> None:
        self._data = data
        self._indices = indices
        self._shape = shape
        self._type = dataset_type
        self._container = container
        self._indptr = self._checked_indptr(indptr)
        stored = np.dtype(indices.dtype)  # (zarr's Array.dtype costs ~4 us: not per window)
        self._index_dtype = np.dtype(
            np.int64 if stored.itemsize >= 4 and stored != np.int32 else np.int32
        )
        self._dtype = np.dtype(data.dtype) if values_dtype is None else np.dtype(values_dtype)
        self._direct = _direct_pair(data, indices, verify_checksums=verify_checksums)
        # All of a Loader's CSR datasets (sources.stack) and this one's place in it.
        self._place: tuple[CSRStack, int] | None = None

    def _checked_indptr(self, indptr: np.ndarray | Indptr) -> Indptr:
        """``indptr`` (held as int64, or read per window), after checking the structure
        around it (see :mod:`annbatch._core.validate`)."""
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
        if isinstance(indptr, StoredIndptr):
            return indptr
        return HeldIndptr(
            np.asarray(indptr),
            n_obs=self._shape[0],
            nnz=nnz,
            exact=not isinstance(self._data, np.ndarray),
            where=where,
        )

    @classmethod
    def from_anndata(
        cls,
        dataset: anndata.abc.CSRDataset,
        *,
        verify_checksums: bool = False,
        stored_dtype: bool = False,
    ) -> CSRSource:
        """A source over an anndata CSR dataset. Values narrowed by a packed collection
        layout (:mod:`annbatch._narrow`) are widened to the dtype they had, unless
        ``stored_dtype``."""
        group = dataset.group
        where = f"anndata.abc.CSRDataset ({describe_array(group)})"  # as describe() names it
        found = {k: get_member(group, k) for k in ("data", "indices", "indptr")}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            msg = (
                f"{where} has no {', '.join(missing)}; it is not a CSR matrix in anndata's encoding"
            )
            raise CorruptDataError(msg)
        with store_errors(lambda: f"reading indptr of {where}"):
            data, indices = found["data"], found["indices"]
            shape = tuple(int(n) for n in dataset.shape)
            declared = declared_dtype(group.attrs, np.dtype(data.dtype), where)
            stored = direct_array(found["indptr"], verify_checksums=verify_checksums)
            indptr: np.ndarray | Indptr
            if StoredIndptr.usable(stored) and _direct_pair(
                data, indices, verify_checksums=verify_checksums
            ):
                assert stored is not None
                nnz = min(int(data.shape[0]), int(indices.shape[0]))
                indptr = StoredIndptr(stored, n_obs=shape[0], nnz=nnz, where=where)
            else:
                indptr = read_whole(found["indptr"])
        return cls(
            data,
            indices,
            indptr,
            shape,  # type: ignore[arg-type]
            anndata.abc.CSRDataset,
            container=group,
            verify_checksums=verify_checksums,
            values_dtype=None if stored_dtype else declared,
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
        """The dtype rows are yielded in (stored values are cast to it, exactly)."""
        return self._dtype

    @property
    def dataset_type(self) -> type:
        return self._type

    @property
    def reads_chunks_once(self) -> bool:
        return self._direct is not None

    def pointers(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """The row pointers of rows ``starts[i]:stops[i]`` (see
        :meth:`~annbatch._core.sources.indptr.Indptr.pieces`)."""
        return self._indptr.pieces(starts, stops)

    def nnz_of(self, starts: np.ndarray, stops: np.ndarray, pieces: np.ndarray) -> int:
        """Stored entries in rows ``starts[i]:stops[i]``, all ranges together, from their
        :meth:`pointers` ``pieces``."""
        first, last = piece_bounds(starts, stops)
        return int(np.sum(pieces[last] - pieces[first]))

    @property
    def index_dtype(self) -> np.dtype:
        """Dtype of the yielded column indices: int32 for stored types of up to 4 bytes
        (a packed layout stores uint16), else int64 (scipy's index types)."""
        return self._index_dtype

    def read_job(self, starts: np.ndarray, stops: np.ndarray, n_tasks: int) -> ReadJob:
        """See :meth:`RowSource.read_job`."""
        if self._direct is None:
            return per_range_job(self.read, starts, stops)
        return self._direct_job(starts, stops, n_tasks, empty_window)

    def window_job(
        self,
        parts: Sequence[tuple[RowSource, np.ndarray, np.ndarray]],
        n_tasks: int,
        allocate: Allocate = empty_window,
        *,
        narrow: bool = False,
    ) -> ReadJob:
        """See :meth:`RowSource.window_job`. When every part is read chunk by chunk, all of
        them decode into one set of window arrays from ``allocate``: the window is one block,
        never concatenated (which, single-threaded, cost as much as a third of a window's time
        over two datasets). With ``narrow``, the stacked datasets' values stay in their
        stored dtype (a packed collection's uint8 or uint16 counts), which the batches are
        cast from as they are cut: a quarter of the window's memory for uint8, and a cast of
        each batch rather than of the whole window."""
        csr = [
            (source, starts, stops)
            for source, starts, stops in parts
            if isinstance(source, CSRSource)
            and source.reads_chunks_once
            and source.dtype == self.dtype  # promoted after reading (reader.run_job)
        ]
        if len(csr) != len(parts):
            return block_per_part(parts, n_tasks)
        places = [s._place for s, _, _ in csr]  # each read once: link() may replace them
        stacks = None
        first = places[0]
        if first is not None and all(p is not None and p[0] is first[0] for p in places):
            stacks = first[0].stacks()  # the arrays of all the Loader's datasets, stacked once
        stored = [s._indptr for s, _, _ in csr]
        ranges = [(a, b) for _, a, b in csr]
        members = [p[1] for p in places] if stacks is not None else []  # type: ignore[index]
        if stacks is not None and stacks.indptr is not None:
            pointers = stacks.indptr.pieces(members, ranges)
        elif all(isinstance(p, StoredIndptr) for p in stored):  # one read for every dataset
            pointers = stacked_pieces(stored, ranges)  # type: ignore[arg-type]
        else:
            pointers = [s.pointers(starts, stops) for s, starts, stops in csr]
        if stacks is not None:
            placed = (stacks.data, stacks.indices, np.array(members, dtype=np.int64))
            stacked = self._stacked_job(csr, pointers, n_tasks, allocate, placed, narrow=narrow)
            if stacked is not None:
                return stacked
        elif len(csr) > 1:
            stacked = self._stacked_job(csr, pointers, n_tasks, allocate, narrow=narrow)
            if stacked is not None:
                return stacked
        sizes = [
            s.nnz_of(starts, stops, p) for (s, starts, stops), p in zip(csr, pointers, strict=True)
        ]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        nnz = (int(offsets[-1]),)
        data = allocate(
            "data",
            nnz,
            _window_dtype(  # (every part reads chunks once: each has its direct pair)
                self.dtype,
                [s._direct[0].dtype for s, _, _ in csr if s._direct is not None],
                narrow=narrow,
            ),
        )
        indices = allocate("indices", nnz, np.result_type(*(s.index_dtype for s, _, _ in csr)))
        # The window's tasks are shared among its datasets by their entries: a window spread
        # over many datasets makes no more tasks (each a future and a Python call) than one.
        total = max(1, int(offsets[-1]))
        jobs = [
            source._direct_job(
                starts,
                stops,
                max(2, round(n_tasks * (b - a) / total)),
                empty_window,
                out=(data[a:b], indices[a:b]),
                pieces=p,
            )
            for (source, starts, stops), a, b, p in zip(
                csr, offsets[:-1], offsets[1:], pointers, strict=True
            )
        ]

        def result() -> list[Block]:
            # Views of data and indices, each from entry 0 of its part.
            blocks: list[sp.csr_matrix] = [job.result()[0] for job in jobs]
            indptr = np.concatenate(
                [
                    [0],
                    *(
                        b.indptr[1:].astype(np.int64) + o
                        for b, o in zip(blocks, offsets[:-1], strict=True)
                    ),
                ]
            )
            n_rows = sum(b.shape[0] for b in blocks)
            return [csr_from_arrays(data, indices, indptr, (n_rows, self._shape[1]))]

        return ReadJob([task for job in jobs for task in job.tasks], result)

    def _stacked_job(
        self,
        csr: Sequence[tuple[CSRSource, np.ndarray, np.ndarray]],
        pointers: Sequence[np.ndarray],
        n_tasks: int,
        allocate: Allocate,
        placed: tuple[StackedReader, StackedReader, np.ndarray] | None = None,
        *,
        narrow: bool = False,
    ) -> ReadJob | None:
        """The window's rows of every dataset, read as one (:mod:`annbatch._core.chunks.stacked`):
        one plan and one set of tasks for the values and one for the column indices, however
        many datasets the rows come from. ``placed``: the stacks of the values and column
        indices of all the Loader's datasets (:mod:`annbatch._core.sources.stack`) and each
        part's dataset in them; without it, the parts' own arrays are stacked for this window.
        None where the datasets' arrays cannot be stacked (other layouts, object storage) or a
        part's ranges are not sorted. ``narrow``: the values in their stored dtype where it
        casts safely to the yielded one (see :meth:`window_job`)."""
        sources = [s for s, _, _ in csr]
        if placed is None:
            direct = [s._direct for s in sources]
            if any(d is None for d in direct):
                return None
            data_stack = StackedReader.of([d[0] for d in direct if d is not None])
            index_stack = StackedReader.of([d[1] for d in direct if d is not None])
            if data_stack is None or index_stack is None:
                return None
            # Stacks of this window only: their chunks are located one by one (a table of
            # each window's datasets would be made again for nearly every window).
            data_stack.chunk_table = index_stack.chunk_table = False
            members = np.arange(len(csr))
        else:
            data_stack, index_stack, members = placed
        # Every dataset's ranges at once: their pointers one after another.
        flat = np.concatenate(pointers)
        starts = np.concatenate([a for _, a, _ in csr])
        stops = np.concatenate([b for _, _, b in csr])
        first, last = piece_bounds(starts, stops)
        lo, hi = flat[first], flat[last]
        lengths = row_lengths(flat, starts, stops)
        ranges = np.cumsum([0] + [a.size for _, a, _ in csr])  # each dataset's first range
        offsets = np.concatenate([[0], np.cumsum(hi - lo)])[ranges]  # and its first entry
        nnz = int(offsets[-1])
        owner = np.repeat(members, np.diff(ranges))  # each range's dataset in the stacks
        data_lo = lo + data_stack.bases[owner]
        # Ranges must be sorted in the stack: datasets in order, each one's ranges sorted.
        if data_lo.size > 1 and bool(np.any(np.diff(data_lo) < 0)):
            return None
        data_hi = hi + data_stack.bases[owner]
        data = allocate(
            "data", (nnz,), _window_dtype(self.dtype, [data_stack.dtype], narrow=narrow)
        )
        indices = allocate("indices", (nnz,), np.result_type(*(s.index_dtype for s in sources)))
        index_lo = lo + index_stack.bases[owner]
        index_hi = hi + index_stack.bases[owner]
        n_var = self._shape[1]
        base = indices.__array_interface__["data"][0]

        def check(part: np.ndarray) -> None:
            # Column indices are range-checked by the read threads, as each task decodes them;
            # a failure names the dataset the entry belongs to.
            try:
                check_indices(part, n_var=n_var, where="")
            except CorruptDataError:
                at = (part.__array_interface__["data"][0] - base) // part.itemsize
                while part.size:  # the part's pieces of each dataset, in order
                    k = int(np.searchsorted(offsets, at, side="right")) - 1
                    end = min(int(offsets[k + 1]) - at, part.size)
                    source, starts, stops = csr[k]
                    check_indices(part[:end], n_var=n_var, where=source._rows_read(starts, stops))
                    part, at = part[end:], at + end
                raise

        return self._job(
            (data_stack, data_lo, data_hi, data),
            (index_stack, index_lo, index_hi, indices),
            lengths,
            n_tasks,
            check,
        )

    def _direct_job(
        self,
        starts: np.ndarray,
        stops: np.ndarray,
        n_tasks: int,
        allocate: Allocate,
        out: tuple[np.ndarray, np.ndarray] | None = None,
        pieces: np.ndarray | None = None,
    ) -> ReadJob:
        """Rows read by the chunk reader into ``out`` (data, indices) of :meth:`nnz_of`
        entries, or into arrays from ``allocate`` (``pieces``: the rows' :meth:`pointers`,
        read if not given)."""
        assert self._direct is not None
        pieces = self.pointers(starts, stops) if pieces is None else pieces
        first, last = piece_bounds(starts, stops)
        lo, hi = pieces[first], pieces[last]
        nnz = int(np.sum(hi - lo))
        if out is None:
            data = allocate("data", (nnz,), self.dtype)
            indices = allocate("indices", (nnz,), self.index_dtype)
        else:
            data, indices = out
        direct_data, direct_indices = self._direct
        # Column indices are range-checked by the read threads, as each task decodes them.
        check = partial(check_indices, n_var=self._shape[1], where=self._rows_read(starts, stops))
        return self._job(
            (direct_data, lo, hi, data),
            (direct_indices, lo, hi, indices),
            row_lengths(pieces, starts, stops),
            n_tasks,
            check,
        )

    def _job(
        self,
        values: tuple[ChunkReader, np.ndarray, np.ndarray, np.ndarray],
        columns: tuple[ChunkReader, np.ndarray, np.ndarray, np.ndarray],
        lengths: np.ndarray,
        n_tasks: int,
        check: Callable[[np.ndarray], None],
    ) -> ReadJob:
        """The tasks that read entries ``lo:hi`` of the values and of the column indices
        (each: reader, lo, hi, output; the column indices checked by ``check`` as they are
        decoded), and the CSR block of rows of ``lengths`` entries they make."""
        half = max(1, n_tasks // 2)
        reader, lo, hi, data = values
        tasks = reader.tasks(lo, hi, data, half)
        reader, lo, hi, indices = columns
        tasks += reader.tasks(lo, hi, indices, half, check=check)
        indptr = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        shape = (lengths.size, self._shape[1])

        def result() -> list[Block]:
            return [csr_from_arrays(data, indices, indptr, shape)]

        return ReadJob(tasks, result)

    def _rows_read(self, starts: np.ndarray, stops: np.ndarray) -> str:
        """The rows of a read, as named in errors."""
        span = f"rows {int(starts[0])}:{int(stops[-1])}" if len(starts) else "no rows"
        return f"{self.describe()}, {span}"

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        pieces = self.pointers(np.array([start]), np.array([stop]))
        lo, hi = int(pieces[0]), int(pieces[-1])
        in_memory = isinstance(self._data, np.ndarray)  # see DenseSource.read
        with read_errors(self, f"rows {start}:{stop} (entries {lo}:{hi})"):
            data = owned(self._data[lo:hi], in_memory=in_memory).astype(self.dtype, copy=False)
            indices = owned(self._indices[lo:hi], in_memory=in_memory).astype(
                self.index_dtype, copy=False
            )
        if data.shape != (hi - lo,) or indices.shape != (hi - lo,):
            msg = (
                f"{self.describe()}, rows {start}:{stop}: read {data.size} values and "
                f"{indices.size} column indices where indptr says {hi - lo}; the store is damaged"
            )
            raise CorruptDataError(msg)
        check_indices(
            indices, n_var=self._shape[1], where=f"{self.describe()}, rows {start}:{stop}"
        )
        indptr = pieces - lo
        return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self._shape[1]))

    def check_open(self) -> None:
        check_h5_open(self._container, self.describe())
        check_h5_open(self._data, self.describe())

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        ends = self.pointers(np.array([row_a + 1, row_b]), np.array([row_a + 1, row_b]))
        last_a, first_b = int(ends[0]) - 1, int(ends[1])
        for array in (self._data, self._indices):
            elems = chunk_len(array)
            if elems is None or last_a // elems != first_b // elems:
                return False
        return True

    def describe(self) -> str:
        if self._type is anndata.abc.CSRDataset:
            return f"anndata.abc.CSRDataset ({describe_array(self._container)})"
        return f"scipy.sparse.{self._type.__name__}"

    def __getstate__(self) -> dict[str, Any]:
        state = {
            "data": self._data,
            "indices": self._indices,
            "container": self._container,
        }
        state = {k: h5_state(v) for k, v in state.items()}
        return {
            **state,
            "indptr": self._indptr,
            "shape": self._shape,
            "dtype": self._dtype,
            "index_dtype": self._index_dtype,
            "type": self._type,
            "direct": self._direct,
        }  # not the stack: the receiving process links its sources again (sources.stack)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._data = h5_restore(state["data"])
        self._indices = h5_restore(state["indices"])
        self._container = h5_restore(state["container"])
        self._indptr = state["indptr"]
        self._shape = state["shape"]
        self._dtype = state["dtype"]
        self._index_dtype = state["index_dtype"]
        self._type = state["type"]
        self._direct = state["direct"]
        self._place = None
