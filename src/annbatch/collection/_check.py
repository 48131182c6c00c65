"""A collection's manifest checked against its store: every dataset it names is there, with the
rows, genes and elements it records.

Only metadata and the obs and var indexes' shapes are read, so this is cheap: ``info`` and the
Loader run the part they need (:func:`missing_datasets`), ``annbatch verify`` runs all of it
(:func:`manifest_problems`) before it reads every chunk.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import h5py

from annbatch._scrub import Problem

if TYPE_CHECKING:
    from collections.abc import Iterator

    from annbatch.collection._collection import DatasetCollection
    from annbatch.collection._store import CollectionStore


def missing_datasets(store: CollectionStore, names: list[str]) -> list[str]:
    """Those of ``names`` (datasets the manifest names) that are not in the collection."""
    if store.h5ad:
        return [name for name in names if not (store.path / name).is_file()]
    root = store.root("r")
    return [name for name in names if name not in root]


def missing_message(store: CollectionStore, lost: list[str]) -> str:
    """What :class:`~annbatch.errors.MissingDataError` says of the datasets ``lost``."""
    where = store.where
    listed = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
    return (
        f"the collection {where} is damaged: its manifest names {len(lost)} dataset"
        f"{'s' if len(lost) > 1 else ''} that {'are' if len(lost) > 1 else 'is'} not there "
        f"({listed}; deleted, or lost in a copy or an upload?). `annbatch verify {where}` "
        "lists every problem"
    )


def manifest_problems(collection: DatasetCollection) -> list[Problem]:
    """Everything the manifest names that is missing from the store or differs from it."""
    store = collection._store
    state = store.state()
    if state is None:
        return [Problem("/", "-", "holds no annbatch collection")]
    problems = []
    if state["state"] != "complete":
        problems.append(
            Problem("/", "-", "the build did not finish: run the same build again to resume it")
        )
        if store.h5ad:  # its datasets are still in the scratch collection
            return problems
    x = state.get("x") or {"dtype": "recorded before the manifest described X"}
    expected = {
        "n_var": len(state["var_names"]),
        "x": x["dtype"] is not None,
        "elements": list(state.get("elements", {})),
    }
    for entry in state["datasets"]:
        where = f"/{entry['name']}"
        with _opened(store, entry["name"], problems) as group:
            if group is not None:
                try:
                    problems += _dataset_problems(group, where, int(entry["n_obs"]), expected)
                except Exception as e:
                    problems.append(
                        Problem(where, "-", f"cannot read its structure: {type(e).__name__}: {e}")
                    )
    return problems


@contextlib.contextmanager
def _opened(store: CollectionStore, name: str, problems: list[Problem]) -> Iterator[Any]:
    """The dataset ``name`` opened read-only, or None (a problem added) if it cannot be."""
    where = f"/{name}"
    gone = Problem(
        where,
        "-",
        "missing: the collection's manifest names this dataset, and it is not there "
        "(deleted, or lost in a copy or an upload?)",
    )
    if store.h5ad:
        path = store.path / name
        if not path.is_file():
            problems.append(gone)
            yield None
            return
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            problems.append(Problem(where, "-", f"not readable as an HDF5 file: {e}"))
            yield None
            return
        with f:
            yield f
        return
    root = store.root("r")
    if name not in root:
        problems.append(gone)
        yield None
        return
    try:
        group = root[name]
    except Exception as e:
        problems.append(Problem(where, "-", f"cannot open: {type(e).__name__}: {e}"))
        yield None
        return
    yield group


def _dataset_problems(
    group: Any, where: str, n_obs: int, expected: dict[str, Any]
) -> list[Problem]:
    """A dataset against what the manifest records of it: rows, genes, X and its elements."""
    problems = []

    def check(path: str, rows: int | None, want: int, what: str) -> None:
        if rows is not None and rows != want:
            problems.append(
                Problem(
                    f"{where}/{path}",
                    "-",
                    f"has {rows:,} {what}; the collection's manifest records {want:,}",
                )
            )

    for key in ("obs", "var"):
        if key not in group:
            problems.append(Problem(f"{where}/{key}", "-", "missing"))
            continue
        frame = group[key]
        index = frame.attrs.get("_index")
        names = [index, *frame.attrs.get("column-order", [])]
        absent = [str(n) for n in names if n is None or n not in frame]
        if absent:
            problems.append(Problem(f"{where}/{key}", "-", f"its columns {absent} are missing"))
        if index is not None and index in frame:
            want = n_obs if key == "obs" else expected["n_var"]
            check(f"{key}/{index}", _rows(frame[index]), want, "rows")
    paths = (["X"] if expected["x"] else []) + expected["elements"]
    for path in paths:
        if path not in group:
            problems.append(
                Problem(f"{where}/{path}", "-", "missing, though the manifest records it")
            )
            continue
        shape = _shape(group[path])
        check(path, None if shape is None else shape[0], n_obs, "rows")
        if path == "X" and shape is not None and len(shape) > 1:
            check(path, shape[1], expected["n_var"], "columns (genes)")
    return problems


def _shape(elem: Any) -> tuple[int, ...] | None:
    """The shape of an array or of a sparse matrix in anndata's encoding (None: neither)."""
    if "shape" in elem.attrs and elem.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
        return tuple(int(n) for n in elem.attrs["shape"])
    shape = getattr(elem, "shape", None)
    return None if shape is None else tuple(int(n) for n in shape)


def _rows(elem: Any) -> int | None:
    shape = _shape(elem)
    return None if not shape else shape[0]
