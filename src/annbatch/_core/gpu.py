"""The GPU stage (``preload_to_gpu=True``): a window read on the host is moved to the GPU once,
and every batch is cut from it there with CuPy.

Flow of one window:

1. The reader fills the window's host buffers (decoding releases the GIL, as on the CPU path).
   Our own chunk reader decodes straight into page-locked (pinned) staging buffers
   (:meth:`CopyStream.allocate`); other sources fill ordinary memory.
2. :func:`to_device`, on the read-ahead thread, copies what is not pinned yet into the pinned
   buffers, and from there to the GPU on a CUDA stream of its own, and waits for the copy
   before it hands the window over: the next window's copy overlaps the current window's
   batches. The pinned buffers are reused from window to window, and go back to CuPy's
   pinned memory pool at the end of an iteration, where the next epoch finds them
   (``cupy.get_default_pinned_memory_pool().free_all_blocks()`` returns them to the driver).
3. The consumer cuts each batch from the device window when it asks for it
   (:func:`take_rows`): fancy indexing on the GPU, or a view when the rows are consecutive.
4. When a window is used up, the consumer waits for the kernels that read it and returns the
   free blocks of CuPy's default memory pool to the driver (:func:`release`), so the pool never
   holds more than about one window beyond what the caller keeps.

Sparse data
    ``cupyx.scipy.sparse.csr_matrix`` holds only float32, float64, complex64 and complex128
    values (and bool). Other value types are converted on the GPU, after the copy, to the
    smallest float type that holds every value of the type exactly: integers of up to 16 bits
    and float16 to float32, wider integers to float64 (exact up to 2**53). See
    :func:`device_sparse_dtype`. Dense arrays keep their dtype.

CuPy is imported by the functions here when they first run, which only happens with
``preload_to_gpu=True``: ``import annbatch`` and every CPU path work without CUDA or CuPy.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._compat import import_optional
from annbatch._core.assembler import as_slice
from annbatch._core.convert import OutputKind, csr_tensor
from annbatch._core.types import canonical_csr
from annbatch.errors import CuPyMissingError, GPUUnavailableError, UnsupportedDatasetError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from concurrent.futures import Executor

    from annbatch._core.types import Block, Role

_SPARSE_DTYPES = frozenset(
    np.dtype(t) for t in ("bool", "float32", "float64", "complex64", "complex128")
)


def cupy() -> Any:
    """CuPy, or a :class:`~annbatch.errors.GPUUnavailableError` that says how to install it."""
    try:
        return import_optional("cupy", purpose="preload_to_gpu=True", extra="gpu")
    except ImportError as e:
        msg = f"{e} Pick the CuPy wheel that matches your CUDA (cupy-cuda12x, cupy-cuda13x)."
        raise CuPyMissingError(msg) from e


def check_available() -> None:
    """Raise before any read if CuPy or a CUDA device is missing."""
    cp = cupy()
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken: CuPy raises its own runtime errors
        msg = f"preload_to_gpu=True needs a CUDA device, but CuPy could not reach one: {e}"
        raise GPUUnavailableError(msg) from e
    if count == 0:
        msg = "preload_to_gpu=True needs a CUDA device, and none is visible"
        raise GPUUnavailableError(msg)


def current_device() -> int:
    """The calling thread's current CUDA device (under DDP, the rank's own)."""
    return int(cupy().cuda.runtime.getDevice())


def use_device(device: int) -> None:
    """Make ``device`` the calling thread's current CUDA device.

    The current device is per thread: a thread the Loader starts (read-ahead, read threads)
    would otherwise work on device 0, whatever device the consumer chose.
    """
    cupy().cuda.Device(device).use()


def device_sparse_dtype(dtype: np.dtype) -> np.dtype:
    """The value dtype a sparse window of ``dtype`` gets on the GPU (see the module docstring)."""
    dtype = np.dtype(dtype)
    if dtype in _SPARSE_DTYPES:
        return dtype
    if (dtype.kind in "iu" and dtype.itemsize <= 2) or dtype == np.float16:
        return np.dtype(np.float32)
    if dtype.kind in "iuf":
        return np.dtype(np.float64)
    msg = f"sparse values of dtype {dtype} cannot be put on the GPU (CuPy's sparse matrices hold floats and complex values)"
    raise UnsupportedDatasetError(msg)


class CopyStream:
    """A non-blocking CUDA stream for host-to-device copies through pinned host memory.

    The pinned staging buffers are kept and reused from window to window (page-locking
    memory is slow: allocating them per window measured as the GPU path's main cost), and
    they are filled by the read threads in parallel. Use it from one thread (the one that
    reads windows); :meth:`close` frees the staging buffers.

    Parameters
    ----------
    executor, threads
        Where to fill the staging buffers, and in how many pieces.
    """

    def __init__(self, executor: Executor | None = None, threads: int = 1) -> None:
        self._cp = cupy()
        self.stream = self._cp.cuda.Stream(non_blocking=True)
        self._executor = executor
        self._threads = threads
        self._staging: list[np.ndarray] = []

    def allocate(self, role: Role, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Where the reader puts a window (see :data:`annbatch._core.types.Allocate`): the
        pinned staging buffer that :meth:`upload` copies that part from, so that the window
        is decoded straight into pinned memory and never copied on the host.

        Indices that the GPU takes in another dtype (not int32) get ordinary memory: they
        are converted while staged.
        """
        if role == "indices" and np.dtype(dtype) != np.int32:
            return np.empty(shape, dtype=dtype)
        return self._stage(1 if role == "indices" else 0, shape, np.dtype(dtype))

    def _stage(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A pinned array of ``shape`` over staging buffer ``slot``, grown when too small."""
        import cupyx

        nbytes = int(np.prod(shape)) * dtype.itemsize
        while len(self._staging) <= slot:
            self._staging.append(np.empty(0, dtype=np.uint8))
        if self._staging[slot].size < nbytes:
            self._staging[slot] = np.empty(0, dtype=np.uint8)  # free the old one first
            self._staging[slot] = cupyx.empty_pinned(nbytes + nbytes // 4, dtype=np.uint8)
        return self._staging[slot][:nbytes].view(dtype).reshape(shape)

    def upload(
        self, parts: Sequence[Sequence[np.ndarray]], dtypes: Sequence[np.dtype]
    ) -> list[Any]:
        """Device arrays, the ``i``-th holding the arrays ``parts[i]`` one after another along
        axis 0, as ``dtypes[i]``.

        Each part is written once, into a pinned buffer (the only host copy: concatenating and
        staging are one step), and copied to the GPU on :attr:`stream`; a part that was read
        into that buffer (:meth:`allocate`) is not copied on the host at all. All copies are
        done when this returns.
        """
        cp = self._cp
        staged, copies = [], []
        for slot, (pieces, dtype) in enumerate(zip(parts, dtypes, strict=True)):
            rows = sum(p.shape[0] for p in pieces)
            pinned = self._stage(slot, (rows, *pieces[0].shape[1:]), np.dtype(dtype))
            staged.append(pinned)
            if len(pieces) == 1 and _same_memory(pieces[0], pinned):
                continue  # read straight into the staging buffer
            at = 0
            for piece in pieces:
                copies.extend(_split_copy(pinned[at : at + piece.shape[0]], piece, self._threads))
                at += piece.shape[0]
        if self._executor is None or len(copies) < 2:
            for copy in copies:
                copy()
        else:
            list(self._executor.map(lambda copy: copy(), copies))
        out = []
        for pinned in staged:
            with self.stream:
                device = cp.empty(pinned.shape, dtype=pinned.dtype)
            device.set(pinned, stream=self.stream)
            out.append(device)
        self.stream.synchronize()  # the staging buffers are free for the next window
        return out

    def close(self) -> None:
        """Give the staging buffers back to CuPy's pinned memory pool, where the next epoch's
        :class:`CopyStream` finds them: page-locking them again cost every epoch a fifth of a
        second at 50,000 rows."""
        self._staging = []


_COPY_MIN_BYTES = 1 << 22  # below this, one thread copies a piece


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` is exactly the array ``b``: same start, dtype and shape."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.ctypes.data == b.ctypes.data
        and a.flags.c_contiguous
    )


def _split_copy(dest: np.ndarray, src: np.ndarray, pieces: int) -> list[Callable[[], None]]:
    """Tasks that copy ``src`` into ``dest`` (numpy releases the GIL while copying)."""
    n = max(1, min(pieces, src.nbytes // _COPY_MIN_BYTES, src.shape[0]))
    bounds = np.linspace(0, src.shape[0], n + 1).astype(int).tolist()

    def copy(a: int, b: int) -> Callable[[], None]:
        return lambda: np.copyto(dest[a:b], src[a:b], casting="unsafe")

    return [copy(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def to_device(blocks: Sequence[Block], copier: CopyStream) -> Any:
    """One device block holding ``blocks`` one after another (dense: a CuPy array; sparse: a
    ``cupyx.scipy.sparse.csr_matrix``). The copy is complete when this returns."""
    first = blocks[0]
    if isinstance(first, np.ndarray):
        (device,) = copier.upload([blocks], [first.dtype])
        return device
    import cupyx.scipy.sparse as cusp

    csrs = [canonical_csr(b) for b in blocks]
    nnz = sum(b.nnz for b in csrs)
    if nnz >= 2**31:
        msg = (
            f"a sparse window of {nnz} stored values is too large for CuPy's int32 indices; "
            "use a smaller chunk_size * preload_nchunks"
        )
        raise UnsupportedDatasetError(msg)
    offsets = np.cumsum([0] + [b.nnz for b in csrs])
    indptr = [np.zeros(1, dtype=np.int32)] + [
        (b.indptr[1:] + o).astype(np.int32, copy=False)
        for b, o in zip(csrs, offsets[:-1], strict=True)
    ]
    data, indices, indptr_d = copier.upload(
        [[b.data for b in csrs], [b.indices for b in csrs], indptr],
        [first.dtype, np.dtype(np.int32), np.dtype(np.int32)],
    )
    target = device_sparse_dtype(first.dtype)
    n_rows = sum(b.shape[0] for b in csrs)
    # Kernels on the copy stream, finished before the window is handed over: memory this
    # stream frees may be reused by its next window, so nothing else may still be reading it.
    with copier.stream:
        if data.dtype != target:
            data = data.astype(target)
        matrix = cusp.csr_matrix(
            (data, indices, indptr_d), shape=(n_rows, first.shape[1]), copy=False
        )
    copier.stream.synchronize()
    return matrix


def take_rows(block: Any, positions: np.ndarray) -> Any:
    """Rows ``positions`` of a device block: a slice (a view, for dense) when they are
    consecutive, otherwise a gather on the GPU."""
    consecutive = as_slice(positions)
    if consecutive is not None:
        return block[consecutive]
    return block[cupy().asarray(positions)]


def to_torch(block: Any) -> Any:
    """A torch CUDA tensor sharing memory with a CuPy array or CSR matrix (through DLPack)."""
    torch = import_optional("torch", purpose="preload_to_gpu=True with to='torch'", extra="torch")
    if not hasattr(block, "indptr"):
        return torch.from_dlpack(block)
    return csr_tensor(
        torch,
        torch.from_dlpack(block.indptr),
        torch.from_dlpack(block.indices),
        torch.from_dlpack(block.data),
        block.shape,
    )


def convert(block: Any, kind: OutputKind) -> Any:
    """One device batch as the output kind: CuPy as it is, or a torch CUDA tensor."""
    assert kind != "jax", "the Loader refuses to='jax' with preload_to_gpu"
    return to_torch(block) if kind == "torch" else block


def release() -> None:
    """Wait for the kernels queued on this thread's stream, then return every free block of
    CuPy's default memory pool to the driver."""
    cp = cupy()
    cp.cuda.get_current_stream().synchronize()
    cp.get_default_memory_pool().free_all_blocks()


class DeviceBatch:
    """One batch of a device window, cut on the GPU when :meth:`result` is called.

    Cutting launches kernels on the calling thread's stream, so the consumer calls it: its
    kernels are then ordered with whatever it does with the batch.
    """

    __slots__ = ("_positions", "_window")

    def __init__(self, window: Any, positions: np.ndarray) -> None:
        self._window = window
        self._positions = positions

    def result(self) -> Any:
        """The batch's rows (a view where they are consecutive in the window)."""
        return take_rows(self._window, self._positions)
