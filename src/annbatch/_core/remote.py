"""Direct chunk reads from object storage: a window's byte ranges, fetched concurrently.

Object stores (S3, GCS, Azure, MinIO, SeaweedFS...) answer each request after tens of
milliseconds and reward many requests in flight. :class:`RemoteArray` reads the same layouts as
:class:`~annbatch._core.direct.DirectArray` (zarr's ``ObjectStore`` over an obstore store), but
each read task first works out every byte range it needs, then fetches them all at once:

1. the shard indexes the task needs are fetched (one ranged GET each, concurrently) and cached
   for the life of the array;
2. each wanted chunk becomes a byte range: a compressed chunk (or one whose checksum is to be
   verified) whole; an uncompressed chunk only the wanted rows' bytes;
3. ranges of one object closer than :data:`MERGE_GAP` bytes are merged into one request, and
   the requests run concurrently, at most ``in_flight`` at a time per task
   (:data:`DEFAULT_IN_FLIGHT`, or the environment variable :data:`IN_FLIGHT_VARIABLE`),
   with obstore's retries and timeouts;
4. the fetched bytes are checked (size, CRC32C) and decoded exactly as local ones.

Decoding overlaps fetching across tasks: the read pool runs several tasks at once, and the
Loader's read-ahead loads the next window while the current one is consumed.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import obstore
from obstore.exceptions import NotFoundError

from annbatch._core.direct import DirectArray, _copy_pieces
from annbatch.errors import CorruptChunkError, InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_IN_FLIGHT = 16
"""Requests in flight per read task (a Loader runs about twice as many tasks as cores at once)."""
_MISSING = (NotFoundError, FileNotFoundError)
"""What obstore raises for an object that does not exist (a chunk never written)."""
MERGE_GAP = 256 * 1024
"""Ranges of one object at most this many bytes apart are fetched as one request: at 200 MB/s
and 20 ms per request, 256 KB costs less time than a request of its own."""


IN_FLIGHT_VARIABLE = "ANNBATCH_REMOTE_IN_FLIGHT"
"""The environment variable that sets the requests in flight per read task (it reaches
DataLoader workers and DDP ranks with the environment)."""


def in_flight_setting() -> int:
    """Requests in flight per read task: :data:`IN_FLIGHT_VARIABLE` if set, else the default."""
    raw = os.environ.get(IN_FLIGHT_VARIABLE)
    if raw is None or not raw.strip():
        return DEFAULT_IN_FLIGHT
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        msg = f"{IN_FLIGHT_VARIABLE} must be an integer from 1 to 1024 (requests in flight per read task), got {raw!r}"
        raise InvalidArgumentError(msg)
    return value


class RemoteArray(DirectArray):
    """Row ranges of a zarr array in object storage (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = in_flight_setting()

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers, DDP ranks
        return super().__getstate__() | {"in_flight": self.in_flight}

    def _read_index(self, path: str, nbytes: int) -> tuple[bytes, int] | None:
        return _run(_get_index(self._layout.store, path, nbytes, at_end=self._layout.index_at_end))

    def _run_unchecked(
        self, out: np.ndarray, pieces: tuple[np.ndarray, ...], start: int, stop: int
    ) -> None:
        chunk, src_lo, src_hi, dst = (p[start:stop] for p in pieces)
        layout = self._layout
        rows = layout.rows_per_chunk
        tail = self.shape[1:]
        row_bytes = self.dtype.itemsize * int(np.prod(tail, dtype=np.int64))
        row_chunks = layout.chunk_shape[1:] == tail  # chunks hold whole rows
        whole_rows = row_chunks and out.dtype == self.dtype
        partial = (
            row_chunks
            and layout.compressor is None
            and out.flags.c_contiguous
            and not self._verify_all
        )
        stored_raw = rows * row_bytes + (4 if layout.checksum else 0)
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        firsts = [0, *bounds.tolist()]
        lasts = [*bounds.tolist(), chunk.size]
        self._fetch_indexes({int(chunk[i]) for i in firsts})
        requests: list[tuple[str, int, int]] = []  # (object, offset, nbytes); nbytes -1: whole
        uses: list[tuple[int, int, int]] = []  # (first piece, last piece, chunk); -1: one piece
        for i, j in zip(firsts, lasts, strict=True):
            c = int(chunk[i])
            where = self._locate(c)
            if where is None:  # never written: the fill value
                self._fill_pieces(out, src_lo[i:j], src_hi[i:j], dst[i:j], c)
                continue
            path, base, nbytes = where
            wanted = int((src_hi[i:j] - src_lo[i:j]).sum())
            whole = wanted == min(rows, self.shape[0] - c * rows)
            if partial and nbytes >= 0 and not (layout.checksum and whole):
                if nbytes != stored_raw:
                    msg = f"{self._where(c)} holds {nbytes} bytes, not the {stored_raw} of an uncompressed chunk; the store is damaged or truncated"
                    raise CorruptChunkError(msg)
                for k in range(i, j):  # only the wanted rows' bytes
                    n = int(src_hi[k] - src_lo[k]) * row_bytes
                    requests.append((path, base + int(src_lo[k]) * row_bytes, n))
                    uses.append((k, -1, c))
            else:
                requests.append((path, base, nbytes))
                uses.append((i, j, c))
        fetched = _fetch(layout.store, requests, self.in_flight)
        scratch: np.ndarray | None = None
        for (i, j, c), (_, _, nbytes), data in zip(uses, requests, fetched, strict=True):
            if data is None:  # an object deleted since its index was read: the fill value
                hi = i + 1 if j < 0 else j
                self._fill_pieces(out, src_lo[i:hi], src_hi[i:hi], dst[i:hi], c)
                continue
            if j < 0:  # one piece of rows, raw
                if len(data) != nbytes:
                    msg = f"{self._where(c)} ends before the rows it stores (the object is truncated); the store is damaged"
                    raise CorruptChunkError(msg)
                at = int(dst[i])
                n = int(src_hi[i] - src_lo[i])
                if out.dtype == self.dtype:
                    out[at : at + n].reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
                else:  # narrow values (annbatch._narrow), widened into place
                    out[at : at + n] = np.frombuffer(data, self.dtype).reshape(n, *tail)
                continue
            if nbytes >= 0 and len(data) != nbytes:
                msg = f"{self._where(c)} ends after {len(data)} of its {nbytes} bytes; the store is damaged or truncated"
                raise CorruptChunkError(msg)
            encoded: Any = data
            if layout.checksum:
                encoded = self._verified(memoryview(data), c)
            if j == i + 1 and whole_rows and src_lo[i] == 0 and src_hi[i] == rows:
                self._decode(encoded, out[dst[i] : dst[i] + rows], c)
                continue
            if scratch is None:
                scratch = np.empty(layout.chunk_shape, dtype=self.dtype)
            self._decode(encoded, scratch, c)
            _copy_pieces(scratch, out, src_lo[i:j], src_hi[i:j], dst[i:j], tail)

    def _fetch_indexes(self, chunks: set[int]) -> None:
        """Fetch, concurrently, the shard indexes of ``chunks`` not cached yet."""
        layout = self._layout
        if not layout.index_entries:
            return
        shards = sorted({c // layout.chunks_per_shard for c in chunks} - set(self._indexes))
        if not shards:
            return
        paths = [self._shard_path(shard) for shard in shards]
        jobs = [
            _get_index(layout.store, p, layout.index_nbytes, at_end=layout.index_at_end)
            for p in paths
        ]
        for shard, path, found in zip(
            shards, paths, _run(_gather(jobs, self.in_flight)), strict=True
        ):
            self._keep_index(shard, path, found)


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


async def _gather(jobs: Sequence[Any], limit: int) -> list[Any]:
    """Await ``jobs`` (coroutines), at most ``limit`` at a time, results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Any) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


def _run(coroutine: Any) -> Any:
    """Run ``coroutine`` to completion on this (read) thread."""
    return asyncio.run(coroutine)


def _merge(requests: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int, list[int]]]:
    """Ranged requests of one object closer than :data:`MERGE_GAP` merged: (object, start,
    end, the requests it serves). Whole-object requests (nbytes -1) stay alone."""
    merged: list[tuple[str, int, int, list[int]]] = []
    order = sorted(range(len(requests)), key=lambda k: (requests[k][0], requests[k][1]))
    for k in order:
        path, offset, nbytes = requests[k]
        if nbytes < 0:
            merged.append((path, 0, -1, [k]))
            continue
        last = merged[-1] if merged else None
        if last is not None and last[0] == path and last[2] >= 0 and offset - last[2] <= MERGE_GAP:
            merged[-1] = (path, last[1], max(last[2], offset + nbytes), [*last[3], k])
        else:
            merged.append((path, offset, offset + nbytes, [k]))
    return merged


def _fetch(
    store: Any, requests: Sequence[tuple[str, int, int]], limit: int
) -> list[memoryview | None]:
    """The bytes of each request (None: the object does not exist), fetched concurrently."""
    if not requests:
        return []
    merged = _merge(requests)

    async def get(path: str, begin: int, end: int) -> Any:
        try:
            if end < 0:
                result = await obstore.get_async(store, path)
                return await result.bytes_async()
            return await obstore.get_range_async(store, path, start=begin, end=end)
        except _MISSING:
            return None

    bodies = _run(_gather([get(path, begin, end) for path, begin, end, _ in merged], limit))
    out: list[memoryview | None] = [None] * len(requests)
    for (_, begin, end, served), body in zip(merged, bodies, strict=True):
        if body is None:
            continue
        view = memoryview(body)
        for k in served:
            _, offset, nbytes = requests[k]
            out[k] = view if end < 0 else view[offset - begin : offset - begin + nbytes]
    return out
