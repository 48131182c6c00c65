"""The object-storage transport: a window's byte ranges fetched concurrently through obstore.

Object stores (S3, GCS, Azure, MinIO, SeaweedFS...) answer each request after tens of
milliseconds and reward many requests in flight. :class:`ObjectStoreTransport` reads the
layouts the chunk reader reads (zarr's ``ObjectStore`` over an obstore store), fetching apart
from decoding, so that the link never waits for the decoder. When a window's tasks are made
(:meth:`ObjectStoreTransport.task`), each task's fetch starts on the process's fetch loop
(:mod:`~annbatch._core.chunks.fetch_loop`), in task order:

1. the shard indexes the task needs are fetched (one ranged GET each; each index once for all
   tasks, on a gate of its own so that it never waits behind data requests) and cached for the
   life of the array;
2. each wanted chunk becomes a byte range: a compressed chunk (or one whose checksum is to be
   verified) whole; an uncompressed chunk only the wanted rows' bytes; ranges of one object
   closer than :data:`MERGE_GAP` bytes are merged into one request;
3. the requests run at most ``in_flight`` at a time in the process (:data:`DEFAULT_IN_FLIGHT`,
   or the environment variable :data:`IN_FLIGHT_VARIABLE`), with obstore's retries and
   timeouts; the first that fails cancels the task's others;
4. the task, run on a read thread, waits for its own bytes only, puts uncompressed rows in
   place and hands whole chunks to the reader's decode loop (the one local reads use), while
   later tasks' bytes arrive.

Every wait for bytes is bounded: past :data:`TIMEOUT_VARIABLE` seconds (default
:data:`DEFAULT_TIMEOUT_S`) it cancels its requests and raises
:class:`~annbatch.errors.StoreTimeoutError` naming the URL. In a process forked after its
parent used object storage, where obstore cannot work, a read raises
:class:`~annbatch.errors.ForkedRemoteReadError` before any request
(:mod:`annbatch._core.fork_guard`).

A window's fetched bytes wait in memory until their task decodes them (then they are freed):
at most the window's encoded size, and little when decoding keeps up with the link. A window
abandoned or failed cancels the requests of its tasks (the reader tells them; a task dropped
unrun does too).
"""

from __future__ import annotations

import asyncio
import os
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import obstore
from obstore.exceptions import NotFoundError

from annbatch._core.chunks.fetch_loop import gather, on_fetch_thread, submit
from annbatch._core.fork_guard import (
    SPAWN_HINT,
    check_not_forked,
    forked_after_import,
    note_remote_use,
)
from annbatch._stores import object_url
from annbatch.errors import CorruptChunkError, InvalidArgumentError, StoreTimeoutError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator, Sequence
    from concurrent.futures import Future

    from annbatch._core.chunks.reader import ChunkReader
    from annbatch._core.chunks.transport import Work

T = TypeVar("T")

DEFAULT_IN_FLIGHT = 32
"""Data requests in flight at once in each process, every array together (shard indexes have
a gate of their own); measured against 8 and 128 in ``benchmarks/RESULTS.md``."""
_MISSING = (NotFoundError, FileNotFoundError)
"""What obstore raises for an object that does not exist (a chunk never written)."""
MERGE_GAP = 256 * 1024
"""Ranges of one object at most this many bytes apart are fetched as one request: at 200 MB/s
and 20 ms per request, 256 KB costs less time than a request of its own."""


IN_FLIGHT_VARIABLE = "ANNBATCH_REMOTE_IN_FLIGHT"
"""The environment variable that sets the requests in flight per process (it reaches DataLoader
workers and DDP ranks with the environment)."""


def in_flight_setting() -> int:
    """Requests in flight per process: :data:`IN_FLIGHT_VARIABLE` if set, else the default."""
    return _setting(
        IN_FLIGHT_VARIABLE,
        DEFAULT_IN_FLIGHT,
        int,
        lambda value: 1 <= value <= 1024,
        "an integer from 1 to 1024 (requests in flight per process)",
    )


def _setting(
    variable: str,
    default: T,
    parse: Callable[[str], T],
    valid: Callable[[T], bool],
    expected: str,
) -> T:
    """The value of the environment variable ``variable`` (``default`` if unset or blank);
    one that ``parse`` refuses or ``valid`` rejects is an error saying it must be ``expected``."""
    raw = os.environ.get(variable)
    if raw is None or not raw.strip():
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        msg = f"{variable} must be {expected}, got {raw!r}"
        raise InvalidArgumentError(msg)
    return value


