"""Batch memory: lent to the user with each batch, taken back once the user lets go of it.

A batch is the user's to keep, so it cannot be cut into memory the Loader reuses on a
schedule of its own. But a training loop drops each batch a step later, and a new batch of the
same size follows. Batches of more than a few MiB are fresh memory from the kernel every
time (glibc and numpy map them anew: page faults, the kernel zeroing pages, on our virtual
machines huge-page compaction), which measured as most of what densifying a batch costs and as
the gap between a fresh process' first epoch and its later ones.

:class:`BatchMemory` hands out arrays whose numpy ``base`` is a :class:`_Lent` block: every
view, tensor (``torch.from_numpy``), sparse matrix or DLPack export of a batch keeps its
block alive through the ordinary reference chain, and only when the last of them is gone does
the block's finalizer give its memory back for a later batch of about the same size. Nothing
is reused while anything can still reach it; a user who keeps every batch simply gets new
memory each time.

Memory kept (lent and idle together) is bounded by 1.5 times the most the batches of this
Loader held at once over its last :data:`RECENT` lends (memory the process used anyway): after a burst of
batches held together (``list(loader)``), later batches let the excess go. Idle memory is held
until then or until the Loader is garbage collected, and dropped in a forked child. The finalizer takes no lock: it queues the block, and the next batch counts it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import defaultdict, deque
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._core.buffers import anonymous, empty_in_forked_children
from annbatch._core.chunks.pieces import thread_scratch
from annbatch._core.types import cast, csr_from_arrays

if TYPE_CHECKING:
    from collections.abc import Callable

    import scipy.sparse as sp

try:  # scipy's C++ row gather (what ``csr[rows]`` runs), into arrays of ours
    from scipy.sparse._sparsetools import csr_row_index as _csr_row_index
except ImportError:  # pragma: no cover - a scipy that moved it: batches are scipy's own copies
    _csr_row_index = None

SMALLEST = 1 << 20
"""Blocks of fewer bytes are not lent: small allocations are cheap and malloc reuses them."""

_STEPS = 8  # size classes per doubling: a block is at most 1/8 larger than asked

RECENT = 1024
"""Lends over which the peak of bytes lent at once bounds the memory kept (lent and idle):
more than a window's batches (each lends its values and its column indices), so that the
previous window's peak still counts when the next window is cut."""


