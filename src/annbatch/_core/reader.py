"""Reader: execute a read plan against the row sources, concurrently."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, wait
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from annbatch._core.datasets import CSRSource
from annbatch._core.types import csr_from_arrays

if TYPE_CHECKING:
    import threading
    from collections.abc import Sequence
    from concurrent.futures import Executor

    from annbatch._core.datasets import DenseSource, RowSource
    from annbatch._core.planner import Placement, ReadPlan
    from annbatch._core.types import Block

TASKS_PER_THREAD = 4
"""Tasks per read thread and dataset: enough to keep threads busy to the end of a window."""

Role = Literal["dense", "data", "indices"]
Allocate = Callable[[Role, tuple[int, ...], np.dtype], np.ndarray]
"""Where a window is read into: ``allocate(role, shape, dtype)`` returns an uninitialised
C-contiguous array for a dense window (``"dense"``) or a CSR window's values (``"data"``) or
column indices (``"indices"``). The default is ``np.empty``; the GPU path passes pinned memory."""


def empty_window(role: Role, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The default :data:`Allocate`: new memory."""
    return np.empty(shape, dtype=dtype)


def read_plan(
    plan: ReadPlan,
    sources: Sequence[RowSource],
    executor: Executor | None = None,
    threads: int = 1,
    cancel: threading.Event | None = None,
    allocate: Allocate = empty_window,
) -> list[Block]:
    """Read every segment of ``plan``; the blocks hold the segments' rows in plan order.

    Each dataset's segments become one :class:`~annbatch._core.types.ReadJob`; the tasks of all
    jobs go to ``executor`` together (or run here, in order, without one), so datasets and
    chunks are read and decoded concurrently. CSR datasets that are read chunk by chunk all
    decode into one set of window arrays, from ``allocate``: the window is then one block,
    never concatenated (which, single-threaded, cost as much as a third of a window's time
    over two datasets).
    """
    groups = []
    bounds = np.flatnonzero(np.diff(plan.datasets)) + 1  # reads are grouped by dataset
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), plan.datasets.size], strict=True):
        if hi > lo:
            groups.append((sources[int(plan.datasets[lo])], plan.starts[lo:hi], plan.stops[lo:hi]))
    n_tasks = TASKS_PER_THREAD * threads
    csr = [g[0] for g in groups if isinstance(g[0], CSRSource) and g[0].reads_chunks_once]
    if csr and len(csr) == len(groups):
        return [_read_csr_window(groups, n_tasks, executor, cancel, allocate)]
    jobs = [source.read_job(starts, stops, n_tasks) for source, starts, stops in groups]
    _run([task for job in jobs for task in job.tasks], executor, cancel)
    return [block for job in jobs for block in job.result()]


def read_placed(
    placement: Placement,
    sources: Sequence[DenseSource],
    executor: Executor | None = None,
    threads: int = 1,
    cancel: threading.Event | None = None,
    allocate: Allocate = empty_window,
) -> np.ndarray:
    """Read a window of dense rows straight into batch order, into one buffer (from
    ``allocate``).

    Every source must read chunks directly (:attr:`RowSource.reads_chunks_once`). Each chunk
    is decoded once, into a scratch buffer (or, when a whole chunk lands in one piece, into
    the output itself), and its rows are copied to their places in the batches while the
    chunk is still in cache. No copy of the window in disk order is made.
    """
    first = sources[0]
    out = allocate("dense", (placement.rows.size, *first.shape[1:]), np.dtype(first.dtype))
    n_tasks = TASKS_PER_THREAD * threads
    tasks = [
        task
        for run in placement.runs
        for task in sources[run.dataset].placed_tasks(run.starts, run.stops, run.dest, out, n_tasks)
    ]
    _run(tasks, executor, cancel)
    return out


def _read_csr_window(
    groups: list[tuple[Any, np.ndarray, np.ndarray]],
    n_tasks: int,
    executor: Executor | None,
    cancel: threading.Event | None,
    allocate: Allocate = empty_window,
) -> Block:
    """CSR rows of one or more datasets decoded into one window's arrays: no concatenation
    after."""
    sizes = [source.nnz_of(starts, stops) for source, starts, stops in groups]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    first = groups[0][0]
    nnz = (int(offsets[-1]),)
    data = allocate("data", nnz, np.dtype(first.dtype))
    indices = allocate("indices", nnz, np.result_type(*(g[0].index_dtype for g in groups)))
    jobs = [
        source.read_job(starts, stops, n_tasks, out=(data[a:b], indices[a:b]))
        for (source, starts, stops), a, b in zip(groups, offsets[:-1], offsets[1:], strict=True)
    ]
    _run([task for job in jobs for task in job.tasks], executor, cancel)
    parts = [job.result()[0] for job in jobs]  # views of data and indices, each from entry 0
    indptr = np.concatenate(
        [
            [0],
            *(p.indptr[1:].astype(np.int64) + o for p, o in zip(parts, offsets[:-1], strict=True)),
        ]
    )
    n_rows = sum(p.shape[0] for p in parts)
    return csr_from_arrays(data, indices, indptr, (n_rows, first.shape[1]))


class ReadCancelled(Exception):
    """The read was abandoned because ``cancel`` was set (the consumer stopped iterating)."""


_POLL_S = 0.05  # how often a waiting reader checks whether it was cancelled


def _run(
    tasks: Sequence[Callable[[], None]],
    executor: Executor | None,
    cancel: threading.Event | None = None,
) -> None:
    """Run ``tasks`` (on ``executor`` if given) and re-raise the first error. When ``cancel``
    is set, tasks not started yet are dropped and :class:`ReadCancelled` is raised."""
    if executor is None or len(tasks) < 2:
        for task in tasks:
            if cancel is not None and cancel.is_set():
                raise ReadCancelled
            task()
        return
    pending = {executor.submit(task) for task in tasks}
    while pending:
        done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed or (cancel is not None and cancel.is_set()):
            for future in pending:
                future.cancel()
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            raise ReadCancelled