TIMEOUT_VARIABLE = "ANNBATCH_REMOTE_TIMEOUT"
"""The environment variable that sets how long a read waits for object storage, in seconds."""
DEFAULT_TIMEOUT_S = 300.0
"""Seconds a read waits for its bytes before :class:`~annbatch.errors.StoreTimeoutError`:
longer than obstore's own retries of a stalled request take by default (30 s per attempt,
at most 3 minutes of retries), so that this bound only ends waits nothing else would end."""


def timeout_setting() -> float:
    """Seconds a read waits for its bytes: :data:`TIMEOUT_VARIABLE` if set, else the default."""
    return _setting(
        TIMEOUT_VARIABLE,
        DEFAULT_TIMEOUT_S,
        float,
        lambda value: 0 < value <= 86400,  # nan and inf fail too
        "a number of seconds above 0 and at most 86400 (how long a read waits for object storage)",
    )


class ObjectStoreTransport:
    """Chunks of a zarr array in object storage (see the module docstring).

    Parameters
    ----------
    store
        The obstore store the array is in.
    root
        The array's key prefix in ``store``.
    """

    def __init__(self, store: Any, root: str) -> None:
        self.store = store
        self.root = root
        self.in_flight = in_flight_setting()
        self.timeout = timeout_setting()
        note_remote_use()  # zarr read this array's metadata through obstore here

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers, DDP ranks
        names = ("store", "root", "in_flight", "timeout")
        return {k: getattr(self, k) for k in names}  # not the fetch loop's pending indexes

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def url(self) -> str:
        """The array's URL (bucket, prefix and key; never credentials), as named in errors."""
        return object_url(self.store, self.root)

    # ------------------------------------------------------------------------ the Transport
    def read_index(self, path: str, nbytes: int, *, at_end: bool) -> tuple[bytes, int] | None:
        get = _get_index(self.store, path, nbytes, at_end=at_end)
        return self._call(get, lambda: f"the shard index of {path}")

    def task(self, reader: ChunkReader, work: Work) -> Prefetched:
        """A task whose requests start now (tasks are made in order, so requests start in
        task order); run, it waits for its own bytes only."""
        return Prefetched(self, reader, work, self._start(self._fetch(reader, work)))

    # ------------------------------------------------------------------------------ waiting
    def _start(self, coroutine: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Start ``coroutine`` on this process's fetch loop; in a process forked after its
        parent used object storage, raise ForkedRemoteReadError instead (it would hang)."""
        try:
            check_not_forked(self.url)
        except BaseException:
            coroutine.close()
            raise
        return submit(coroutine)

    def wait(self, future: Future[Any], what: Callable[[], str]) -> Any:
        """``future``'s result, waited for at most :attr:`timeout` seconds; past that, its
        requests are cancelled and StoreTimeoutError names the URL and ``what()`` was read."""
        try:
            return future.result(self.timeout)
        except TimeoutError:
            if future.done():  # the read itself raised TimeoutError: not our bound
                raise
            future.cancel()
            hint = f"; {SPAWN_HINT}" if forked_after_import() else ""
            msg = f"{self.url()} did not answer within {self.timeout:g} s ({TIMEOUT_VARIABLE}) while reading {what()}: the server or the network stalled{hint}"
            raise StoreTimeoutError(msg) from None

    def _call(self, coroutine: Coroutine[Any, Any, Any], what: Callable[[], str]) -> Any:
        """Run ``coroutine`` on the fetch loop and wait for its result (from any other thread)."""
        if on_fetch_thread():
            coroutine.close()
            msg = "annbatch bug: a blocking read on the fetch loop's own thread would never finish"
            raise RuntimeError(msg)
        return self.wait(self._start(coroutine), what)

    # ----------------------------------------------------------------------------- fetching
    async def _fetch(
        self, reader: ChunkReader, work: Work
    ) -> list[tuple[list[Any], list[tuple[int, int, int]], list[memoryview | None]]]:
        """On the fetch loop: the shard indexes that ``work`` needs (each fetched once for all
        tasks), then its bytes. Returns (requests, their uses, their bytes) for
        :func:`_fetched` in a list that the task empties once it has decoded them: the future
        holding the list lives until the whole window is read, the bytes need not."""
        await self._indexes_for(reader, work.chunk)
        requests, uses = _plan(reader, work)
        merged = _merge(requests)
        bodies = await _get_merged(self.store, merged, self.in_flight)
        return [(requests, uses, _split(requests, merged, bodies))]

    async def _indexes_for(self, reader: ChunkReader, chunks: np.ndarray) -> None:
        """Fetch the shard indexes of ``chunks`` not cached yet, each once however many tasks
        ask for it at the same time (on the fetch loop)."""
        layout = reader.layout
        if not layout.index_entries:
            return
        loop = asyncio.get_running_loop()
        if getattr(self, "_pending_loop", None) is not loop:  # a new process's loop
            self._pending_loop = loop
            self._pending: dict[int, asyncio.Future[None]] = {}
        shards = sorted({int(c) // layout.chunks_per_shard for c in np.unique(chunks)})
        wanted = [shard for shard in shards if not reader.has_index(shard)]
        pending = self._pending
        for shard in wanted:
            if shard not in pending:
                future = pending[shard] = asyncio.ensure_future(self._index_of(reader, shard))
                # Done, it is cached (or failed: the next window asks again).
                future.add_done_callback(partial(_forget, pending, shard))
        # Shielded: a task cancelled while waiting does not cancel the others' index.
        await asyncio.gather(*(asyncio.shield(pending[shard]) for shard in wanted))

    async def _index_of(self, reader: ChunkReader, shard: int) -> None:
        layout = reader.layout
        path = reader.shard_path(shard)
        get = _get_index(self.store, path, layout.index_nbytes, at_end=layout.index_at_end)
        (found,) = await gather([get], self.in_flight, kind="index")
        reader.keep_index(shard, path, found)


def _forget(pending: dict[int, Any], shard: int, _: object) -> None:
    pending.pop(shard, None)


class Prefetched:
    """A read task whose requests were started when it was made: run, it waits for them,
    then decodes (on a read thread). Dropped unrun, it cancels them."""

    __slots__ = ("__weakref__", "future", "reader", "transport", "work")

    def __init__(
        self, transport: ObjectStoreTransport, reader: ChunkReader, work: Work, future: Future[Any]
    ) -> None:
        self.transport, self.reader, self.work, self.future = transport, reader, work, future
        weakref.finalize(self, future.cancel)

    def cancel(self) -> None:
        """Cancel the requests (a window abandoned, or failed, before this task ran)."""
        self.future.cancel()

    def __call__(self) -> None:
        reader, work = self.reader, self.work
        with reader.read_errors(work):
            first = int(work.chunk[0])
            what = lambda: f"{reader.chunk_name(first)} and the chunks after it"  # noqa: E731
            requests, uses, fetched = self.transport.wait(
                self.future, what
            ).pop()  # freed once decoded
            reader.decode(work, _fetched(reader, work, requests, uses, fetched))
        work.check_filled()


def _plan(
    reader: ChunkReader, work: Work
) -> tuple[list[tuple[str, int, int]], list[tuple[int, int, int]]]:
    """The requests that ``work`` needs: (object, offset, nbytes; -1: whole object), and what
    each serves: (first piece, last piece or -1: that one piece's rows only, chunk). A chunk
    never written gets an empty request, used as (first, -2 - last, chunk)."""
    chunk, src_lo, src_hi = work.chunk, work.src_lo, work.src_hi
    layout = reader.layout
    shape = reader.shape
    rows = layout.rows_per_chunk
    row_bytes = reader.row_bytes
    partial = (
        layout.chunk_shape[1:] == shape[1:]  # chunks hold whole rows
        and layout.compressor is None
        and work.out.flags.c_contiguous
        and not reader.verify_checksums
    )
    stored_raw = rows * row_bytes + (4 if layout.checksum else 0)
    requests: list[tuple[str, int, int]] = []
    uses: list[tuple[int, int, int]] = []
    for i, j in zip(*work.chunk_bounds(), strict=True):
        c = int(chunk[i])
        where = reader.locate(c)
        if where is None:  # never written
            requests.append(("", 0, 0))
            uses.append((i, -2 - j, c))
            continue
        path, base, nbytes = where
        wanted = int((src_hi[i:j] - src_lo[i:j]).sum())
        whole = wanted == min(rows, shape[0] - c * rows)
        if partial and nbytes >= 0 and not (layout.checksum and whole):
            if nbytes != stored_raw:
                msg = f"{reader.where(c)} holds {nbytes} bytes, not the {stored_raw} of an uncompressed chunk; the store is damaged or truncated"
                raise CorruptChunkError(msg)
            for k in range(i, j):  # only the wanted rows' bytes
                n = int(src_hi[k] - src_lo[k]) * row_bytes
                requests.append((path, base + int(src_lo[k]) * row_bytes, n))
                uses.append((k, -1, c))
        else:
            requests.append((path, base, nbytes))
            uses.append((i, j, c))
    return requests, uses


def _fetched(
    reader: ChunkReader,
    work: Work,
    requests: Sequence[tuple[str, int, int]],
    uses: Sequence[tuple[int, int, int]],
    fetched: Sequence[memoryview | None],
) -> Iterator[tuple[int, int, int, memoryview | None]]:
    """The bytes fetched for :func:`_plan`'s requests: a piece of uncompressed rows put in
    place here, whole chunks checked for size and handed to the decode loop."""
    out, src_lo, src_hi, dst = work.out, work.src_lo, work.src_hi, work.dst
    dtype, tail = reader.dtype, reader.shape[1:]
    for (i, j, c), (_, _, nbytes), data in zip(uses, requests, fetched, strict=True):
        if j <= -2 or data is None:  # never written, or deleted since its index was read
            yield i, (-2 - j if j <= -2 else i + 1 if j < 0 else j), c, None
            continue
        if j < 0:  # one piece of rows, raw
            if len(data) != nbytes:
                msg = f"{reader.where(c)} ends before the rows it stores (the object is truncated); the store is damaged"
                raise CorruptChunkError(msg)
            at = int(dst[i])
            n = int(src_hi[i] - src_lo[i])
            if out.dtype == dtype:
                out[at : at + n].reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
            else:  # narrow values (annbatch._narrow), widened into place
                out[at : at + n] = np.frombuffer(data, dtype).reshape(n, *tail)
            continue
        if nbytes >= 0 and len(data) != nbytes:
            msg = f"{reader.where(c)} ends after {len(data)} of its {nbytes} bytes; the store is damaged or truncated"
            raise CorruptChunkError(msg)
        yield i, j, c, data


# ------------------------------------------------------------------------------ the requests
async def _get_index(
    store: Any, path: str, nbytes: int, *, at_end: bool
) -> tuple[bytes, int] | None:
    """(a shard's index bytes, the shard's size) or None: no such object."""
    options: Any = {"range": {"suffix": nbytes} if at_end else (0, nbytes)}
    try:
        result = await obstore.get_async(store, path, options=options)
        raw = bytes(await result.bytes_async())
    except _MISSING:
        return None
    return raw, int(result.meta["size"])


async def _get_merged(
    store: Any, merged: Sequence[tuple[str, int, int, list[int]]], limit: int
) -> list[Any]:
    """The bodies of :func:`_merge`'s requests (None: no such object; an empty path: a chunk
    never written, not fetched)."""

    async def get(path: str, begin: int, end: int) -> Any:
        if not path:
            return None
        try:
            if end < 0:
                result = await obstore.get_async(store, path)
                return await result.bytes_async()
            return await obstore.get_range_async(store, path, start=begin, end=end)
        except _MISSING:
            return None

    return await gather([get(path, begin, end) for path, begin, end, _ in merged], limit)


def _merge(requests: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int, list[int]]]:
    """Ranged requests of one object closer than :data:`MERGE_GAP` merged: (object, start,
    end, the requests it serves). Whole-object requests (nbytes -1) stay alone."""
    merged: list[tuple[str, int, int, list[int]]] = []
    order = sorted(range(len(requests)), key=lambda k: (requests[k][0], requests[k][1]))
    for k in order:
        path, offset, nbytes = requests[k]
        if nbytes < 0 or not path:
            merged.append((path, 0, -1, [k]))
            continue
        last = merged[-1] if merged else None
        if last is not None and last[0] == path and last[2] >= 0 and offset - last[2] <= MERGE_GAP:
            merged[-1] = (path, last[1], max(last[2], offset + nbytes), [*last[3], k])
        else:
            merged.append((path, offset, offset + nbytes, [k]))
    return merged


def _split(
    requests: Sequence[tuple[str, int, int]],
    merged: Sequence[tuple[str, int, int, list[int]]],
    bodies: Sequence[Any],
) -> list[memoryview | None]:
    """The bytes of each request, cut from the merged requests' bodies."""
    out: list[memoryview | None] = [None] * len(requests)
    for (_, begin, end, served), body in zip(merged, bodies, strict=True):
        if body is None:
            continue
        view = memoryview(body)
        for k in served:
            _, offset, nbytes = requests[k]
            out[k] = view if end < 0 else view[offset - begin : offset - begin + nbytes]
    return out
