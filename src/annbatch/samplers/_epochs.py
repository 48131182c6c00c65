"""What every annbatch sampler shares: a seed, numbered epochs, ranks, and resumable state."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from annbatch._args import parse_int, parse_positive_int, parse_rng
from annbatch.abc import Sampler
from annbatch.errors import InvalidArgumentError


class EpochSampler(Sampler):
    """A sampler whose epoch ``e`` is a pure function of its seed, ``e`` and its rank.

    The seed is one number drawn from the ``rng`` the user gives. Ranks come from the
    arguments or from an initialized ``torch.distributed`` process group. Subclasses call
    :meth:`_next_epoch` at the start of each epoch and draw from the generators it gives.

    Parameters
    ----------
    rng
        Where the seed comes from; ``numpy.random.default_rng()`` when None.
    rank, world_size
        This process's rank among ``world_size``, or None (both) to ask torch.distributed.
    """

    _trusted = True

    def __init__(
        self, rng: np.random.Generator | None, rank: int | None, world_size: int | None
    ) -> None:
        self._seeded = rng is not None
        self._rng = parse_rng(rng)
        self._seed = int(self._rng.integers(2**63))
        self._epoch = 0
        self._explicit_epochs = False
        self._rank, self._world_size = _parse_ranks(rank, world_size)

    @property
    def rng(self) -> np.random.Generator:
        """The generator the sampler's seed was drawn from. Setting one draws a new seed from
        it (as the ``rng`` argument does) and starts again at epoch 0: the sampler then draws
        what a new one built with that generator would."""
        return self._rng

    @rng.setter
    def rng(self, value: np.random.Generator | None) -> None:
        self._rng = parse_rng(value)
        self._seed = int(self._rng.integers(2**63))
        self._seeded = value is not None
        self._epoch = 0

    def _single_rank(self) -> None:
        """Draw every epoch for one process, whatever torch.distributed says (a wrapper such
        as :class:`~annbatch.samplers.DistributedSampler` splits the rows instead)."""
        self._rank, self._world_size = 0, 1

    @property
    def epoch(self) -> int:
        """The epoch the next call of :meth:`sample` draws."""
        return self._epoch

    def ranks(self) -> tuple[int, int]:
        """``(rank, world_size)``: as given, else from torch.distributed, else ``(0, 1)``."""
        if self._world_size is not None:
            return self._rank, self._world_size
        return distributed_ranks()

    def _share(self, n_rows: int, *, drop: bool) -> int:
        """Rows per rank when ``n_rows`` are split evenly: rounded down (the rest left out)
        with ``drop``, else up (the shortfall repeated from the start)."""
        world = self.ranks()[1]
        return n_rows // world if drop else -(-n_rows // world)

    def _batches_of(self, rows: int, batch_size: int, *, drop_last: bool) -> int:
        """Batches that ``rows`` rows make: whole ones only with ``drop_last``."""
        return rows // batch_size if drop_last else -(-rows // batch_size)

    def _next_epoch(self) -> tuple[np.random.Generator, np.random.Generator]:
        """Start the next epoch: a generator shared by all ranks, and one for this rank."""
        epoch = self._epoch
        self._epoch += 1
        rank = self.ranks()[0]
        return (
            np.random.default_rng([self._seed, epoch]),
            np.random.default_rng([self._seed, epoch, rank + 1]),
        )

    def _check_ranks_seeded(self, *, needed: bool) -> None:
        if needed and self.ranks()[1] > 1 and not self._seeded:
            msg = (
                f"a {type(self).__name__} split among ranks needs the same seed on every rank: "
                "pass rng=np.random.default_rng(seed) with one seed for all ranks"
            )
            raise InvalidArgumentError(msg)

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch`` next (as ``torch.utils.data.DistributedSampler.set_epoch``).

        Without calls to it, each :meth:`sample` draws the epoch after the previous one.
        Once it is called, the order no longer depends on DataLoader worker seeds: ranks and
        resumed runs see the same order for the same epoch.
        """
        self._epoch, self._explicit_epochs = parse_int(epoch, "epoch", minimum=0), True

    def state_dict(self) -> dict[str, Any]:
        """The seed and the next epoch: enough to draw the same epochs again."""
        return {"seed": self._seed, "epoch": self._epoch, "explicit_epochs": self._explicit_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        try:
            seed, epoch = int(state["seed"]), int(state["epoch"])
            explicit = bool(state.get("explicit_epochs", False))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            msg = (
                f"not a {type(self).__name__} state: {state!r} (expected the dict of state_dict())"
            )
            raise InvalidArgumentError(msg) from e
        self._seed, self._epoch, self._explicit_epochs = seed, epoch, explicit

    def _epoch_of(self, state: dict[str, Any]) -> object:
        # The seed and the epoch decide the order; whether set_epoch was called does not
        # (where it would, under DataLoader workers, the Loader checks the reseed instead).
        return (state.get("seed"), state.get("epoch"))

    def reseed(self, seed: int) -> None:
        """Mix a DataLoader epoch seed into the sampler's seed (see :meth:`Sampler.reseed`).

        Ignored once :meth:`set_epoch` was called or with several ranks: the order must then
        depend on the epoch alone, which every rank and every resumed run knows.
        """
        if self._explicit_epochs or self.ranks()[1] > 1:
            return
        self._seed = int(np.random.default_rng([seed, self._seed]).integers(2**63))

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for DataLoader workers, in the main process: read the ranks here, where the
        # process group lives (workers have none).
        state = self.__dict__.copy()
        if self._world_size is None:
            state["_rank"], state["_world_size"] = distributed_ranks()
        return state


def distributed_ranks() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialized torch.distributed process group, else (0, 1)."""
    torch = sys.modules.get("torch")  # not imported: no process group either
    if torch is None:
        return 0, 1
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


def _parse_ranks(rank: object, world_size: object) -> tuple[int, int | None]:
    if rank is None and world_size is None:
        return 0, None
    if rank is None or world_size is None:
        msg = f"give rank and world_size together (got rank={rank!r}, world_size={world_size!r})"
        raise InvalidArgumentError(msg)
    size = parse_positive_int(world_size, "world_size")
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or not 0 <= rank < size:
        msg = f"rank must be an integer in 0..{size - 1} (world_size={size}), got {rank!r}"
        raise InvalidArgumentError(msg)
    return int(rank), size
