"""Resume: where an interrupted epoch stands, and which epoch may consume it.

A :class:`ResumePoint` is one value: the sampler's state at the start of an epoch and the
number of that epoch's batches already consumed. :class:`Progress` holds the Loader's pending
point (from ``load_state_dict``) and the epoch running in this process. A pending point is
consumed by the epoch it belongs to only: the epoch whose sampler state at its start equals
the point's. That rule holds wherever the epoch runs. The Loader in the main process of a
``DataLoader`` with workers never iterates, so its pending point travels to every epoch's
workers; those of later epochs (after ``set_epoch``) start from another sampler state and
leave it alone, and ``set_epoch`` drops a point that no longer belongs to the next epoch.
:func:`start_epoch` begins an epoch (in DataLoader workers, with the seed they share), and
:class:`Resumable` is the Loader's public side of all this (``state_dict`` and the rest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._args import parse_int
from annbatch._core.workers import current_shard, join_queue_feeders_at_exit
from annbatch.errors import InvalidArgumentError, LoaderBusyError

if TYPE_CHECKING:
    from collections.abc import Callable

    from annbatch.abc import Sampler

    EpochOf = Callable[[dict[str, Any]], object]


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """An epoch's sampler state at its start and the number of its batches consumed."""

    sampler: dict[str, Any]
    """What the sampler's ``state_dict()`` returned when the epoch began."""
    batches_done: int
    """Batches of the epoch (all DataLoader workers together) consumed so far."""

    @classmethod
    def parse(cls, state: object) -> ResumePoint:
        """The point that ``Loader.state_dict()`` returned as a dict; an error for anything
        else."""
        if not isinstance(state, dict) or not {"sampler", "batches_done"} <= state.keys():
            msg = f"expected the dict of Loader.state_dict(), got {state!r}"
            raise InvalidArgumentError(msg)
        if not isinstance(state["sampler"], dict):
            msg = f"state['sampler'] must be the dict of a sampler's state_dict(), got {state['sampler']!r}"
            raise InvalidArgumentError(msg)
        done = parse_int(state["batches_done"], "state['batches_done']", minimum=0, numpy=False)
        return cls(sampler=state["sampler"], batches_done=done)

    def as_dict(self) -> dict[str, Any]:
        """The form ``Loader.state_dict()`` returns."""
        return {"sampler": self.sampler, "batches_done": self.batches_done}

    def belongs_to(self, sampler_state: dict[str, Any] | None, epoch_of: EpochOf) -> bool:
        """Whether an epoch that starts from ``sampler_state`` is the one this point is in;
        ``epoch_of``: what of a state names its epoch (the sampler's ``_epoch_of``)."""
        if sampler_state is None:
            return False
        return same_state(epoch_of(self.sampler), epoch_of(sampler_state))


