"""Reader: execute a read plan against the row sources, concurrently."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from concurrent.futures import Executor

    from annbatch._core.datasets import RowSource
    from annbatch._core.planner import ReadPlan
    from annbatch._core.types import Block


def read_plan(
    plan: ReadPlan, sources: Sequence[RowSource], executor: Executor | None = None
) -> list[Block]:
    """Read every segment of ``plan``; one block per segment, in plan order.

    With an ``executor``, segments are read concurrently: zarr decodes in threads that release
    the GIL, so reads of different segments overlap.
    """
    segments = plan.segments
    if executor is None or len(segments) < 2:
        return [sources[seg.dataset].read(seg.start, seg.stop) for seg in segments]
    futures = [executor.submit(sources[seg.dataset].read, seg.start, seg.stop) for seg in segments]
    return [f.result() for f in futures]
