"""The chunk reader: rows of a zarr array, each chunk they touch decoded once, into place.

:class:`ChunkReader` reads many row ranges of an array whose layout
:mod:`~annbatch._core.chunks.layout` understands:

1. the ranges are mapped to the inner chunks they touch (vectorised; a chunk shared by
   several ranges is listed once), and those chunks are split into tasks (:class:`Work`)
   that run on a thread pool;
2. each task's transport (:mod:`~annbatch._core.chunks.transport`) gets the chunks' bytes:
   local files with ``os.pread`` or object storage through obstore, both releasing the GIL;
3. :meth:`ChunkReader.decode`, the one decode loop of both transports, checks each chunk
   (CRC32C, size) and decodes it with numcodecs: a chunk wanted whole straight into its place
   in the output, otherwise into scratch (an uncompressed one is viewed where it lies) and the
   wanted rows copied out.

This avoids the per-call cost of zarr-python's asynchronous read path, which dominates when a
window is made of hundreds of small ranges, and decodes at the codec's speed on every core.

What is read is checked before it is used: every shard index entry must lie inside its file,
a shard index's CRC32C is verified, and a chunk's CRC32C (the ``crc32c`` codec, which annbatch
collections carry) is verified whenever the whole chunk is read. Uncompressed chunks are read
in part (only the wanted rows' bytes): their checksum is verified only with
``verify_checksums=True``, which reads every touched chunk whole. Any failure raises an
:mod:`annbatch.errors` class naming the file and the chunk.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._core.chunks.codec import check_raw_size, crc32c, decode_into
from annbatch._core.chunks.descriptors import OPEN_FILES, new_owner
from annbatch._core.chunks.pieces import copy_pieces
from annbatch._core.chunks.transport import Work
from annbatch._core.failures import store_errors
from annbatch._core.ranges import expand_ranges
from annbatch.errors import ChecksumMismatchError, CorruptChunkError

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from annbatch._core.chunks.layout import Layout
    from annbatch._core.chunks.transport import Fetched, Transport

MISSING = np.iinfo(np.uint64).max  # shard index entry of an inner chunk that was never written


def chunk_pieces(
    starts: np.ndarray, stops: np.ndarray, rows: int, dst: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``starts[i]:stops[i]`` (sorted, disjoint) as pieces of one chunk of ``rows`` rows
    each, in chunk order: (chunk, first row in it, one past the last, row of the output where
    the piece lands). Range ``i`` lands at ``dst[i]``; without ``dst``, the ranges land one
    after another from row 0. Empty ranges make no piece."""
    starts = np.asarray(starts, dtype=np.int64)
    stops = np.asarray(stops, dtype=np.int64)
    keep = stops > starts
    if dst is None:
        dst0 = np.concatenate([[0], np.cumsum(stops - starts)])[:-1][keep]
    else:
        dst0 = np.asarray(dst, dtype=np.int64)[keep]
    starts, stops = starts[keep], stops[keep]
    first = starts // rows
    n = (stops - 1) // rows - first + 1
    owner = np.repeat(np.arange(starts.size), n)
    chunk = expand_ranges(first, first + n)
    base = chunk * rows
    lo = np.maximum(starts[owner], base)
    hi = np.minimum(stops[owner], base + rows)
    return chunk, lo - base, hi - base, dst0[owner] + lo - starts[owner]