def size_class(nbytes: int) -> int:
    """The block size lent for ``nbytes``: rounded up to one of :data:`_STEPS` sizes per
    power of two, so that batches of slightly different sizes share blocks."""
    nbytes = int(nbytes)
    if nbytes <= _STEPS:
        return _STEPS
    step = 1 << max(0, nbytes.bit_length() - 1 - int(math.log2(_STEPS)))
    return -(-nbytes // step) * step


class _Lent:
    """One block of memory lent out: the numpy ``base`` of the arrays over it (through
    ``__array_interface__``), giving the block back when the last of them is gone."""

    __slots__ = ("__array_interface__", "_block", "_give_back")

    def __init__(
        self,
        block: np.ndarray,
        shape: tuple[int, ...],
        dtype: np.dtype,
        give_back: Callable[[np.ndarray], None],
    ) -> None:
        self._block = block
        self._give_back = give_back
        self.__array_interface__ = {
            "data": (block.ctypes.data, False),
            "shape": shape,
            "typestr": dtype.str,
            "descr": dtype.descr,
            "version": 3,
        }

    def __reduce__(self) -> Any:
        # A copy would be a second owner of the block, giving it back while arrays over it
        # live: arrays are copied through numpy, never through their base.
        msg = "lent batch memory cannot be copied or pickled; copy the array instead"
        raise TypeError(msg)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown: nothing to give to
            self._give_back(self._block)


class BatchMemory:
    """Memory for the batches of one Loader, lent out and taken back (see the module
    docstring). Thread-safe; the finalizers that give memory back may run on any thread.

    Parameters
    ----------
    smallest
        Arrays of fewer bytes are ordinary numpy memory (default :data:`SMALLEST`).
    """

    def __init__(self, smallest: int | None = None) -> None:
        self._smallest = SMALLEST if smallest is None else smallest
        self._lock = threading.Lock()
        self._free: defaultdict[int, list[np.ndarray]] = defaultdict(list)
        # Blocks given back by finalizers, counted at the next use (see _take_back).
        self._returned: deque[np.ndarray] = deque()
        self._idle = 0  # bytes in free blocks
        self._lent = 0  # bytes lent out now
        # Bytes lent out just after each of the last lends: lent + idle stays within their
        # peak, so a burst of batches held at once (list(loader)) is let go of again.
        self._recent: deque[int] = deque(maxlen=RECENT)
        empty_in_forked_children(self)

    @property
    def idle_bytes(self) -> int:
        """Bytes held in free blocks."""
        with self._lock:
            self._drain()
            return self._idle

    def empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array, in lent memory if it is large enough."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self._smallest or dtype.hasobject:
            return np.empty(shape, dtype=dtype)
        size = size_class(nbytes)
        block = None
        with self._lock:
            self._drain()
            for fits in (size, size_class(size + 1)):  # the next class up wastes <= 1/4
                free = self._free.get(fits)
                if free:
                    block = free.pop()
                    self._idle -= fits
                    size = fits
                    break
            self._lent += size
            self._recent.append(self._lent)
        if block is None:
            block = anonymous(size)[:size]
        if block.nbytes < nbytes:  # never: a class holds blocks of its size only
            msg = f"lent block of {block.nbytes} bytes for an array of {nbytes}"
            raise AssertionError(msg)
        return np.asarray(_Lent(block, shape, dtype, self._take_back))

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """:meth:`empty`, zero-filled."""
        out = self.empty(shape, dtype)
        out.fill(0)
        return out

    def clear(self) -> None:
        """Drop every free block (their memory goes back to the kernel)."""
        with self._lock:
            self._drain()
            self._free.clear()
            self._idle = 0

    def _take_back(self, block: np.ndarray) -> None:
        # A finalizer, on whichever thread drops the last reference (the garbage collector
        # may run it on a thread that holds the lock): it takes no lock, it only queues the
        # block (deque.append is atomic); the next use counts and keeps it.
        self._returned.append(block)

    def _drain(self) -> None:
        """Count the blocks given back and keep them, within the bound: lent and idle bytes
        together at most 1.5 times the peak of bytes lent over the last :data:`RECENT` lends
        (free blocks beyond it dropped, the largest first); the lock held."""
        if not self._returned:  # idle memory grows only here: nothing to trim otherwise
            return
        while self._returned:
            block = self._returned.popleft()
            size = block.nbytes
            self._lent = max(0, self._lent - size)
            self._free[size].append(block)
            self._idle += size
        # Half again as much: batches of the next window may need blocks of other sizes
        # than those free (with the peak alone, 6 of an epoch's 98 lends were new memory).
        room = max(self._recent, default=0) * 3 // 2 - self._lent
        if self._idle <= room:
            return
        for size in sorted(self._free, reverse=True):
            blocks = self._free[size]
            while blocks and self._idle > room:
                blocks.pop()
                self._idle -= size

    def _after_fork(self) -> None:
        # The parent's lock may have been held by one of its threads at the fork; blocks
        # lent in the parent are not this process' to count.
        self._lock = threading.Lock()
        self._free = defaultdict(list)
        self._returned = deque()
        self._recent = deque(maxlen=RECENT)
        self._idle = self._lent = 0

    def __getstate__(self) -> dict[str, object]:
        # A copy of a Loader (pickled to a DataLoader worker) starts with nothing lent.
        return {"_smallest": self._smallest}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(int(state["_smallest"]))  # type: ignore[misc,call-overload]


def csr_rows(
    matrix: sp.csr_matrix,
    positions: np.ndarray,
    memory: BatchMemory,
    dtype: np.dtype | None = None,
) -> sp.csr_matrix:
    """Rows ``positions`` of ``matrix`` (any order, repeats allowed), their values and column
    indices in memory lent by ``memory``: what ``matrix[positions]`` gives, by the same C++
    row gather, index dtype included (int32 wherever the batch's entries and columns fit,
    as scipy chooses, whatever the window's). ``dtype``: the values cast to it (None: the
    matrix's), gathered first in their own dtype (the gather takes one dtype)."""
    if _csr_row_index is None:
        return cast(matrix[positions], dtype)
    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    gather_dtype = np.promote_types(indptr.dtype, indices.dtype)  # one type for the gather
    if indptr.dtype != gather_dtype:
        indptr = indptr.astype(gather_dtype)
    if indices.dtype != gather_dtype:
        indices = indices.astype(gather_dtype)
    rows = np.asarray(positions, dtype=gather_dtype)
    lengths = indptr[rows + 1] - indptr[rows]
    nnz = int(lengths.sum())
    fits = max(nnz, matrix.shape[1]) <= np.iinfo(np.int32).max
    out_dtype = np.dtype(np.int32) if fits else gather_dtype
    out_indptr = np.empty(rows.size + 1, dtype=out_dtype)
    out_indptr[0] = 0
    np.cumsum(lengths, out=out_indptr[1:])
    out_data = memory.empty((nnz,), data.dtype if dtype is None else dtype)
    values = out_data  # or a narrow window's values, gathered in this thread's scratch first
    if out_data.dtype != data.dtype:
        values = thread_scratch(nnz * data.itemsize).view(data.dtype)
    out_indices = memory.empty((nnz,), out_dtype)
    gathered = out_indices if out_dtype == gather_dtype else np.empty(nnz, dtype=gather_dtype)
    if rows.size:
        _csr_row_index(rows.size, rows, indptr, indices, data, gathered, values)
    if values is not out_data:  # cast once gathered
        out_data[:] = values
    if gathered is not out_indices:  # int64 window, int32 batch: narrowed once, exactly
        out_indices[:] = gathered
    return csr_from_arrays(out_data, out_indices, out_indptr, (rows.size, matrix.shape[1]))


def dense_rows(block: np.ndarray, positions: np.ndarray, memory: BatchMemory) -> np.ndarray:
    """Rows ``positions`` of a dense block, copied into memory lent by ``memory``."""
    out = memory.empty((positions.size, *block.shape[1:]), block.dtype)
    np.take(block, positions, axis=0, out=out)
    return out
