"""Reader: execute a read plan against the row sources, concurrently."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from annbatch._core.cancel import POLL_S, ReadCancelled
from annbatch._core.types import empty_window

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterator, Sequence
    from concurrent.futures import Executor

    from annbatch._core.planner import Placement, ReadPlan
    from annbatch._core.sources import DenseSource, RowSource
    from annbatch._core.types import Allocate, Block, ReadJob

TASKS_PER_THREAD = 4
"""Tasks per read thread and dataset: enough to keep threads busy to the end of a window."""


PARALLEL_MIN_BYTES = 8 << 20
"""Bytes a window's local reads must decode or copy for the read threads to pay.

A task on a read thread releases the GIL for every file read and every chunk it decodes,
and each release is a handover between threads (a few microseconds, and a wait for the GIL
to come back). A window with little to decode is mostly such handovers: it is read faster
on the thread that asks for it. Measured on 2 cores (collections of 200,000 cells x 2,000
genes, windows of 16,384 rows, 3 runs, medians; benchmarks/RESULTS.md), rows/s on the
calling thread against the read threads: 8 values per row (1.1 MiB to decode a window)
1.51x, 32 values (4.2 MiB) 1.11x, 128 values (16.5 MiB) 0.85x, 512 values (35 MiB) 0.67x."""


def worth_threads(tasks: Sequence[Callable[[], None]]) -> bool:
    """Whether ``tasks`` should run on the read threads rather than on the calling thread:
    always for reads that wait on something other than this process' cores (object
    storage, zarr-python and h5py reads: their tasks say nothing of their size), and for
    local reads that decode or copy at least :data:`PARALLEL_MIN_BYTES` together."""
    total = 0
    for task in tasks:
        nbytes = getattr(task, "local_bytes", None)
        if nbytes is None:
            return True
        total += nbytes
        if total >= PARALLEL_MIN_BYTES:
            return True
    return False


WAIT_RATIO = 2.0
"""A window read on the calling thread that took more than this many times its CPU time
waited on storage (cold files on a network file system, say), not on the GIL: the rest of
the epoch goes to the read threads, whose reads overlap."""


class ReadSite:
    """Where an epoch's windows are read: on the read threads (:func:`worth_threads`), or
    on the thread that asks for them until one of those waits on storage
    (:data:`WAIT_RATIO`)."""

    __slots__ = ("waited",)

    def __init__(self) -> None:
        self.waited = False

    def threads(self, tasks: Sequence[Callable[[], None]]) -> bool:
        """Whether ``tasks`` (a window's) go to the read threads."""
        return self.waited or worth_threads(tasks)

    @contextmanager
    def timed(self, *, here: bool) -> Iterator[None]:
        """Time a window's reads, if ``here`` (on the calling thread)."""
        if not here:
            yield
            return
        wall, cpu = time.perf_counter(), time.thread_time()
        yield
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        if wall > WAIT_RATIO * cpu + 0.002:  # 2 ms: timer and scheduling noise
            self.waited = True


def plan_job(
    plan: ReadPlan,
    sources: Sequence[RowSource],
    threads: int = 1,
    allocate: Allocate = empty_window,
    *,
    narrow: bool = False,
) -> ReadJob | None:
    """The job that reads every segment of ``plan`` (None: nothing to read); ``narrow``: see
    :meth:`RowSource.window_job <annbatch._core.sources.RowSource.window_job>`.

    The segments of each dataset become one part of the window; the first source builds the
    window's job from all parts (:meth:`RowSource.window_job`), so that datasets and chunks
    are read and decoded concurrently when its tasks run on the read threads.
    """
    parts = []
    bounds = np.flatnonzero(np.diff(plan.datasets)) + 1  # reads are grouped by dataset
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), plan.datasets.size], strict=True):
        if hi > lo:
            parts.append((sources[int(plan.datasets[lo])], plan.starts[lo:hi], plan.stops[lo:hi]))
    if not parts:
        return None
    return parts[0][0].window_job(parts, TASKS_PER_THREAD * threads, allocate, narrow=narrow)


def run_job(
    job: ReadJob | None,
    sources: Sequence[RowSource],
    executor: Executor | None = None,
    cancel: threading.Event | None = None,
    *,
    promote: bool = True,
) -> list[Block]:
    """Run ``job``'s tasks (on ``executor``, or here, in order, without one); its blocks
    hold the plan's rows in plan order, in the sources' common dtype (``promote=False``: in
    the dtypes they were read in, which the caller casts to that dtype itself)."""
    if job is None:
        return []
    run_tasks(job.tasks, executor, cancel)
    blocks = job.result()
    if not promote:
        return blocks
    dtype = common_dtype(sources)
    if any(b.dtype != dtype for b in blocks):  # datasets of different dtypes: promote
        blocks = [b if b.dtype == dtype else b.astype(dtype) for b in blocks]
    return blocks


def read_plan(
    plan: ReadPlan,
    sources: Sequence[RowSource],
    executor: Executor | None = None,
    threads: int = 1,
    cancel: threading.Event | None = None,
    allocate: Allocate = empty_window,
) -> list[Block]:
    """Read every segment of ``plan`` (:func:`plan_job`, then :func:`run_job`)."""
    return run_job(plan_job(plan, sources, threads, allocate), sources, executor, cancel)


def common_dtype(sources: Sequence[RowSource]) -> np.dtype:
    """The dtype every window of ``sources`` is yielded in (``numpy.result_type`` of theirs)."""
    first = sources[0].dtype
    if all(s.dtype == first for s in sources):
        return np.dtype(first)
    return np.result_type(*(s.dtype for s in sources))


def placed_job(
    placement: Placement,
    sources: Sequence[DenseSource],
    threads: int = 1,
    allocate: Allocate = empty_window,
) -> tuple[np.ndarray, list[Callable[[], None]]]:
    """The buffer (from ``allocate``) that a window of dense rows is read into, straight in
    batch order, and the tasks that fill it.

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
    return out, tasks


def run_tasks(
    tasks: Sequence[Callable[[], None]],
    executor: Executor | None,
    cancel: threading.Event | None = None,
) -> None:
    """Run ``tasks`` (on ``executor`` if given) and re-raise the first error. When ``cancel``
    is set, tasks not started yet are dropped and :class:`ReadCancelled` is raised. Either
    way, tasks that can be cancelled (remote reads, whose requests started when they were
    made) are told to, so that no request of the window outlives it."""
    try:
        if executor is None or len(tasks) < 2:
            for task in tasks:
                if cancel is not None and cancel.is_set():
                    raise ReadCancelled
                task()
            return
        pending = {executor.submit(task) for task in tasks}
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() is not None]
            if failed or (cancel is not None and cancel.is_set()):
                for future in pending:
                    future.cancel()
                if failed:
                    raise failed[0].exception()  # type: ignore[misc]
                raise ReadCancelled
    except BaseException:
        for task in tasks:
            stop = getattr(task, "cancel", None)
            if stop is not None:
                stop()
        raise
