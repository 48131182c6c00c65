"""How the work of one epoch is shared among ``torch.utils.data.DataLoader`` workers."""

from __future__ import annotations

import atexit
import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from annbatch.abc._sampler import ChunkRequest, split_batches

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator


@dataclass(frozen=True, slots=True)
class WorkerShard:
    """This process's share of an epoch."""

    id: int
    """Index of this worker, 0 outside a DataLoader worker."""
    count: int
    """Number of workers sharing the epoch, 1 outside a DataLoader worker."""
    seed: int | None
    """A seed that every worker of this epoch shares and that differs between epochs;
    None outside a DataLoader worker."""

    def owns(self, request_number: int) -> bool:
        """Whether this worker reads the load request at position ``request_number``."""
        return request_number % self.count == self.id


def current_shard() -> WorkerShard:
    """The share of the calling process: everything, unless inside a DataLoader worker."""
    torch = sys.modules.get("torch")
    # Without torch imported this process cannot be a DataLoader worker.
    info = torch.utils.data.get_worker_info() if torch is not None else None
    if info is None:
        return WorkerShard(id=0, count=1, seed=None)
    # DataLoader gives worker i the seed base_seed + i, base_seed drawn anew each epoch.
    return WorkerShard(id=info.id, count=info.num_workers, seed=int(info.seed - info.id))


_FEEDER_JOIN_S = 2.0
"""How long, in all, a worker's exit waits for the threads that send its batches."""

_feeders_joined_at_exit = False


def join_queue_feeders_at_exit() -> None:
    """In a DataLoader worker, make the process's exit wait for its queue feeder threads.

    A worker hands batches to the main process through a ``multiprocessing`` queue whose
    feeder thread pickles them; torch's pickling moves each tensor into shared memory in C++,
    with the GIL released. When the main process ends an epoch early (``break``, ``del`` of
    the iterator), the worker exits without joining that thread. If interpreter finalization
    then finds it in torch's C++ code, CPython ends the thread with ``pthread_exit``, whose
    unwinding cannot pass torch's frames: the worker aborts ("terminate called without an
    active exception"; torch reports "DataLoader worker ... is killed by signal: Aborted").
    atexit handlers run before finalization, so joining the feeders there (for at most
    :data:`_FEEDER_JOIN_S` seconds; torch waits 5 s for a worker before terminating it)
    lets the last batch finish. Registered once per process; safe to call repeatedly.
    """
    global _feeders_joined_at_exit
    if not _feeders_joined_at_exit:
        _feeders_joined_at_exit = True
        atexit.register(_join_queue_feeders, _FEEDER_JOIN_S)


def _join_queue_feeders(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        # multiprocessing.queues.Queue names its feeder thread so.
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def delivered_per_worker(totals: list[int], delivered: int) -> tuple[list[int], int]:
    """How many batches each worker had handed over when a DataLoader had yielded
    ``delivered`` batches, and which worker's turn was next.

    A ``DataLoader`` over an iterable dataset (with ``in_order=True``, its default) takes one
    batch from each worker in turn, starting at worker 0, and drops a worker from the turn once
    it has no more. ``totals`` are the workers' batch counts for the epoch.
    """
    taken = [0] * len(totals)
    active = [w for w, n in enumerate(totals) if n]
    left = min(delivered, sum(totals))
    last = -1
    while left:
        rounds = min(left // len(active), *(totals[w] - taken[w] for w in active))
        if rounds:  # whole turns in which no worker runs out
            for w in active:
                taken[w] += rounds
            left -= rounds * len(active)
            last = active[-1]
            active = [w for w in active if taken[w] < totals[w]]
            continue
        for w in list(active):  # a partial turn
            if not left:
                break
            taken[w] += 1
            left -= 1
            last = w
            if taken[w] == totals[w]:
                active.remove(w)
    return taken, (last + 1) % len(totals)


def batches_of(request: ChunkRequest, batch_size: int) -> int:
    """Number of batches a load request yields."""
    if request.splits is not None:
        return len(request.splits)
    return math.ceil(request.n_rows / batch_size)


def remaining_requests(
    requests: Iterable[ChunkRequest],
    counts: list[int],
    delivered: int,
    shard: WorkerShard,
    batch_size: int,
) -> Iterator[ChunkRequest]:
    """This worker's load requests of an epoch of which ``delivered`` batches (all workers
    together) were consumed, without those batches.

    ``counts`` are the numbers of batches of the epoch's requests (from a first pass over
    them). The new DataLoader's turns start at worker 0, so the workers swap roles: worker
    ``i`` takes the requests of the worker whose turn was ``i``-th next, and the remaining
    batches come in the order the interrupted DataLoader would have yielded them. Requests
    whose batches were all consumed are left out (never read); a partly consumed one keeps
    only its remaining batches.
    """
    totals = [0] * shard.count
    for number, count in enumerate(counts):
        totals[number % shard.count] += count
    taken, next_turn = delivered_per_worker(totals, delivered)
    role = (shard.id + next_turn) % shard.count
    skip = taken[role]
    for number, request in enumerate(requests):
        if number % shard.count != role:
            continue
        count = batches_of(request, batch_size)
        if skip >= count:
            skip -= count
            continue
        if skip:
            splits = request.splits
            if splits is None:
                splits = split_batches(np.arange(request.n_rows), batch_size)
            request = ChunkRequest(chunks=request.chunks, splits=splits[skip:])
            skip = 0
        yield request
