"""Epoch: run one epoch of a Loader, from the sampler's load requests to batch dicts.

This process's share of the epoch (DataLoader workers take load requests round-robin, with a
seed they share), the batches a resumed epoch skips, the read threads and, on the GPU path,
the CUDA device, stream and staging buffers all live here, for exactly one epoch. Windows are
read by :func:`~annbatch._core.window.load_window`, in a background thread when read-ahead is
on (:class:`~annbatch._core.prefetch.Prefetcher`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from annbatch._core import gpu
from annbatch._core.cancel import ReadCancelled
from annbatch._core.convert import convert
from annbatch._core.planner import dataset_offsets
from annbatch._core.prefetch import Prefetcher
from annbatch._core.reader import ReadSite
from annbatch._core.window import load_window
from annbatch._core.workers import batches_of, current_shard, remaining_requests

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable, Iterator, Sequence

    import pandas as pd

    from annbatch._core.assembler import ConcatStrategy
    from annbatch._core.buffers import BufferPool
    from annbatch._core.convert import OutputKind
    from annbatch._core.lent import BatchMemory
    from annbatch._core.obs import ObsRows
    from annbatch._core.sources import RowSource
    from annbatch._core.window import Pending, Window
    from annbatch._core.workers import WorkerShard
    from annbatch.abc import Sampler
    from annbatch.abc._sampler import ChunkRequest

_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2


def read_threads(workers: int = 1) -> int:
    """Threads that read and decode a window's chunks in each of ``workers`` processes.

    Decompression releases the GIL, so one thread per core keeps every core decoding; the
    cores are shared among DataLoader workers; at least 2, so file reads overlap decoding.
    """
    return max(2, _CPUS // max(1, workers))


@dataclass(frozen=True, slots=True)
class Epoch:
    """What one epoch reads and how it hands batches over."""

    sources: Sequence[RowSource]
    sampler: Sampler
    strategy: ConcatStrategy
    obs: ObsRows | None
    """All datasets' obs, one row space (None: no obs); each window reads its rows' obs."""
    var: pd.DataFrame | None
    """The datasets' var (one for all; None: none given), handed out with every batch."""
    output: OutputKind
    return_index: bool
    read_ahead: int
    """Windows read in a background thread ahead of the consumer; 0: read in its thread."""
    skip: int = 0
    """Batches of the epoch (all workers together) already consumed before a resume."""
    device: int | None = None
    """The consumer's CUDA device: the GPU path. None: the CPU path."""
    dense: bool = False
    """Sparse batches made dense on the read threads (CPU path only)."""
    buffers: BufferPool | None = None
    """Memory for sparse windows, reused from window to window and epoch to epoch (the
    Loader's); None: new memory for each window."""
    memory: BatchMemory | None = None
    """Memory lent with batches and taken back once they are dropped (the Loader's; CPU path
    only); None: new memory for each batch."""

    def batches(self) -> Generator[dict[str, Any], None, None]:
        """Yield this process's batches: ``{"X": ..., "obs": ..., "var": ..., "index": ...}``.

        Closing the iterator (a ``break`` in the training loop, an exception) abandons the
        window being read and joins every thread this epoch started.
        """
        stop = threading.Event()  # set when the consumer stops: the reader abandons its window
        on_gpu = self.device is not None
        to_output = gpu.convert if on_gpu else convert
        windows: Iterator[Window] = self._windows(stop)
        prefetcher = None
        if self.read_ahead:
            windows = prefetcher = Prefetcher(windows, self.read_ahead, stop=stop)
        try:
            for window in windows:
                pending: Pending | None = None
                first = 0  # the batch's first row in the window's obs
                for index, pending in zip(window.indices, window.batches, strict=True):
                    obs = None
                    if window.obs is not None:
                        obs = window.obs.iloc[first : first + len(index)]
                        first += len(index)
                    # Cut on the read threads (raises what cutting raised), or on the GPU.
                    yield {
                        "X": to_output(pending.result(), self.output),
                        "obs": obs,
                        "var": self.var,
                        "index": index if self.return_index else None,
                    }
                if on_gpu:
                    del window, pending  # the device window goes back to CuPy's pool ...
                    gpu.release()  # ... and from there to the driver
        finally:
            stop.set()
            if prefetcher is not None:
                prefetcher.close()
            else:
                windows.close()  # type: ignore[attr-defined]  # a generator
            if on_gpu:
                gpu.release()

    def _windows(self, stop: threading.Event) -> Iterator[Window]:
        """Read this process's windows (in the read-ahead thread, when there is one), leaving
        out the first :attr:`skip` batches of the epoch. On the GPU path, every thread used
        works on :attr:`device`."""
        sampler = self.sampler
        shard = current_shard()  # the sampler was reseeded for it by the Loader
        offsets = dataset_offsets([s.shape[0] for s in self.sources])
        threads = read_threads(shard.count)
        copier = None
        if self.device is not None:
            gpu.use_device(self.device)  # before the stream and the staging buffers are made
            executor = ThreadPoolExecutor(
                threads,
                thread_name_prefix="annbatch-read",
                initializer=gpu.use_device,
                initargs=(self.device,),
            )
            copier = gpu.CopyStream(executor, threads)  # made in the thread that uses it
        else:
            executor = ThreadPoolExecutor(threads, thread_name_prefix="annbatch-read")
        scope = None if self.buffers is None else self.buffers.scope()
        site = ReadSite()
        try:
            for request in self._requests(int(offsets[-1]), shard):
                yield load_window(
                    request,
                    self.sources,
                    offsets,
                    batch_size=sampler.batch_size,
                    strategy=self.strategy,
                    executor=executor,
                    threads=threads,
                    stop=stop,
                    copier=copier,
                    obs=self.obs,
                    densify=self.dense,
                    buffers=scope,
                    memory=self.memory,
                    site=site,
                )
        except ReadCancelled:
            return
        finally:
            if copier is not None:
                copier.close()
            # Stopped early: drop batch cutting nobody will wait for. At the end of an epoch,
            # the last window's batches may still be being cut: let them finish.
            executor.shutdown(wait=True, cancel_futures=stop.is_set())
            if scope is not None:  # no thread touches the epoch's windows any more
                scope.close()

    def _requests(self, n_obs: int, shard: WorkerShard) -> Iterable[ChunkRequest]:
        """This process's (``shard``'s) load requests of the epoch, without the :attr:`skip`
        batches."""
        sampler = self.sampler
        if not self.skip:
            return (r for i, r in enumerate(sampler._chunk_requests(n_obs)) if shard.owns(i))
        # Resuming: count the epoch's batches first, then draw it again.
        state = sampler.state_dict()
        counts = [batches_of(r, sampler.batch_size) for r in sampler._chunk_requests(n_obs)]
        sampler.load_state_dict(state)
        requests = sampler._chunk_requests(n_obs)
        return remaining_requests(requests, counts, self.skip, shard, sampler.batch_size)
