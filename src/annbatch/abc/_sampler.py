"""The sampler contract: which rows are read together, and how they are cut into batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(frozen=True, slots=True)
class LoadRequest:
    """One window of rows that the Loader reads into memory together.

    The rows of ``chunks`` are read in the order given and laid out one after the other in
    memory; ``splits`` then index into that layout.
    """

    chunks: list[slice]
    """Row ranges over the global row space (all datasets, in the order they were added)."""
    splits: list[np.ndarray] | None = None
    """Positions into the loaded rows, one integer array per batch, in yield order.
    ``None`` means consecutive batches of the sampler's ``batch_size``, the last one smaller."""

    @property
    def n_rows(self) -> int:
        """Number of rows the request loads."""
        return sum(s.stop - s.start for s in self.chunks)


class Sampler(ABC):
    """Turns a number of rows into a stream of :class:`LoadRequest`.

    Subclasses implement :meth:`_sample`, :attr:`batch_size`, :attr:`shuffle` and
    :meth:`n_batches`. The public :meth:`sample` validates what ``_sample`` yields, so that a
    faulty sampler fails with a clear message rather than yielding wrong rows.
    """

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Number of rows per batch (the last batch of an epoch may be smaller)."""

    @property
    @abstractmethod
    def shuffle(self) -> bool:
        """Whether the sampler draws a random order."""

    @abstractmethod
    def n_batches(self, n_obs: int) -> int:
        """Number of batches one epoch over ``n_obs`` rows yields."""

    @abstractmethod
    def _sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield the load requests of one epoch over rows ``0..n_obs-1``."""

    def validate(self, n_obs: int) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Raise if this sampler cannot serve ``n_obs`` rows. Called before any data is read."""

    def reseed(self, seed: int) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Re-seed the sampler's randomness from ``seed`` combined with its own state.

        The Loader calls this in every DataLoader worker with a seed that all workers of one
        epoch share and that changes between epochs, so the workers agree on one order and the
        next epoch draws a new one. Samplers without randomness ignore it.
        """

    def set_epoch(self, epoch: int) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Draw epoch ``epoch`` next. Samplers without randomness ignore it."""

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`load_state_dict` needs to draw the next epoch again, identically.

        Samplers that can be resumed override both; this default raises.
        """
        msg = (
            f"{type(self).__name__} cannot be resumed: it does not implement state_dict and "
            "load_state_dict"
        )
        raise InvalidArgumentError(msg)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; see there."""
        self.state_dict()  # raises for samplers that cannot be resumed

    def sample(self, n_obs: int) -> Iterator[LoadRequest]:
        """Yield the load requests of one epoch, checking each one.

        Parameters
        ----------
        n_obs
            Number of rows in the global row space.
        """
        if n_obs < 0:
            msg = f"n_obs must be >= 0, got {n_obs}"
            raise InvalidArgumentError(msg)
        self.validate(n_obs)
        if self._trusted:
            yield from self._sample(n_obs)
            return
        for i, request in enumerate(self._sample(n_obs)):
            _check_request(request, n_obs, position=i)
            yield request

    _trusted = False
    """annbatch's own samplers (their requests are property-tested) skip the per-request
    checks, which cost a Python step per chunk; every other sampler is checked."""


def _check_request(request: LoadRequest, n_obs: int, *, position: int) -> None:
    where = f"load request {position} of the sampler"
    if not isinstance(request, LoadRequest):
        msg = f"{where} is a {type(request).__name__}; expected annbatch.abc.LoadRequest"
        raise InvalidArgumentError(msg)
    for chunk in request.chunks:
        if not isinstance(chunk, slice) or chunk.step not in (None, 1):
            msg = f"{where} has chunk {chunk!r}; expected a slice with step 1"
            raise InvalidArgumentError(msg)
        if chunk.start is None or chunk.stop is None or not 0 <= chunk.start <= chunk.stop <= n_obs:
            msg = f"{where} has chunk {chunk!r}; expected 0 <= start <= stop <= n_obs = {n_obs}"
            raise InvalidArgumentError(msg)
    if request.splits is None:
        return
    n_rows = request.n_rows
    for split in request.splits:
        if split.ndim != 1 or not np.issubdtype(split.dtype, np.integer):
            msg = f"{where} has a split of dtype {split.dtype} and shape {split.shape}; expected a 1-D integer array"
            raise InvalidArgumentError(msg)
        if split.size and (split.min() < 0 or split.max() >= n_rows):
            msg = f"{where} has a split with positions outside 0..{n_rows - 1} (the rows it loads)"
            raise InvalidArgumentError(msg)
