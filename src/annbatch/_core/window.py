"""Window: one load request read into memory and cut into batches.

Three ways, chosen per window:

- dense rows of sources read chunk by chunk go straight into batch order (one row copy, from
  a chunk still in cache), and batches are views of one buffer per window;
- otherwise the window is read in disk order (:func:`~annbatch._core.reader.plan_job`) and
  its batches are cut from it (:func:`~annbatch._core.assembler.assemble`);
- on the GPU path, the window read on the host is copied to the device once and the consumer
  cuts each batch there.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from annbatch._core import gpu
from annbatch._core.assembler import assemble, done, split_rows
from annbatch._core.planner import plan_placement, plan_reads
from annbatch._core.reader import (
    TASKS_PER_THREAD,
    ReadSite,
    common_dtype,
    placed_job,
    plan_job,
    run_job,
    run_tasks,
)
from annbatch._core.sources import DenseSource
from annbatch._core.types import empty_window
from annbatch.abc._sampler import split_batches

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Sequence
    from concurrent.futures import Executor

    import pandas as pd

    from annbatch._core.assembler import ConcatStrategy
    from annbatch._core.buffers import Scope
    from annbatch._core.lent import BatchMemory
    from annbatch._core.obs import ObsRows
    from annbatch._core.planner import ReadPlan
    from annbatch._core.sources import RowSource
    from annbatch.abc._sampler import ChunkRequest

T = TypeVar("T")


class Pending(Protocol):
    """A batch being cut: a future on the read threads, or a batch cut on the GPU on demand."""

    def result(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class Window:
    """One load request, read into memory."""

    batches: Sequence[Pending]
    """The batches: futures being cut on the read threads, or batches cut on the GPU."""
    indices: list[np.ndarray]
    """Global row positions of each batch's rows."""
    obs: pd.DataFrame | None = None
    """The obs of every batch's rows, one batch after another (None: no obs)."""


