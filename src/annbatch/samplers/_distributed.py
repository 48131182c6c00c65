"""DistributedSampler: one rank's disjoint, contiguous share of another sampler's rows."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._args import parse_bool, parse_mask
from annbatch.abc import Sampler
from annbatch.abc._sampler import check_mask
from annbatch.errors import ArgumentTypeError, DistributedNotInitializedError, InvalidArgumentError
from annbatch.samplers._epochs import EpochSampler

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from annbatch.abc._sampler import ChunkRequest


class DistributedSampler(Sampler):
    """Give each rank of a distributed job its own contiguous share of the rows, and let the
    wrapped sampler draw from that share.

    The rows the wrapped sampler may use (its :attr:`~annbatch.abc.Sampler.mask`, all rows by
    default) are cut into ``world_size`` consecutive shares; rank ``r`` takes share ``r``.
    Shares never overlap, so no row is read by two ranks in one epoch; rows do not move
    between ranks from one epoch to the next.

    The sampler given is left as it was (its mask, its generator and its state): the rank
    draws from a copy of it (:attr:`sampler`) whose mask is the rank's share, and whose
    generator is a copy of the given one in the same state.

    Parameters
    ----------
    sampler
        The sampler that draws within the share (any :class:`~annbatch.abc.Sampler` whose
        mask can be set: all of annbatch's).
    dist_info
        Where rank and world size come from, read here: ``"torch"`` (an initialized
        ``torch.distributed`` process group), ``"jax"`` (``jax.process_index()`` and
        ``jax.process_count()`` after ``jax.distributed.initialize``), or a callable
        returning ``(rank, world_size)``.
    enforce_equal_batches
        Cut every share to the same multiple of ``batch_size`` rows (the rows left over at the
        end are not used), so that every rank yields the same number of full batches and a
        collective operation never waits for a rank that ran out. Without it the shares
        differ by at most one row and cover every row.

    Notes
    -----
    :class:`~annbatch.samplers.ChunkSampler` can also split epochs among ranks itself (its
    ``rank`` and ``world_size``): every rank then reads from all rows, in a new order each
    epoch. Here each rank keeps its share, which suits node-local copies of the data.
    """

    _trusted = True  # the wrapped sampler's sample() checks its requests

    def __init__(
        self,
        sampler: Sampler,
        *,
        dist_info: str | Callable[[], tuple[int, int]] = "torch",
        enforce_equal_batches: bool = True,
    ) -> None:
        if not isinstance(sampler, Sampler):
            msg = f"DistributedSampler wraps an annbatch.abc.Sampler, got {type(sampler).__name__}"
            raise ArgumentTypeError(msg)
        self._rank, self._world_size = _dist_info(dist_info)
        self._equal = parse_bool(enforce_equal_batches, "enforce_equal_batches")
        self._mask = sampler.mask  # the rows to share out
        self._sampler = _rank_view(sampler)

    def __repr__(self) -> str:
        return (
            f"DistributedSampler({self._sampler!r}, rank={self._rank}, world_size={self._world_size}, "
            f"enforce_equal_batches={self._equal})"
        )

    @property
    def sampler(self) -> Sampler:
        """The rank's view of the wrapped sampler: a copy of the sampler given, drawing from
        this rank's share (the sampler given is not changed)."""
        return self._sampler

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks."""
        return self._world_size

    @property
    def batch_size(self) -> int:
        """The wrapped sampler's batch size."""
        return self._sampler.batch_size

    @property
    def shuffle(self) -> bool:
        """Whether the wrapped sampler shuffles."""
        return self._sampler.shuffle

    @property
    def mask(self) -> slice | np.ndarray | None:
        """The rows shared out among the ranks (None: all). Settable."""
        return self._mask

    @mask.setter
    def mask(self, value: slice | np.ndarray | None) -> None:
        self._refuse_while_sampling("mask")
        self._mask = parse_mask(value)

    @property
    def rng(self) -> np.random.Generator:
        """The generator of the rank's view (a copy of the wrapped sampler's). Settable."""
        return self._sampler.rng

    @rng.setter
    def rng(self, value: np.random.Generator | None) -> None:
        self._sampler.rng = value

    def share(self, n_obs: int) -> slice | np.ndarray:
        """This rank's rows among ``n_obs``: a slice, or a boolean array when the mask is one."""
        check_mask(self._mask, n_obs)
        if isinstance(self._mask, np.ndarray):
            allowed = np.flatnonzero(self._mask)
        else:
            start, stop, _ = (self._mask or slice(None)).indices(n_obs)
            allowed = None
        n_allowed = allowed.size if allowed is not None else max(0, stop - start)
        if self._equal:
            per = n_allowed // self._world_size
            per -= per % self.batch_size
            first, last = self._rank * per, (self._rank + 1) * per
        else:
            first = self._rank * n_allowed // self._world_size
            last = (self._rank + 1) * n_allowed // self._world_size
        if last <= first:
            msg = (
                f"rank {self._rank} of {self._world_size} gets no rows: {n_allowed} rows shared among "
                f"{self._world_size} ranks"
                + (f" in whole batches of {self.batch_size}" if self._equal else "")
            )
            raise InvalidArgumentError(msg)
        if allowed is None:
            return slice(start + first, start + last)
        mine = np.zeros(n_obs, dtype=bool)
        mine[allowed[first:last]] = True
        return mine

    def validate(self, n_obs: int) -> None:
        """Give the rank's view this rank's share; it checks the rest when it samples."""
        self._use_share(n_obs)

    def n_batches(self, n_obs: int) -> int:
        """Batches per epoch of this rank."""
        self._use_share(n_obs)
        return self._sampler.n_batches(n_obs)

    def _use_share(self, n_obs: int) -> None:
        """Set the view's mask to this rank's share of ``n_obs`` rows, unless it is that
        already (as during an epoch, when the Loader asks for its length)."""
        share, current = self.share(n_obs), self._sampler.mask
        same = (
            np.array_equal(share, current)
            if isinstance(share, np.ndarray) and isinstance(current, np.ndarray)
            else isinstance(share, slice) and share == current
        )
        if not same:
            self._sampler.mask = share

    def _sample(self, n_obs: int) -> Iterator[ChunkRequest]:
        yield from self._sampler._chunk_requests(n_obs)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the wrapped sampler."""
        self._sampler.set_epoch(epoch)

    def reseed(self, seed: int) -> None:
        """Forwarded to the wrapped sampler."""
        self._sampler.reseed(seed)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped sampler's state."""
        return self._sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped sampler's state."""
        self._sampler.load_state_dict(state)

    def _epoch_of(self, state: dict[str, Any]) -> object:
        return self._sampler._epoch_of(state)


def _rank_view(sampler: Sampler) -> Sampler:
    """A copy of ``sampler`` for one rank (its generator copied in the same state), with no
    pass running; annbatch's samplers are told not to split rows among ranks themselves."""
    try:
        view = copy.deepcopy(sampler)
    except Exception as e:
        msg = (
            f"DistributedSampler draws from a copy of the sampler it wraps (so that the "
            f"sampler given is left as it was), and copy.deepcopy of the "
            f"{type(sampler).__name__} failed: {e}"
        )
        raise ArgumentTypeError(msg) from e
    view._passes_running = 0
    if isinstance(view, EpochSampler):
        view._single_rank()  # this wrapper splits the rows, not the sampler itself
    return view


def _dist_info(dist_info: object) -> tuple[int, int]:
    """``(rank, world_size)`` from ``dist_info`` (see :class:`DistributedSampler`)."""
    if callable(dist_info):
        got = dist_info()
        if (
            not isinstance(got, tuple | list)
            or len(got) != 2
            or not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in got)
            or not 0 <= got[0] < got[1]
        ):
            msg = f"dist_info() must return (rank, world_size) with 0 <= rank < world_size, got {got!r}"
            raise InvalidArgumentError(msg)
        return int(got[0]), int(got[1])
    if dist_info == "torch":
        try:
            import torch
        except ImportError as e:
            msg = "dist_info='torch' needs torch; install it or pass a callable returning (rank, world_size)"
            raise ImportError(msg) from e
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            msg = (
                "dist_info='torch' but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first (or pass a callable returning (rank, world_size))"
            )
            raise DistributedNotInitializedError(msg)
        return int(dist.get_rank()), int(dist.get_world_size())
    if dist_info == "jax":
        try:
            import jax
        except ImportError as e:
            msg = "dist_info='jax' needs jax; install it or pass a callable returning (rank, world_size)"
            raise ImportError(msg) from e
        if not jax.distributed.is_initialized():
            msg = (
                "dist_info='jax' but jax.distributed is not initialized; call "
                "jax.distributed.initialize first (or pass a callable returning (rank, world_size))"
            )
            raise DistributedNotInitializedError(msg)
        return int(jax.process_index()), int(jax.process_count())
    msg = f"dist_info must be 'torch', 'jax' or a callable returning (rank, world_size), got {dist_info!r}"
    raise InvalidArgumentError(msg)
