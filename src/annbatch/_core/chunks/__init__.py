"""annbatch's own chunk reader: which zarr arrays it reads, and over which transport.

layout (metadata -> where chunks are, how encoded) -> reader (plan tasks, shard indexes, the
decode loop) over a transport (``local``: ``os.pread``; ``object_store``: obstore on the
``fetch_loop``) -> codec (checksums, decoded sizes, decoding) -> pieces (rows to their places);
``small``: the same reads of small 1-D arrays on the calling thread, without task objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from annbatch._core.chunks.layout import layout_of
from annbatch._core.chunks.local import LocalTransport
from annbatch._core.chunks.reader import ChunkReader
from annbatch._core.chunks.small import read_rows

__all__ = ["COMPLETE_ATTR", "ChunkReader", "direct_array", "read_rows", "read_whole"]

COMPLETE_ATTR = "annbatch-every-chunk-written"
"""An array attribute (true) that annbatch collections write: every chunk of the array was
written, so a missing chunk or shard is damage (an interrupted copy or upload), not the fill
value that zarr reads for a chunk it never wrote."""


def direct_array(array: object, *, verify_checksums: bool = False) -> ChunkReader | None:
    """A :class:`ChunkReader` over ``array`` if it can read it, else None.

    Parameters
    ----------
    array
        Any array; only some zarr arrays qualify (see :mod:`annbatch._core.chunks.layout`).
    verify_checksums
        Also verify the checksum of chunks that are only partly wanted (uncompressed chunks,
        otherwise read in part): each is then read whole.
    """
    found = layout_of(array)
    if found is None:
        return None
    layout, fill = found
    shape = tuple(int(n) for n in array.shape)  # type: ignore[attr-defined]
    dtype = np.dtype(array.dtype)  # type: ignore[attr-defined]
    complete = getattr(array, "attrs", {}).get(COMPLETE_ATTR) is True
    if layout.store is None:
        transport: Any = LocalTransport()
    else:  # obstore is an optional dependency: imported only for arrays in object storage
        from annbatch._core.chunks.object_store import ObjectStoreTransport

        transport = ObjectStoreTransport(layout.store, layout.root)
    return ChunkReader(
        layout,
        shape,
        dtype,
        fill,
        transport,
        verify_checksums=verify_checksums,
        complete=complete,
    )


def read_whole(array: Any) -> np.ndarray:
    """All of ``array``: through the chunk reader where it can read it (with its checks:
    shard indexes, CRC32C of every chunk, no chunk missing from a collection), else by
    indexing it."""
    direct = direct_array(array)
    if direct is None:
        return np.asarray(array[...])
    out = np.empty(direct.shape, dtype=direct.dtype)
    for task in direct.tasks(np.array([0]), np.array([direct.shape[0]]), out, 1):
        task()
    return out