def load_window(
    request: ChunkRequest,
    sources: Sequence[RowSource],
    offsets: np.ndarray,
    *,
    batch_size: int,
    strategy: ConcatStrategy,
    executor: Executor,
    threads: int,
    stop: threading.Event,
    copier: gpu.CopyStream | None = None,
    obs: ObsRows | None = None,
    densify: bool = False,
    buffers: Scope | None = None,
    memory: BatchMemory | None = None,
    site: ReadSite | None = None,
) -> Window:
    """Read one load request and cut it into batches (on the GPU, given a ``copier``).

    Parameters
    ----------
    request
        The chunks to read and, optionally, how to split them into batches.
    sources, offsets
        The Loader's datasets and the global row where each begins.
    batch_size
        Rows per batch where the request gives no splits.
    strategy
        How the general path cuts batches (see :mod:`annbatch._core.assembler`).
    executor, threads, stop
        The read threads, their number, and the event that abandons the read.
    copier
        The GPU path's stream and staging buffers; None on the CPU.
    obs
        Every dataset's obs: the window's rows of it are read on a read thread while X is
        read (None: no obs).
    densify
        Make sparse batches dense where they are cut (CPU path only; dense rows already are).
    buffers
        The epoch's leases of the Loader's window memory: where a sparse window's arrays
        come from on the CPU path, and go back to once its batches are cut (None: new
        memory for every window).
    memory
        Memory lent with the batches cut on the CPU path (:mod:`~annbatch._core.lent`);
        None: new memory for each batch.
    site
        Where the epoch's windows are read (:class:`~annbatch._core.reader.ReadSite`): a
        window with little to decode is read on this thread, until one waits on storage;
        None: a new choice for this window.
    """
    if site is None:
        site = ReadSite()
    splits = request.splits
    if splits is None:
        n_rows = sum(c.stop - c.start for c in request.chunks)
        splits = split_batches(np.arange(n_rows), batch_size)
    # On the GPU path, our chunk reader decodes straight into the pinned staging buffers.
    allocate = copier.allocate if copier is not None else empty_window
    # Dense rows from chunk-readable sources go straight into batch order. CSR rows are short
    # runs of elements that numpy can only scatter element by element (an 8-byte index per
    # 4-byte value), which measured 1.4x slower than the general path below.
    dense = [s for s in sources if isinstance(s, DenseSource) and s.reads_chunks_once]
    if len(dense) == len(sources) and all(s.dtype == sources[0].dtype for s in sources):
        placement = plan_placement(request.chunks, splits, offsets)
        if placement is not None:  # None: a row repeats within the window
            edges = list(itertools.pairwise(placement.bounds.tolist()))
            indices = [placement.rows[a:b] for a, b in edges]
            out, tasks = placed_job(placement, dense, threads, allocate)
            pool = executor if copier is not None or site.threads(tasks) else None
            with site.timed(here=pool is None):
                window_obs = _read_obs(obs, indices, pool)
                run_tasks(tasks, pool, stop)
            if copier is not None:
                out = gpu.to_device([out], copier)  # batches: views of the device window
            return Window(
                batches=[done(b) for b in split_rows(out, placement.bounds)],
                indices=indices,
                obs=_result(window_obs),
            )
    # General path: read the window in disk order, then cut batches from it (on the read
    # threads: numpy and scipy release the GIL while they copy rows). Sources that decode each
    # chunk once by themselves need no merging across gaps.
    grids = [None if s.reads_chunks_once else s for s in sources]
    plan = plan_reads(request.chunks, offsets, grids)
    splits = [plan.positions[s] for s in splits]  # request order -> memory order
    indices = [plan.index[s] for s in splits]
    lease = buffers.lease() if buffers is not None and copier is None else None
    if lease is not None:
        allocate = lease.allocate
    # On the CPU path, batches are cast to the sources' common dtype as they are cut: the
    # window keeps the values as stored (a packed collection's uint8 counts: a quarter of
    # float32's memory; decoded without a cast where its datasets share one stored dtype).
    # The GPU path reads it in the common dtype.
    cast_when_cut = copier is None
    job = plan_job(plan, sources, threads, allocate, narrow=cast_when_cut)
    # A window of little local work is read, and its batches cut, on this thread.
    pool = executor if copier is not None or job is None or site.threads(job.tasks) else None
    with site.timed(here=pool is None):
        window_obs = _read_planned_obs(obs, plan, offsets, splits, pool)
        blocks = run_job(job, sources, pool, stop, promote=not cast_when_cut)
    if copier is not None:
        # One copy to the GPU concatenates the blocks; the consumer cuts each batch there.
        window = gpu.to_device(blocks, copier)
        return Window(
            batches=[gpu.DeviceBatch(window, s) for s in splits],
            indices=indices,
            obs=_result(window_obs),
        )
    batches = assemble(
        blocks,
        splits,
        strategy,
        pool,
        TASKS_PER_THREAD * threads,
        densify=densify,
        on_done=None if lease is None else lease.release,
        memory=memory,
        dtype=common_dtype(sources),
    )
    return Window(batches=batches, indices=indices, obs=_result(window_obs))


def _read_obs(
    obs: ObsRows | None, indices: Sequence[np.ndarray], executor: Executor | None
) -> Future[pd.DataFrame] | None:
    """Read the obs of every batch's rows, one batch after another: on a read thread, where
    the window's X is read there too (submitted before X's tasks, it runs while they do),
    else here."""
    if obs is None or not indices:
        return None
    return _start(executor, obs.take, np.concatenate(indices))


def _read_planned_obs(
    obs: ObsRows | None,
    plan: ReadPlan,
    offsets: np.ndarray,
    splits: Sequence[np.ndarray],
    executor: Executor | None,
) -> Future[pd.DataFrame] | None:
    """:func:`_read_obs` of a window read by ``plan`` (``splits``: each batch's rows in the
    window's memory): the plan's reads are the window's rows as sorted runs, so the obs
    reader needs no sort of its own."""
    if obs is None or not splits:
        return None
    base = offsets[plan.datasets]
    positions = np.concatenate(splits)
    return _start(executor, obs.take_runs, plan.starts + base, plan.stops + base, positions)


def _start(executor: Executor | None, read: Callable[..., T], *args: Any) -> Future[T]:
    """``read(*args)`` on ``executor``, or here without one; either way its error is raised
    where the result is asked for."""
    if executor is not None:
        return executor.submit(read, *args)
    future: Future[T] = Future()
    try:
        future.set_result(read(*args))
    except Exception as e:
        future.set_exception(e)
    return future


def _result(window_obs: Future[pd.DataFrame] | None) -> pd.DataFrame | None:
    return None if window_obs is None else window_obs.result()
