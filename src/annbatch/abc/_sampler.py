"""The sampler contract: which rows are read together, and how they are cut into batches.

:class:`Sampler` is the base class; :class:`ChunkRequest` the internal form of a load request
(the public one is the plain dict :class:`annbatch.types.LoadRequest`), with the checks that
turn what a sampler yields into it, and the two helpers every sampler cuts requests with
(:func:`as_runs`, :func:`split_batches`). The reference's spellings (``n_iters``, the
``"chunks"`` key) come from :mod:`annbatch._reference`.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._args import parse_mask, parse_rng
from annbatch._core.ranges import runs_of
from annbatch._reference import SamplerAliases, rows_under_old_key
from annbatch.errors import InvalidArgumentError, SamplerBusyError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from annbatch.types import LoadRequest as PublicLoadRequest


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """One window of rows that the Loader reads into memory together: annbatch's internal
    form of a load request.

    The rows of ``chunks`` are read in the order given and laid out one after the other in
    memory; ``splits`` then index into that layout. The public form is the plain dict
    :class:`annbatch.types.LoadRequest`; :meth:`Sampler.sample` yields that, and the Loader
    turns it into this. A sampler's ``_sample`` may yield either (``annbatch.abc.LoadRequest``
    is the deprecated name of this class).
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