class ChunkReader:
    """Row ranges of a zarr array, read by decoding its chunks directly (see module docstring).

    Parameters
    ----------
    layout
        Where the chunks are and how they are encoded.
    shape, dtype, fill_value
        Those of the array.
    transport
        What reads the bytes of chunks and shard indexes.
    verify_checksums
        Also verify the checksum of chunks that are only partly wanted (uncompressed chunks,
        otherwise read in part): each is then read whole.
    complete
        Every chunk of the array was written
        (:data:`~annbatch._core.chunks.COMPLETE_ATTR`): a chunk or shard that is missing
        raises :class:`~annbatch.errors.CorruptChunkError` instead of reading as
        ``fill_value``.
    """

    def __init__(
        self,
        layout: Layout,
        shape: tuple[int, ...],
        dtype: np.dtype,
        fill_value: Any,
        transport: Transport,
        *,
        verify_checksums: bool = False,
        complete: bool = False,
    ) -> None:
        self.layout = layout
        self.shape = shape
        self.dtype = dtype
        self.transport = transport
        self.verify_checksums = verify_checksums
        self._fill = fill_value
        self._complete = complete
        self._indexes: dict[int, np.ndarray | None] = {}
        self._paths: dict[int, str] = {}  # shard -> its file
        self._entries: dict[int, list[int]] = {}  # shard -> its index, as one flat list
        # table.ChunkTable of this array (a StackedReader: of the stack) once a read needs
        # it; False: it has none (table.table_of).
        self.chunk_table: Any = None
        self.chunk_tables: dict[tuple[int, ...], Any] = {}  # of stacks it is the first of
        self._own_files()

    def _own_files(self) -> None:
        # Local shard files stay open between reads (descriptors.OPEN_FILES), as long as
        # this reader and its cached shard indexes live.
        self.owner = new_owner()
        weakref.finalize(self, OPEN_FILES.forget, self.owner)

    def owner_of(self, chunk: int) -> int:
        """The token under which the file holding chunk ``chunk`` is kept open
        (:mod:`~annbatch._core.chunks.descriptors`)."""
        return self.owner

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers, DDP ranks
        dropped = ("_indexes", "_paths", "_entries", "chunk_tables")
        state = {k: v for k, v in self.__dict__.items() if k not in (*dropped, "owner")}
        state["chunk_table"] = None
        return state | {k: {} for k in dropped}  # shard indexes are re-read where needed

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._own_files()

    @property
    def rows_per_chunk(self) -> int:
        """Rows held by one inner chunk."""
        return self.layout.rows_per_chunk

    @property
    def row_bytes(self) -> int:
        """Bytes of one row, as stored uncompressed."""
        return self.dtype.itemsize * math.prod(self.shape[1:])

    def chunk_rows(self, chunks: np.ndarray) -> np.ndarray:
        """Rows of the array in each of ``chunks`` (fewer in the last)."""
        rows = self.layout.rows_per_chunk
        return np.minimum(rows, self.shape[0] - np.asarray(chunks, dtype=np.int64) * rows)

    # ----------------------------------------------------------------------------- planning
    def tasks(
        self,
        starts: np.ndarray,
        stops: np.ndarray,
        out: np.ndarray,
        n_tasks: int,
        dst: np.ndarray | None = None,
        check: Callable[[np.ndarray], None] | None = None,
    ) -> list[Callable[[], None]]:
        """Tasks that together copy rows ``starts[i]:stops[i]`` into ``out``, decoding each
        chunk the ranges touch once.

        ``starts`` must be sorted and the ranges must not overlap. Range ``i`` lands at
        ``out[dst[i]:]``; without ``dst``, the ranges land one after another from row 0.
        ``check``, if given, is called by each task on the parts of ``out`` it has filled,
        while they are still in cache (the CSR source range-checks column indices so). A
        transport may start reading when the tasks are made (object storage does, in task
        order).
        """
        chunk, src_lo, src_hi, dst = self.pieces(starts, stops, dst)
        if chunk.size == 0:
            return []
        # Pieces are in chunk order (ranges are sorted and disjoint): group them by chunk.
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        firsts = np.concatenate([[0], bounds])
        lasts = np.concatenate([bounds, [chunk.size]])
        groups = np.array_split(np.arange(firsts.size), min(n_tasks, firsts.size))
        transport = self.transport
        tasks = []
        for g in groups:
            if g.size:
                a, b = int(firsts[g[0]]), int(lasts[g[-1]])
                work = Work(out, chunk[a:b], src_lo[a:b], src_hi[a:b], dst[a:b], check)
                tasks.append(transport.task(self, work))
        return tasks

    def pieces(
        self, starts: np.ndarray, stops: np.ndarray, dst: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """See :func:`chunk_pieces` (with this array's rows per chunk)."""
        return chunk_pieces(starts, stops, self.layout.rows_per_chunk, dst)

    # -------------------------------------------------------------------------------- names
    def where(self, chunk: int) -> str:
        """Chunk ``chunk`` of this array, as named in errors."""
        layout = self.layout
        unit = "rows" if len(self.shape) > 1 else "entries"
        first = f"({unit} from {chunk * layout.rows_per_chunk})"
        return f"{self.chunk_name(chunk)} {first} of the zarr array {layout.describe()}"

    def chunk_name(self, chunk: int) -> str:
        """The chunk's key (a shard's key and the chunk's place in it, when sharded)."""
        layout = self.layout
        if layout.index_entries:
            shard, inner = divmod(chunk, layout.chunks_per_shard)
            return f"inner chunk {inner} of shard {layout.key((shard, *layout.trailing))}"
        return f"chunk {layout.key((chunk, *layout.trailing))}"

    def read_errors(self, work: Work) -> AbstractContextManager[None]:
        """Failures of the OS (EIO, a file removed under us...), the store or numpy while
        reading ``work`` become a StoreReadError naming its first chunk."""
        first = int(work.chunk[0])
        return store_errors(lambda: f"reading {self.where(first)} and the chunks after it")

    # ------------------------------------------------------------------------ shard indexes
    def shard_path(self, shard: int) -> str:
        """Where shard ``shard`` is (a file path, or an object's key); without shards, where
        chunk ``shard`` is."""
        path = self._paths.get(shard)
        if path is None:
            layout = self.layout
            path = layout.path(layout.key((shard, *layout.trailing)))
            if layout.index_entries:  # shards are few; unsharded chunks may be millions
                self._paths[shard] = path
        return path

    def has_index(self, shard: int) -> bool:
        """Whether the index of shard ``shard`` was read (or found missing) already."""
        return shard in self._indexes

    def shard_entries(self, shard: int) -> list[int] | None:
        """:meth:`shard_index` as one flat list ``[offset, nbytes, offset, nbytes, ...]`` (for
        loops in Python). Flat, because a list of pairs is a container per chunk that the
        garbage collector walks on every full collection: an atlas' obs shards held ~400,000
        of them, and the collections they set off cost more than reading the chunks."""
        entries = self._entries.get(shard)
        if entries is None:
            index = self.shard_index(shard)
            if index is None:
                return None
            entries = self._entries[shard] = index.ravel().tolist()
        return entries

    def shard_index(self, shard: int) -> np.ndarray | None:
        """The (offset, nbytes) pairs of one shard, or None if the shard was never written."""
        if shard in self._indexes:
            return self._indexes[shard]
        layout = self.layout
        path = self.shard_path(shard)
        found = self.transport.read_index(path, layout.index_nbytes, at_end=layout.index_at_end)
        return self.keep_index(shard, path, found)

    def keep_index(
        self, shard: int, path: str, found: tuple[bytes, int] | None
    ) -> np.ndarray | None:
        """Check a shard index as read (bytes and the shard's size; None: no such shard) and
        cache it: its CRC32C (when the layout has one), and that every entry is either "never
        written" or a byte range inside the file's chunk data."""
        layout = self.layout
        nbytes = layout.index_nbytes
        if found is None:
            index = None
        else:  # other I/O errors become a StoreReadError naming the chunk (read_errors)
            raw, size = found
            if size < nbytes or len(raw) != nbytes:
                msg = f"shard {path} is {size} bytes, too short for its index of {nbytes}; the store is damaged or truncated"
                raise CorruptChunkError(msg)
            entries = raw[: 16 * layout.index_entries]
            if layout.index_checksum and crc32c(entries) != raw[-4:]:
                msg = f"the index of shard {path} does not match its CRC32C checksum; the store is damaged"
                raise ChecksumMismatchError(msg)
            index = np.frombuffer(entries, dtype="<u8").reshape(-1, 2)
            self._check_index(index, path, size)
        self._indexes[shard] = index
        return index

    def _check_index(self, index: np.ndarray, path: str, size: int) -> None:
        """Raise unless every entry of a shard index is "never written" or lies in the file."""
        layout = self.layout
        lo, hi = (
            (0, size - layout.index_nbytes) if layout.index_at_end else (layout.index_nbytes, size)
        )
        offset, nbytes = index[:, 0], index[:, 1]
        missing = (offset == MISSING) & (nbytes == MISSING)
        # Compared without adding, so that huge values cannot overflow.
        bad = ~missing & ((offset < lo) | (offset > hi) | (nbytes > hi - offset))
        if bad.any():
            entry = int(np.flatnonzero(bad)[0])
            msg = (
                f"shard {path} ({size} bytes) has an index entry {entry} pointing at bytes "
                f"{int(offset[entry])} (+{int(nbytes[entry])}), outside its chunk data "
                f"[{lo}, {hi}); the store is damaged"
            )
            raise CorruptChunkError(msg)

    def locate(self, chunk: int) -> tuple[str, int, int] | None:
        """(file or object, offset, nbytes; -1: the whole file) of an inner chunk's encoded
        bytes; None: never written."""
        layout = self.layout
        if layout.index_entries == 0:
            return (self.shard_path(chunk), 0, -1)
        shard, inner = divmod(chunk, layout.chunks_per_shard)
        index = self.shard_index(shard)
        if index is None:
            return None
        offset, nbytes = index[inner * layout.index_stride].tolist()
        if offset == MISSING:
            return None
        return (self.shard_path(shard), offset, nbytes)

    # ------------------------------------------------------------------------------ decoding
    def decode(self, work: Work, fetched: Fetched) -> None:
        """The decode loop: each chunk that ``fetched`` yields (see
        :data:`~annbatch._core.chunks.transport.Fetched`) checked (CRC32C, decoded size) and
        decoded into ``work.out``: straight into its place when the work wants it whole in one
        piece, else into scratch (an uncompressed chunk: viewed where it lies) and its wanted
        rows copied out. A chunk never written is the fill value."""
        out, src_lo, src_hi, dst = work.out, work.src_lo, work.src_hi, work.dst
        layout = self.layout
        rows = layout.rows_per_chunk
        tail = self.shape[1:]
        whole_rows = layout.chunk_shape[1:] == tail and out.dtype == self.dtype
        checksum = layout.checksum
        compressor = layout.compressor
        scratch: np.ndarray | None = None
        for i, j, c, encoded in fetched:
            if encoded is None:
                self.fill(out, src_lo[i:j], src_hi[i:j], dst[i:j], c)
                continue
            if checksum:
                encoded = self._verified(memoryview(encoded), c)
            if j == i + 1 and whole_rows and src_lo[i] == 0 and src_hi[i] == rows:
                self._decode(encoded, out[dst[i] : dst[i] + rows], c)
                continue
            if compressor is None:  # the bytes are the values: no scratch copy
                values = self._raw_values(encoded, c)
            else:
                if scratch is None:
                    scratch = np.empty(layout.chunk_shape, dtype=self.dtype)
                self._decode(encoded, scratch, c)
                values = scratch
            if j == i + 1 and not tail:  # one piece of a 1-D chunk (CSR values, indices)
                lo, hi, at = int(src_lo[i]), int(src_hi[i]), int(dst[i])
                out[at : at + hi - lo] = values[lo:hi]
                continue
            copy_pieces(values, out, src_lo[i:j], src_hi[i:j], dst[i:j], tail)

    def _verified(self, encoded: memoryview, chunk: int) -> memoryview:
        """A chunk's bytes without their trailing CRC32C, after checking it."""
        if len(encoded) < 4 or crc32c(encoded[:-4]) != encoded[-4:]:
            msg = f"{self.where(chunk)} does not match its CRC32C checksum; the store is damaged"
            raise ChecksumMismatchError(msg)
        return encoded[:-4]

    def _decode(self, encoded: bytes | memoryview, into: np.ndarray, chunk: int) -> None:
        """Decode one chunk into ``into`` (C-contiguous, exactly one chunk's bytes)."""
        try:
            decode_into(self.layout.compressor, encoded, into)
        except Exception as e:  # codecs raise many types (RuntimeError, EOFError, zlib.error...)
            raise self._undecodable(chunk, into.nbytes, e) from e

    def _raw_values(self, encoded: bytes | memoryview, chunk: int) -> np.ndarray:
        """An uncompressed chunk's values, viewing its bytes."""
        shape = self.layout.chunk_shape
        nbytes = self.dtype.itemsize * math.prod(shape)
        try:
            check_raw_size(encoded, nbytes)
        except ValueError as e:
            raise self._undecodable(chunk, nbytes, e) from e
        return np.frombuffer(encoded, dtype=self.dtype).reshape(shape)

    def _undecodable(self, chunk: int, nbytes: int, e: Exception) -> CorruptChunkError:
        msg = (
            f"{self.where(chunk)} does not decode to {nbytes} bytes ({e}); the store "
            "is damaged or truncated"
        )
        return CorruptChunkError(msg)

    def fill(
        self,
        out: np.ndarray,
        src_lo: np.ndarray,
        src_hi: np.ndarray,
        dst: np.ndarray,
        chunk: int,
    ) -> None:
        """Pieces of chunk ``chunk``, which was never written: the array's fill value (an
        array that records every chunk as written raises instead)."""
        if self._complete:
            layout = self.layout
            shard = chunk // max(1, layout.chunks_per_shard)
            if layout.index_entries and self._indexes.get(shard, ()) is None:  # the whole shard
                key = layout.key((shard, *layout.trailing))
                what = f"shard {key} of the zarr array {layout.describe()}"
            else:
                what = self.where(chunk)
            msg = (
                f"{what} is missing, but the array records that every chunk was written; the "
                "store is incomplete (an interrupted copy or upload?) or damaged"
            )
            raise CorruptChunkError(msg)
        for lo, hi, at in zip(src_lo.tolist(), src_hi.tolist(), dst.tolist(), strict=True):
            out[at : at + hi - lo] = self._fill
