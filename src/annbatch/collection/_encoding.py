"""The reference library's collection encoding: the root attributes that mark a collection, and
the state annbatch reads from a collection that carries only those (one the reference built).

A collection annbatch builds carries both its manifest (the ``annbatch-collection`` attribute)
and :data:`V1_ENCODING` once it is complete, so that tools which recognise a collection by the
encoding recognise ours; one the reference built carries only the encoding, and its datasets
are the groups under the root (``dataset_0``, ``dataset_1``, ...).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from annbatch._core.frames import read_frame
from annbatch.errors import CorruptDataError

if TYPE_CHECKING:
    import zarr

V1_ENCODING: dict[str, str] = {
    "encoding-type": "annbatch-preshuffled",
    "encoding-version": "0.1.0",
}
"""The root attributes of a finished collection (the reference library's ``annbatch.io.V1_ENCODING``)."""

FOREIGN = "built-by"
"""Key of a state read from a collection without annbatch's manifest (its value says by what)."""


def with_encoding(attributes: dict[str, Any], *, complete: bool) -> dict[str, Any]:
    """``attributes`` with :data:`V1_ENCODING` when the collection is ``complete``, without it
    otherwise (a build or an append in progress is not a collection a reader may use)."""
    out = {k: v for k, v in attributes.items() if k not in V1_ENCODING}
    if complete:
        out.update(V1_ENCODING)
    return out


def has_encoding(attributes: Any) -> bool:
    """Whether root attributes mark a collection in the reference's encoding (any version
    ``0.x`` of the ``annbatch-preshuffled`` type)."""
    return attributes.get("encoding-type") == V1_ENCODING["encoding-type"] and str(
        attributes.get("encoding-version", "")
    ).startswith("0.")


def foreign_state(root: zarr.Group, version: int) -> dict[str, Any]:
    """The state of a collection that carries only :data:`V1_ENCODING`: its datasets (the
    AnnData groups under ``root``, in the order of their numbers), their rows, and the genes
    of the first. Taken as complete: the encoding holds no record of a build in progress."""
    names = sorted(
        (name for name, _ in root.groups() if not name.startswith((".", "_"))), key=_number_first
    )
    datasets = [{"name": name, "n_obs": _n_obs(root[name])} for name in names]  # type: ignore[arg-type]
    var_names: list[str] = []
    if names:
        var = root[names[0]]["var"]  # type: ignore[index]
        var_names = [str(v) for v in read_frame(var, var, "var").index]
    return {
        "version": version,
        "state": "complete",
        FOREIGN: V1_ENCODING["encoding-type"],
        "var_names": var_names,
        "datasets": datasets,
    }


def _number_first(name: str) -> tuple[int, int, str]:
    """``dataset_2`` before ``dataset_10``; names without a number after those with one."""
    match = re.search(r"(\d+)$", name)
    return (0, int(match.group(1)), name) if match else (1, 0, name)


def _n_obs(group: zarr.Group) -> int:
    """Rows of one AnnData group: the length of its obs index (an array, or a group such as a
    nullable string or categorical array, whose first member array has the index's length)."""
    obs = group["obs"]
    index: Any = obs[obs.attrs["_index"]]  # type: ignore[index]
    if hasattr(index, "shape"):
        return int(index.shape[0])
    for member in ("values", "codes"):
        if member in index:
            return int(index[member].shape[0])
    msg = f"cannot tell the rows of {group.path}: its obs index is an element of encoding {index.attrs.get('encoding-type')!r}"
    raise CorruptDataError(msg)