class Sampler(SamplerAliases, ABC):
    """Turns a number of rows into a stream of load requests.

    Subclasses implement :meth:`_sample`, :attr:`batch_size` and :attr:`shuffle`; they may
    override :meth:`n_batches` (the default draws an epoch on a copy to count its batches) and
    :meth:`validate`. ``_sample`` yields load requests as plain dicts
    (:class:`annbatch.types.LoadRequest`: ``"requests"`` as slices or an integer array of
    rows, optional ``"splits"``) or as annbatch's internal :class:`ChunkRequest` objects. The
    public :meth:`sample` validates what ``_sample`` yields, so that a faulty sampler fails
    with a clear message rather than yielding wrong rows, and yields plain dicts with
    ``"requests"`` and ``"splits"`` always present.
    """

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Number of rows per batch (the last batch of an epoch may be smaller)."""

    @property
    @abstractmethod
    def shuffle(self) -> bool:
        """Whether the sampler draws a random order (used where a request has no splits)."""

    @abstractmethod
    def _sample(self, n_obs: int) -> Iterator[ChunkRequest | Mapping[str, Any]]:
        """Yield the load requests of one epoch over rows ``0..n_obs-1``."""

    def n_batches(self, n_obs: int) -> int:
        """Number of batches one epoch over ``n_obs`` rows yields.

        This default draws one epoch from a copy of the sampler (its state is left as it is)
        and counts; samplers override it with arithmetic.
        """
        try:
            twin = copy.deepcopy(self)
        except Exception as e:
            msg = (
                f"{type(self).__name__} does not implement n_batches, and counting the batches of "
                f"an epoch drawn from a copy failed ({e}); implement n_batches(n_obs)"
            )
            raise InvalidArgumentError(msg) from e
        return sum(len(request.splits or ()) for request in twin._chunk_requests(n_obs))

    @property
    def mask(self) -> slice | np.ndarray | None:
        """The rows this sampler may draw from: a slice (step 1), a boolean array over all
        rows (annbatch's samplers), or None for all rows. Settable."""
        return getattr(self, "_mask", None)

    @mask.setter
    def mask(self, value: slice | np.ndarray | None) -> None:
        self._refuse_while_sampling("mask")
        self._mask = parse_mask(value)

    def _refuse_while_sampling(self, name: str) -> None:
        """Raise :class:`~annbatch.errors.SamplerBusyError` if a pass over this sampler (a
        :meth:`sample` iterator, or a Loader's epoch) is running: changing ``name`` then would
        change the rows of the pass half-way."""
        running = getattr(self, "_passes_running", 0)
        if running:
            msg = (
                f"cannot set {type(self).__name__}.{name} while a pass over the sampler is "
                f"running ({running} unfinished sample() iterator(s) or Loader epoch(s)); "
                "finish the pass (or close its iterator) first"
            )
            raise SamplerBusyError(msg)

    @property
    def rng(self) -> np.random.Generator:
        """The generator the sampler draws from. Settable (annbatch's samplers take one seed
        from a generator set here, as from their ``rng`` argument)."""
        rng = getattr(self, "_rng", None)
        if rng is None:
            rng = self._rng = np.random.default_rng()
        return rng

    @rng.setter
    def rng(self, value: np.random.Generator | None) -> None:
        self._rng = parse_rng(value)

    def validate(self, n_obs: int) -> None:
        """Raise a ``ValueError`` if this sampler cannot serve ``n_obs`` rows.

        Called by :meth:`sample` (so by the Loader when iteration starts), before any data is
        read. The default checks the :attr:`mask` against ``n_obs``.
        """
        check_mask(self.mask, n_obs)

    def reseed(self, seed: int) -> None:
        """Re-seed the sampler's randomness from ``seed`` combined with its own state.

        The Loader calls this in every DataLoader worker with a seed that all workers of one
        epoch share and that changes between epochs, so the workers agree on one order and the
        next epoch draws a new one. Samplers without randomness ignore it.
        """

    def set_epoch(self, epoch: int) -> None:
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

    def _epoch_of(self, state: dict[str, Any]) -> object:
        """What of a :meth:`state_dict` names the epoch a sampler in that state draws next
        (a resumed epoch is the one whose state at its start names the same). Default: the
        whole state."""
        return state

    def sample(self, n_obs: int) -> Iterator[PublicLoadRequest]:
        """Yield the load requests of one epoch, checked, as plain dicts.

        Each is a :class:`annbatch.types.LoadRequest` with ``"requests"`` (a list of slices
        over the global row space, or an integer array of rows, as ``_sample`` gave them) and
        ``"splits"`` (one integer array per batch, positions into the rows in request order;
        filled in where ``_sample`` left it out: ``batch_size`` rows at a time, shuffled first
        if :attr:`shuffle`). While the iterator runs, :attr:`mask` cannot be set.

        Parameters
        ----------
        n_obs
            Number of rows in the global row space.
        """
        for request, given in self._pass(n_obs):
            yield given if given is not None else as_dict(request)

    def _chunk_requests(self, n_obs: int) -> Iterator[ChunkRequest]:
        """The load requests of one epoch in annbatch's internal form, splits always set:
        what the Loader reads (its boundary with the sampler).

        A subclass that replaced :meth:`sample` itself is read through it (its dicts are
        converted here); every other sampler skips the round trip through dicts.
        """
        if type(self).sample is not Sampler.sample:
            for i, item in enumerate(self.sample(n_obs)):
                yield self._convert(item, n_obs, position=i)[0]
            return
        for request, _ in self._pass(n_obs):
            yield request

    def _pass(self, n_obs: int) -> Iterator[tuple[ChunkRequest, PublicLoadRequest | None]]:
        """One checked epoch: each request in the internal form, and in the dict form where
        ``_sample`` gave a dict (None otherwise). Counts as a running pass while iterated."""
        if isinstance(n_obs, bool) or not isinstance(n_obs, int | np.integer) or n_obs < 0:
            msg = f"n_obs must be an integer >= 0, got {n_obs!r}"
            raise InvalidArgumentError(msg)
        n_obs = int(n_obs)
        self.validate(n_obs)
        self._passes_running = getattr(self, "_passes_running", 0) + 1
        try:
            if self._trusted:
                for request in self._sample(n_obs):  # ours: ChunkRequests with splits set
                    yield request, None  # type: ignore[misc]
                return
            for i, item in enumerate(self._sample(n_obs)):
                yield self._convert(item, n_obs, position=i)
        finally:
            self._passes_running -= 1

    def _convert(
        self, item: object, n_obs: int, *, position: int
    ) -> tuple[ChunkRequest, PublicLoadRequest | None]:
        """``item`` (a :class:`ChunkRequest` or a dict) checked, in the internal form with its
        splits filled in, and (for a dict) in the normalised dict form."""
        if isinstance(item, ChunkRequest):
            _check_request(item, n_obs, position=position)
            if item.splits is None:  # documented: consecutive batches, not shuffled
                item = ChunkRequest(
                    item.chunks, split_batches(np.arange(item.n_rows), self.batch_size)
                )
            return item, None
        return self._from_dict(item, n_obs, position=position)

    def _from_dict(
        self, request: object, n_obs: int, *, position: int
    ) -> tuple[ChunkRequest, PublicLoadRequest]:
        """A dict load request (:class:`annbatch.types.LoadRequest`) checked: in the internal
        form, and as a plain dict with ``"requests"`` and ``"splits"`` (filled in by
        :meth:`_default_splits` where missing)."""
        where = f"load request {position} of the sampler"
        if not isinstance(request, dict):
            msg = f"{where} is a {type(request).__name__}; expected a dict with 'requests' (annbatch.types.LoadRequest)"
            raise InvalidArgumentError(msg)
        unknown = set(request) - {"requests", "chunks", "splits"}
        if unknown:
            msg = f"{where} has unknown keys {sorted(map(str, unknown))}; expected 'requests' and optionally 'splits'"
            raise InvalidArgumentError(msg)
        if "chunks" in request:
            rows = rows_under_old_key(request, where)
        elif "requests" in request:
            rows = request["requests"]
        else:
            msg = f"{where} has no 'requests' key; expected a list of slices or an integer array of rows"
            raise InvalidArgumentError(msg)
        splits = request.get("splits")
        if splits is not None:
            if not isinstance(splits, list | tuple):
                msg = f"{where} has 'splits' of type {type(splits).__name__}; expected a list of integer arrays"
                raise InvalidArgumentError(msg)
            splits = [np.asarray(s) for s in splits]
        if isinstance(rows, np.ndarray):
            internal, splits = _positions_request(rows, splits, n_obs, where, self._default_splits)
            return internal, {"requests": rows, "splits": splits}
        if not isinstance(rows, list | tuple):
            msg = f"{where} has 'requests' of type {type(rows).__name__}; expected a list of slices or a numpy integer array"
            raise InvalidArgumentError(msg)
        chunks = list(rows)
        for chunk in chunks:
            if (
                isinstance(chunk, slice)
                and chunk.start is not None
                and chunk.stop is not None
                and chunk.stop <= chunk.start
            ):
                msg = f"{where} has an empty request {chunk!r}; every slice must hold rows"
                raise InvalidArgumentError(msg)
        _check_request(ChunkRequest(chunks, splits), n_obs, position=position)
        if splits is None:  # batch_size cuts, shuffled if shuffle
            splits = self._default_splits(sum(c.stop - c.start for c in chunks))
        return ChunkRequest(chunks, splits), {"requests": chunks, "splits": splits}

    def _default_splits(self, n_rows: int) -> list[np.ndarray]:
        """Batches of a request without splits: ``batch_size`` rows at a time, in a random
        order (:attr:`rng`) when :attr:`shuffle`."""
        order = self.rng.permutation(n_rows) if self.shuffle else np.arange(n_rows)
        return split_batches(order, self.batch_size)

    _trusted = False
    """annbatch's own samplers (their requests are property-tested) skip the per-request
    checks, which cost a Python step per chunk; every other sampler is checked."""


def as_dict(request: ChunkRequest) -> PublicLoadRequest:
    """The public (plain dict) form of an internal request whose splits are set."""
    return {"requests": list(request.chunks), "splits": list(request.splits or [])}


def split_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """``order`` (positions into a request's rows) cut into batches of ``batch_size``, the
    last one smaller."""
    return [order[i : i + batch_size] for i in range(0, order.size, batch_size)]


def as_runs(rows: np.ndarray) -> tuple[list[slice], np.ndarray]:
    """Row positions (any order, repeats allowed) as the runs of consecutive rows that hold
    them, in disk order, each row once; and each position's place in the rows of those runs
    laid out one after the other."""
    starts, stops, positions = runs_of(rows)
    return list(map(slice, starts.tolist(), stops.tolist())), positions


def check_mask(mask: slice | np.ndarray | None, n_obs: int) -> None:
    """Raise if ``mask`` does not fit ``n_obs`` rows."""
    if isinstance(mask, np.ndarray) and mask.size != n_obs:
        msg = f"mask has {mask.size} entries; the Loader has {n_obs} rows"
        raise InvalidArgumentError(msg)
    if isinstance(mask, slice) and (mask.stop or 0) > n_obs:
        msg = f"mask {mask!r} reaches past the Loader's {n_obs} rows"
        raise InvalidArgumentError(msg)
    if isinstance(mask, slice) and n_obs and (mask.start or 0) >= n_obs:
        msg = f"mask {mask!r} holds none of the Loader's {n_obs} rows"
        raise InvalidArgumentError(msg)


def _positions_request(
    rows: np.ndarray,
    splits: list[np.ndarray] | None,
    n_obs: int,
    where: str,
    default_splits: Any,
) -> tuple[ChunkRequest, list[np.ndarray]]:
    """A request of row positions (any order, repeats allowed) as runs of rows read in disk
    order, with its splits mapped from request order to that layout; and the splits in
    request order (``default_splits`` where none were given)."""
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        msg = f"{where} has 'requests' of dtype {rows.dtype} and shape {rows.shape}; expected a 1-D integer array of rows"
        raise InvalidArgumentError(msg)
    if rows.size == 0:
        msg = f"{where} has no rows"
        raise InvalidArgumentError(msg)
    if rows.min() < 0 or rows.max() >= n_obs:
        msg = f"{where} has rows outside 0..{n_obs - 1} (n_obs = {n_obs})"
        raise InvalidArgumentError(msg)
    chunks, layout = as_runs(rows)  # layout: request position -> position in the chunks
    if splits is None:
        splits = default_splits(rows.size)
    _check_splits(splits, rows.size, where, "requests")
    return ChunkRequest(chunks=chunks, splits=[layout[s] for s in splits]), splits


def _check_request(request: ChunkRequest, n_obs: int, *, position: int) -> None:
    where = f"load request {position} of the sampler"
    if not isinstance(request, ChunkRequest):
        msg = f"{where} is a {type(request).__name__}; expected a dict with 'requests' (annbatch.types.LoadRequest)"
        raise InvalidArgumentError(msg)
    if not isinstance(request.chunks, list | tuple):
        msg = (
            f"{where} has chunks of type {type(request.chunks).__name__}; expected a list of slices"
        )
        raise InvalidArgumentError(msg)
    for chunk in request.chunks:
        if not isinstance(chunk, slice) or chunk.step not in (None, 1):
            msg = f"{where} has chunk {chunk!r}; expected a slice with step 1"
            raise InvalidArgumentError(msg)
        if chunk.start is None or chunk.stop is None or not 0 <= chunk.start <= chunk.stop <= n_obs:
            msg = f"{where} has chunk {chunk!r}; expected 0 <= start <= stop <= n_obs = {n_obs}"
            raise InvalidArgumentError(msg)
    if request.splits is not None:
        _check_splits(request.splits, request.n_rows, where, "loads")


def _check_splits(splits: list[np.ndarray], n_rows: int, where: str, verb: str) -> None:
    """Every split is a 1-D integer array of positions into the ``n_rows`` rows the request
    ``verb`` ("loads", or "requests" for positions in request order)."""
    for split in splits:
        if split.ndim != 1 or not np.issubdtype(split.dtype, np.integer):
            msg = f"{where} has a split of dtype {split.dtype} and shape {split.shape}; expected a 1-D integer array"
            raise InvalidArgumentError(msg)
        if split.size and (split.min() < 0 or split.max() >= n_rows):
            msg = f"{where} has a split with positions outside 0..{n_rows - 1} (the rows it {verb})"
            raise InvalidArgumentError(msg)
