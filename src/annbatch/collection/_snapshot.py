"""A dataset of a local collection opened from its metadata files in one pass.

zarr-python opens every group and array it is asked for with a round trip through its event
loop thread (about 0.25 ms with nothing to read, 0.6 ms with a ``zarr.json`` to read); opening
a dataset for the Loader asks for some 30 of them (X and its three arrays, obs, each column and
its codes and categories), so a collection of 100 datasets took seconds to open. Here each
dataset's ``zarr.json`` files are read directly (a dataset holds about 20) and handed to
zarr-python as the group's consolidated metadata, which it then serves every lookup below the
group from, without further reads. Nothing is written to the store, and chunks are read as
before.

The files read are the ones zarr-python would read; anything unexpected (no ``zarr.json``, a
file that is not JSON, metadata zarr-python refuses) gives ``None``, and the caller opens the
dataset the usual way, so that damaged metadata raises the error it always did.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import zarr
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.storage import StorePath

if TYPE_CHECKING:
    from pathlib import Path

    from zarr.storage import LocalStore

METADATA = "zarr.json"


def open_snapshot(store: LocalStore, root: Path, name: str) -> zarr.Group | None:
    """The group ``name`` of the local zarr v3 store ``store`` (whose folder is ``root``),
    with the metadata of every node below it read now; None where that cannot be done (the
    caller then opens it with ``zarr``)."""
    try:
        document = _read(os.path.join(root, name, METADATA))
        if document is None or document["node_type"] != "group":
            return None
        members: dict[str, Any] = {}
        _collect(os.path.join(root, name), "", members)
        document["consolidated_metadata"] = {
            "kind": "inline",
            "must_understand": False,
            "metadata": members,
        }
        metadata = GroupMetadata.from_dict(document)
    except Exception:  # any problem: zarr opens it (and raises what it raises)
        return None
    return zarr.Group(AsyncGroup(metadata, StorePath(store, name)))


def _collect(folder: str, prefix: str, members: dict[str, Any]) -> None:
    """The metadata of every node below ``folder`` (a group), keyed by its path under the
    dataset; arrays' folders (their chunks) are not entered."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.is_dir():
                continue
            document = _read(os.path.join(entry.path, METADATA))
            if document is None:  # not a node (zarr v3 has no implicit groups)
                continue
            key = prefix + entry.name
            members[key] = document
            if document.get("node_type") == "group":
                _collect(entry.path, key + "/", members)


def _read(path: str) -> dict[str, Any] | None:
    """The zarr v3 metadata document at ``path``; None if there is no such file. An error for
    a document zarr-python would not open as a v3 node: zarr's consolidated metadata takes a
    member's zarr v2 metadata (no ``node_type``) where zarr-python, reading that ``zarr.json``
    itself, refuses it."""
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read())
    except FileNotFoundError:
        return None
    if not isinstance(document, dict):
        msg = f"{path} is not a JSON object"
        raise ValueError(msg)
    if document.get("zarr_format") != 3 or document.get("node_type") not in ("array", "group"):
        msg = f"{path} is not zarr v3 metadata of an array or a group"
        raise ValueError(msg)
    return document
