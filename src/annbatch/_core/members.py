"""Members of a zarr group looked up in its consolidated metadata, without zarr's event loop.

zarr-python answers ``group[key]`` with a round trip through its event loop thread (about
0.25-0.6 ms) even where the group carries the metadata of every node below it, as datasets of
a local collection opened by the Loader do (:mod:`annbatch.collection._snapshot`). Opening a
dataset's obs asks for some 20 members; :func:`member` builds them from that metadata
directly (what zarr-python itself does on its loop), and asks zarr for anything else.
"""

from __future__ import annotations

from typing import Any

import zarr
from zarr.core.group import GroupMetadata
from zarr.storage import StorePath


def member(group: Any, key: str) -> Any:
    """``group[key]`` (``key`` a direct member's name): from ``group``'s consolidated metadata
    if it is a zarr group that has it, else by asking ``group`` (zarr, h5py); ``KeyError`` if
    there is no such member."""
    if not isinstance(group, zarr.Group) or "/" in key:
        return group[key]
    consolidated = group.metadata.consolidated_metadata
    if consolidated is None:
        return group[key]
    metadata = consolidated.metadata.get(key)
    if metadata is None:
        raise KeyError(key)
    where = StorePath(group.store_path.store, f"{group.store_path.path}/{key}".lstrip("/"))
    if isinstance(metadata, GroupMetadata):
        return zarr.Group(zarr.AsyncGroup(metadata=metadata, store_path=where))
    return zarr.Array(zarr.AsyncArray(metadata=metadata, store_path=where))


def get_member(group: Any, key: str) -> Any:
    """:func:`member`, or None if ``group`` has no member ``key``."""
    try:
        return member(group, key)
    except KeyError:
        return None
