"""Layout rules of annbatch's own chunk reader: a zarr array's metadata to a :class:`Layout`,
or None where the reader does not fully understand the array (the Loader then reads it through
zarr-python).

The reader (:mod:`annbatch._core.chunks.reader`) takes arrays in a local directory store, or
in object storage through zarr's ``ObjectStore`` (obstore;
:mod:`annbatch._core.chunks.object_store`), whose
chunks hold whole rows (every axis but the first spans the full extent), little-endian numeric data,
and a codec chain of:

- zarr v3: the ``bytes`` codec, then at most one of ``zstd``, ``blosc``, ``gzip``, then at most
  a ``crc32c`` checksum; either as the array's chain or inside a ``sharding_indexed`` codec
  whose index is ``bytes`` (little-endian) with or without ``crc32c``;
- zarr v2: no filters, C order, any numcodecs compressor.

Everything else (other stores, fsspec's included; other codecs, transposes, big-endian data, chunks that split
columns) gives None. So does any zarr-python whose internals this module does not recognise:
it reads zarr's metadata classes, a store's root and the chunk key encoding, which are not
zarr's public API. The zarr versions tested are those of CI (the floor in ``pyproject.toml``
and the newest); a major version outside :data:`ZARR_MAJOR` is not read directly at all.

Why not zarr's public API alone: ``zarr.Array`` exposes the inner chain's ``serializer`` and
``compressors``, ``chunks`` and ``shards``, but not where a chunk's bytes are (the chunk key
encoding, a local store's root, the shard index's codecs and location), which the reader needs
to read bytes itself. Those come from the metadata classes, and any of them missing or moved
makes the array read through zarr-python (tested), not fail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numcodecs
import numpy as np
import zarr

from annbatch._stores import is_object_store

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

ZARR_MAJOR = 3
"""The zarr-python major version whose internals this module reads."""


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a chunk's bytes are and how to decode them."""

    root: str
    """Directory of the array (in object storage: its key prefix in ``store``)."""
    key: Callable[[tuple[int, ...]], str]
    """Chunk key (relative path) of an outer chunk's grid coordinates."""
    trailing: tuple[int, ...]
    """Grid coordinates of the outer chunk along the axes after the first (all zero)."""
    rows_per_chunk: int
    """Rows in one inner (decoded) chunk."""
    chunk_shape: tuple[int, ...]
    """Shape of one decoded inner chunk."""
    chunks_per_shard: int
    """Inner chunks along axis 0 in one shard (1: not sharded)."""
    index_stride: int
    """Entries of a shard index between consecutive inner chunks along axis 0."""
    index_entries: int
    """Entries (offset, nbytes pairs) in one shard index (0: not sharded)."""
    index_at_end: bool
    index_checksum: bool
    """Whether the shard index is followed by its CRC32C."""
    compressor: Any
    """A numcodecs codec, or None for raw little-endian bytes."""
    checksum: bool
    """Whether every inner chunk's encoded bytes are followed by their CRC32C (4 bytes)."""
    store: Any = None
    """The obstore store the array is in, or None for a local directory."""

    def path(self, key: str) -> str:
        """Where the chunk or shard ``key`` is: a file path, or an object's key in ``store``."""
        if self.store is None:
            return os.path.join(self.root, key)
        return f"{self.root}/{key}" if self.root else key

    def describe(self) -> str:
        """The array's location, as named in errors (never credentials)."""
        if self.store is None:
            return self.root
        return f"{self.store!r}/{self.root}"

    @property
    def index_nbytes(self) -> int:
        """Bytes of one shard index, checksum included."""
        return 16 * self.index_entries + (4 if self.index_checksum else 0)


@cache
def _internals() -> SimpleNamespace | None:
    """The zarr-python classes the rules below read, or None if they moved."""
    try:
        if int(zarr.__version__.split(".")[0]) != ZARR_MAJOR:
            return None
        from zarr import codecs
        from zarr.core.metadata import v2, v3
        from zarr.storage import LocalStore

        return SimpleNamespace(
            BloscCodec=codecs.BloscCodec,
            BytesCodec=codecs.BytesCodec,
            Crc32cCodec=codecs.Crc32cCodec,
            GzipCodec=codecs.GzipCodec,
            ShardingCodec=codecs.ShardingCodec,
            ZstdCodec=codecs.ZstdCodec,
            ArrayV2Metadata=v2.ArrayV2Metadata,
            ArrayV3Metadata=v3.ArrayV3Metadata,
            LocalStore=LocalStore,
        )
    except (ImportError, AttributeError, ValueError):
        return None


def layout_of(array: object) -> tuple[Layout, Any] | None:
    """(layout, fill value) of ``array`` if the chunk reader can read it, else None."""
    z = _internals()
    if z is None or not isinstance(array, zarr.Array):
        return None
    try:
        return _layout_of(array, z)
    except (AttributeError, TypeError, ValueError, KeyError, NotImplementedError):
        return None  # metadata this module does not understand: zarr-python reads it


