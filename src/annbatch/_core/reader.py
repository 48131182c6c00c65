"""Reader: execute a read plan against the row sources, concurrently."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from concurrent.futures import Executor

    from annbatch._core.datasets import DenseSource, RowSource
    from annbatch._core.planner import Placement, ReadPlan
    from annbatch._core.types import Block, ReadJob

TASKS_PER_THREAD = 4
"""Tasks per read thread and dataset: enough to keep threads busy to the end of a window."""


def read_plan(
    plan: ReadPlan, sources: Sequence[RowSource], executor: Executor | None = None, threads: int = 1
) -> list[Block]:
    """Read every segment of ``plan``; the blocks hold the segments' rows in plan order.

    Each dataset's segments become one :class:`~annbatch._core.types.ReadJob`; the tasks of all
    jobs go to ``executor`` together (or run here, in order, without one), so datasets and
    chunks are read and decoded concurrently.
    """
    jobs: list[ReadJob] = []
    bounds = np.flatnonzero(np.diff(plan.datasets)) + 1  # reads are grouped by dataset
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), plan.datasets.size], strict=True):
        if hi > lo:
            source = sources[int(plan.datasets[lo])]
            n_tasks = TASKS_PER_THREAD * threads
            jobs.append(source.read_job(plan.starts[lo:hi], plan.stops[lo:hi], n_tasks))
    _run([task for job in jobs for task in job.tasks], executor)
    return [block for job in jobs for block in job.result()]


def read_placed(
    placement: Placement,
    sources: Sequence[DenseSource],
    executor: Executor | None = None,
    threads: int = 1,
) -> np.ndarray:
    """Read a window of dense rows straight into batch order, into one buffer.

    Every source must read chunks directly (:attr:`RowSource.reads_chunks_once`). Each chunk
    is decoded once, into a scratch buffer (or, when a whole chunk lands in one piece, into
    the output itself), and its rows are copied to their places in the batches while the
    chunk is still in cache. No copy of the window in disk order is made.
    """
    first = sources[0]
    out = np.empty((placement.rows.size, *first.shape[1:]), dtype=first.dtype)
    n_tasks = TASKS_PER_THREAD * threads
    tasks = [
        task
        for run in placement.runs
        for task in sources[run.dataset].placed_tasks(run.starts, run.stops, run.dest, out, n_tasks)
    ]
    _run(tasks, executor)
    return out


def _run(tasks: Sequence[Callable[[], None]], executor: Executor | None) -> None:
    if executor is None or len(tasks) < 2:
        for task in tasks:
            task()
    else:
        for future in [executor.submit(task) for task in tasks]:
            future.result()
