"""How the work of one epoch is shared among ``torch.utils.data.DataLoader`` workers."""

from __future__ import annotations

import sys
from dataclasses import dataclass


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