def _layout_of(array: zarr.Array, z: SimpleNamespace) -> tuple[Layout, Any] | None:
    if array.ndim < 1:
        return None
    store = array.store_path.store
    remote = None
    if isinstance(store, z.LocalStore):
        root = os.path.join(str(store.root), array.store_path.path).rstrip(os.sep) or os.sep
    elif is_object_store(store):
        remote, root = store.store, array.store_path.path.strip("/")  # type: ignore[attr-defined]
    else:
        return None
    dtype = np.dtype(array.dtype)
    if dtype.hasobject or dtype.byteorder == ">" or dtype.kind not in "biuf":
        return None
    metadata = array.metadata
    shape = tuple(int(n) for n in array.shape)
    if isinstance(metadata, z.ArrayV3Metadata):
        codecs = metadata.codecs
        if len(codecs) == 1 and isinstance(codecs[0], z.ShardingCodec):
            sharding = codecs[0]
            chain = _inner_chain(sharding.codecs, z)
            index = sharding.index_codecs
            index_ok = (
                len(index) in (1, 2)
                and isinstance(index[0], z.BytesCodec)
                and _little_endian(index[0])
                and (len(index) == 1 or isinstance(index[1], z.Crc32cCodec))
            )
            if chain is None or not index_ok:
                return None
            inner = tuple(int(n) for n in sharding.chunk_shape)
            outer = tuple(int(n) for n in array.shards or ())
            if len(outer) != len(inner) or any(o % i for o, i in zip(outer, inner, strict=True)):
                return None
            per_shard = [o // i for o, i in zip(outer, inner, strict=True)]
            index_entries = int(np.prod(per_shard))
            index_stride = int(np.prod(per_shard[1:]))
            at_end = _value(sharding.index_location) == "end"
            index_checksum = len(index) == 2
        else:
            chain = _inner_chain(codecs, z)
            if chain is None:
                return None
            inner = tuple(int(n) for n in array.chunks)
            per_shard, index_entries, index_stride, at_end, index_checksum = [1], 0, 1, True, False
        compressor, checksum = chain
        key = metadata.encode_chunk_key
    elif isinstance(metadata, z.ArrayV2Metadata):
        if metadata.filters or metadata.order != "C":
            return None
        compressor = metadata.compressor
        if compressor is not None and not isinstance(compressor, numcodecs.abc.Codec):
            return None
        inner = tuple(int(n) for n in array.chunks)
        per_shard, index_entries, index_stride, at_end, index_checksum = [1], 0, 1, True, False
        checksum = False
        key = metadata.encode_chunk_key
    else:
        return None
    if len(inner) != len(shape) or min(inner) < 1:
        return None
    if any(c < n for c, n in zip(inner[1:], shape[1:], strict=True)):
        return None  # a chunk splits the columns: rows are not whole in one chunk
    layout = Layout(
        root=root,
        key=key,
        trailing=(0,) * (len(shape) - 1),
        rows_per_chunk=inner[0],
        chunk_shape=inner,
        chunks_per_shard=per_shard[0],
        index_stride=index_stride,
        index_entries=index_entries,
        index_at_end=at_end,
        index_checksum=index_checksum,
        compressor=compressor,
        checksum=checksum,
        store=remote,
    )
    fill = metadata.fill_value
    return layout, 0 if fill is None else fill


def _value(setting: object) -> object:
    """A codec setting as a plain value (zarr versions differ: enum members or strings)."""
    return getattr(setting, "value", setting)


def _little_endian(codec: Any) -> bool:
    return codec.endian is None or _value(codec.endian) == "little"


def _compressor(codec: object, z: SimpleNamespace) -> tuple[bool, Any]:
    """(supported, numcodecs codec) for one zarr v3 bytes-to-bytes codec."""
    if isinstance(codec, z.ZstdCodec):
        return True, numcodecs.Zstd(level=codec.level)
    if isinstance(codec, z.GzipCodec):
        return True, numcodecs.GZip(level=codec.level)
    if isinstance(codec, z.BloscCodec):
        return True, numcodecs.Blosc()  # a blosc frame describes itself; any settings decode it
    return False, None


def _inner_chain(codecs: Sequence[object], z: SimpleNamespace) -> tuple[Any, bool] | None:
    """(compressor or None, checksum) for a v3 chain: little-endian ``bytes``, then at most one
    compressor, then at most a ``crc32c``; None for any other chain."""
    if not codecs or not isinstance(codecs[0], z.BytesCodec) or not _little_endian(codecs[0]):
        return None
    rest = list(codecs[1:])
    checksum = bool(rest) and isinstance(rest[-1], z.Crc32cCodec)
    if checksum:
        rest.pop()
    if not rest:
        return None, checksum
    if len(rest) == 1:
        ok, compressor = _compressor(rest[0], z)
        return (compressor, checksum) if ok else None
    return None
