"""The planner: fewest reads, each on-disk chunk read once, every requested row mapped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from annbatch._core.planner import (
    ReadPlan,
    dataset_offsets,
    plan_placement,
    plan_reads,
    requested_rows,
)


@dataclass(frozen=True)
class Segment:
    """One read of a plan."""

    dataset: int
    start: int
    stop: int

    @property
    def n_rows(self) -> int:
        return self.stop - self.start


def _segments(plan: ReadPlan) -> list[Segment]:
    """The reads of ``plan``, one :class:`Segment` each."""
    columns = (plan.datasets.tolist(), plan.starts.tolist(), plan.stops.tolist())
    return [Segment(d, a, b) for d, a, b in zip(*columns, strict=True)]


@dataclass
class Grid:
    rows: int

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        return row_a // self.rows == row_b // self.rows


@st.composite
def requests(draw):
    sizes = draw(st.lists(st.integers(0, 60), min_size=1, max_size=4))
    n_obs = sum(sizes)
    chunks = []
    if n_obs:
        for _ in range(draw(st.integers(0, 12))):
            start = draw(st.integers(0, n_obs - 1))
            stop = draw(st.integers(start, min(n_obs, start + 15)))
            chunks.append(slice(start, stop))
    grids = [Grid(draw(st.integers(1, 9))) if draw(st.booleans()) else None for _ in sizes]
    return sizes, chunks, grids


@given(requests())
def test_plan_maps_every_requested_row(case):
    sizes, chunks, grids = case
    offsets = dataset_offsets(sizes)
    plan = plan_reads(chunks, offsets, grids)
    requested = (
        np.concatenate([np.arange(c.start, c.stop) for c in chunks]) if chunks else np.empty(0, int)
    )
    # Each requested row, in request order, is found in memory where the plan says.
    np.testing.assert_array_equal(plan.index[plan.positions], requested)
    assert plan.index.size == sum(s.n_rows for s in _segments(plan))
    # Reads are in disk order, never overlap, and no two reads of a dataset share a chunk.
    for a, b in zip(_segments(plan), _segments(plan)[1:], strict=False):
        assert (a.dataset, a.start) < (b.dataset, b.start)
        if a.dataset == b.dataset:
            assert a.stop < b.start, "touching or overlapping reads were not merged"
            grid = grids[a.dataset]
            if grid is not None:
                assert not grid.shares_chunk(a.stop - 1, b.start)
    # Reads stay inside their dataset.
    for s in _segments(plan):
        assert 0 <= s.start < s.stop <= sizes[s.dataset]


def test_shuffled_chunks_in_one_on_disk_chunk_are_one_read():
    offsets = dataset_offsets([100])
    chunks = [slice(30, 32), slice(2, 4), slice(12, 14), slice(6, 8)]
    plan = plan_reads(chunks, offsets, [Grid(16)])
    assert [(s.start, s.stop) for s in _segments(plan)] == [(2, 14), (30, 32)]
    np.testing.assert_array_equal(plan.index[plan.positions], [30, 31, 2, 3, 12, 13, 6, 7])


def test_repeated_rows_are_read_once():
    plan = plan_reads([slice(5, 9), slice(7, 11)], dataset_offsets([20]))
    assert [(s.start, s.stop) for s in _segments(plan)] == [(5, 11)]
    np.testing.assert_array_equal(plan.index[plan.positions], [5, 6, 7, 8, 7, 8, 9, 10])


@st.composite
def placements(draw):
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=4))
    n_obs = sum(sizes)
    chunks = []
    if n_obs:
        for _ in range(draw(st.integers(0, 8))):
            start = draw(st.integers(0, n_obs - 1))
            chunks.append(slice(start, draw(st.integers(start, min(n_obs, start + 12)))))
    n_rows = sum(c.stop - c.start for c in chunks)
    perm = np.array(draw(st.permutations(range(n_rows))), dtype=np.int64)
    cuts = sorted(draw(st.lists(st.integers(0, n_rows), max_size=5)))
    return sizes, chunks, np.split(perm, cuts)


@given(placements())
def test_placement_puts_every_row_where_its_batch_wants_it(case):
    sizes, chunks, splits = case
    offsets = dataset_offsets(sizes)
    placement = plan_placement(chunks, splits, offsets)
    wanted = requested_rows(chunks)[np.concatenate(splits)]
    if len(np.unique(wanted)) < wanted.size:  # a row twice in one window: not placeable
        assert placement is None
        return
    assert placement is not None
    np.testing.assert_array_equal(placement.rows, wanted)
    assert placement.bounds.tolist() == [0, *np.cumsum([s.size for s in splits]).tolist()]
    filled = np.full(wanted.size, -1)
    for run in placement.runs:
        assert np.all(np.diff(run.starts) > 0)
        assert np.all(run.starts[1:] >= run.stops[:-1])  # sorted, disjoint
        for start, stop, dest in zip(run.starts, run.stops, run.dest, strict=True):
            assert np.all(filled[dest : dest + stop - start] == -1)
            filled[dest : dest + stop - start] = np.arange(start, stop) + offsets[run.dataset]
    np.testing.assert_array_equal(filled, wanted)
