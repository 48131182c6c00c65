"""Reader: execute a read plan against the row sources, concurrently."""

from __future__ import annotations

from itertools import groupby
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence
    from concurrent.futures import Executor

    from annbatch._core.datasets import RowSource
    from annbatch._core.planner import ReadPlan
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
    for dataset, segments in groupby(plan.segments, key=lambda seg: seg.dataset):
        ranges = np.array([(seg.start, seg.stop) for seg in segments], dtype=np.int64)
        jobs.append(
            sources[dataset].read_job(ranges[:, 0], ranges[:, 1], TASKS_PER_THREAD * threads)
        )
    tasks = [task for job in jobs for task in job.tasks]
    if executor is None or len(tasks) < 2:
        for task in tasks:
            task()
    else:
        for future in [executor.submit(task) for task in tasks]:
            future.result()
    return [block for job in jobs for block in job.result()]