def same_state(a: object, b: object) -> bool:
    """Equality of two sampler states (nested dicts, lists, numbers, numpy arrays)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class Progress:
    """The Loader's position in its epochs: a pending resume point and the running epoch.

    Methods are called by the Loader as epochs begin, hand over batches and end; the state
    it reports (:meth:`current`) is the running epoch's if one began in this process and did
    not end, else the pending point while it still belongs to the next epoch, else the start
    of the next epoch.
    """

    __slots__ = ("_done", "_pending", "_running")

    def __init__(self) -> None:
        self._pending: ResumePoint | None = None
        self._running: dict[str, Any] | None = None  # sampler state when this epoch began
        self._done = 0  # batches of the running epoch handed over (resumed ones included)

    @property
    def pending(self) -> ResumePoint | None:
        """The point loaded by ``load_state_dict`` and not consumed yet."""
        return self._pending

    def load(self, point: ResumePoint) -> None:
        """Resume from ``point`` in the epoch it belongs to; forgets the running epoch."""
        self._pending, self._running, self._done = point, None, 0

    def begin(self, start: dict[str, Any] | None, epoch_of: EpochOf) -> int:
        """An epoch begins from sampler state ``start`` (None: the sampler has no state).
        Returns the batches it skips: those of the pending point if it belongs to this
        epoch (the point is then consumed), else 0 (and a pending point is dropped)."""
        point, self._pending = self._pending, None
        skip = point.batches_done if point is not None and point.belongs_to(start, epoch_of) else 0
        self._running, self._done = start, skip
        return skip

    def handed_over(self) -> None:
        """One more batch of the running epoch was handed to the consumer."""
        self._done += 1

    def end(self) -> None:
        """The running epoch yielded its last batch."""
        self._running, self._done = None, 0

    def current(
        self, next_state: dict[str, Any], batches_seen: int | None, epoch_of: EpochOf
    ) -> ResumePoint:
        """Where training stands; ``next_state``: the sampler's state now (the start of the
        next epoch when none is running); ``batches_seen``: the caller's count of consumed
        batches of the current epoch, resumed ones included (None: this process's count)."""
        if self._running is not None:
            point = ResumePoint(self._running, self._done)
        elif self._pending is not None and self._pending.belongs_to(next_state, epoch_of):
            point = self._pending
        else:
            point = ResumePoint(next_state, 0)
        if batches_seen is None:
            return point
        return ResumePoint(point.sampler, batches_seen)

    def for_worker(self) -> Progress:
        """What a DataLoader worker starts from: the pending point, no running epoch."""
        copy = Progress()
        copy._pending = self._pending
        return copy


class Resumable:
    """The resume protocol of the Loader (as torchdata's stateful iterators have it):
    :meth:`set_epoch`, :meth:`state_dict` and :meth:`load_state_dict`, over its sampler and
    its :class:`Progress`."""

    _sampler: Sampler
    _progress: Progress
    _active_iterations: int

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch`` next; forwarded to the sampler (see
        :meth:`annbatch.ChunkSampler.set_epoch`). Call it before every epoch when ranks or
        DataLoader workers read, as with ``torch.utils.data.DistributedSampler``."""
        self._sampler.set_epoch(epoch)

    def state_dict(self, batches_seen: int | None = None) -> dict[str, Any]:
        """Where training stands: the sampler's state at the start of the current epoch and
        the number of its batches already consumed.

        :meth:`load_state_dict` on a Loader over the same data then yields exactly the rest
        of that epoch (none of its rows twice), and later epochs as they would have been.
        After :meth:`load_state_dict`, the loaded state is returned until the epoch it
        belongs to begins, so a second interruption before the first batch loses nothing.

        Parameters
        ----------
        batches_seen
            Batches of the current epoch that training consumed, those consumed before a
            resume included. Default: the number this Loader yielded, which is right when it
            is iterated in this process. Under a ``DataLoader`` with workers, the Loader in
            this process does not see the batches: pass the count taken from the DataLoader,
            and call :meth:`set_epoch` before each epoch, so that the workers' order depends
            on the epoch alone (resuming without it is an error in the workers).
        """
        if batches_seen is not None:
            batches_seen = parse_int(batches_seen, "batches_seen", minimum=0, numpy=False)
        now = self._sampler.state_dict()  # raises for samplers that cannot be resumed
        return self._progress.current(now, batches_seen, self._sampler._epoch_of).as_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the epoch it was taken in yields its remaining
        batches only, wherever it runs (this process, DataLoader workers); later epochs are
        whole."""
        if self._active_iterations:
            msg = "cannot load a state while the Loader is being iterated"
            raise LoaderBusyError(msg)
        point = ResumePoint.parse(state)
        self._sampler.load_state_dict(point.sampler)
        self._progress.load(point)


def start_epoch(sampler: Sampler, progress: Progress) -> int:
    """An epoch of ``sampler`` begins in this process: record it in ``progress`` and, inside a
    DataLoader worker, re-seed the sampler with the seed all workers of the epoch share.
    Returns the batches the epoch skips (those consumed before a resume)."""
    try:
        start: dict[str, Any] | None = sampler.state_dict()
    except InvalidArgumentError:  # a sampler that cannot be resumed
        start = None
    skip = progress.begin(start, sampler._epoch_of)
    shard = current_shard()
    if shard.seed is not None:
        join_queue_feeders_at_exit()  # an epoch ended early must not abort the worker
        # DataLoader workers: one order for all workers of the epoch, a new one each epoch.
        sampler.reseed(shard.seed)
        if skip and not same_state(sampler.state_dict(), start):
            msg = (
                "cannot resume under DataLoader workers: the sampler's order depends on "
                "the DataLoader's seed of this epoch, which the interrupted run had drawn "
                "differently; call loader.set_epoch(epoch) before every epoch (in the run "
                "that saves the state and in the one that resumes)"
            )
            raise InvalidArgumentError(msg)
    return skip
