"""Reader: execute a read plan against the row sources."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch._core.datasets import RowSource
    from annbatch._core.planner import ReadPlan
    from annbatch._core.types import Block


def read_plan(plan: ReadPlan, sources: Sequence[RowSource]) -> list[Block]:
    """Read every segment of ``plan``; one block per segment, in memory order."""
    return [sources[seg.dataset].read(seg.start, seg.stop) for seg in plan.segments]
