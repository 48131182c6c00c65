"""Child process of ``tests/test_corruption.py``: one epoch over one (possibly damaged) store.

Usage::

    python _corruption_child.py '{"family": "zarr", "kind": "csr", "path": ..., ...}'

It runs in a process of its own so that a crash (a signal, a hang, an allocation of the whole
address space) is seen by the parent as a crash, not as the end of the test session. In order:

1. the ORACLE: the store read independently, with zarr-python or h5py (never scipy on the
   untrusted arrays: ``toarray()`` on out-of-range indices can write out of bounds);
2. the store opened with zarr / h5py (a failure here, before annbatch is called, is
   ``open_failed``), then ``annbatch.load_x_and_obs`` and one shuffled epoch of a Loader,
   every yielded row compared (by ``batch["index"]``) to the pristine values and the oracle.

The last line on stdout is one JSON object: ``outcome`` is one of ``annbatch_error``,
``other_error``, ``open_failed``, ``ok_exact_pristine``, ``ok_equals_oracle``,
``wrong_values`` (or ``harness_error``: the Loader rejected the test's own arguments).
Progress markers go to stderr, so that the parent can tell where a crash happened.

The module is also imported by the parent, which uses :func:`reference` to record the pristine
values; it imports nothing heavy at module level.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLLECTION_ATTR = "annbatch-collection"
ADDRESS_SPACE_LIMIT = 6 * 2**30  # a runaway allocation fails with MemoryError, not the OOM killer
MESSAGE_CHARS = 1500


# --------------------------------------------------------------------------- reading a store
def _read_x(x: Any) -> dict[str, Any]:
    """The arrays of one X (a zarr / h5py array, or a CSR group), read whole, as stored."""
    if hasattr(x, "keys"):  # a group: anndata's CSR encoding
        return {
            "kind": "csr",
            "indptr": np.asarray(x["indptr"][...]),
            "indices": np.asarray(x["indices"][...]),
            "data": np.asarray(x["data"][...]),
            "shape": np.asarray([int(n) for n in x.attrs["shape"]], dtype=np.int64),
        }
    return {"kind": "dense", "X": np.asarray(x[...])}


def reference(family: str, path: str) -> list[dict[str, Any]]:
    """X of a store, one dict of arrays per dataset (a collection has several), read with
    zarr-python or h5py only: no annbatch involved."""
    if family == "h5ad":
        import h5py

        with h5py.File(path, "r") as f:
            return [_read_x(f["X"])]
    import zarr

    root = zarr.open_group(path, mode="r")
    if family == "zarr":
        return [_read_x(root["X"])]
    names = [d["name"] for d in root.attrs[COLLECTION_ATTR]["datasets"]]
    return [_read_x(root[name]["X"]) for name in names]


def obs_names(family: str, path: str) -> np.ndarray:
    """The obs names of all rows, in Loader order (read with anndata)."""
    import anndata as ad

    if family == "h5ad":
        import h5py

        with h5py.File(path, "r") as f:
            return np.asarray(ad.io.read_elem(f["obs"]).index, dtype=str)
    import zarr

    root = zarr.open_group(path, mode="r")
    if family == "zarr":
        groups = [root]
    else:
        groups = [root[d["name"]] for d in root.attrs[COLLECTION_ATTR]["datasets"]]
    return np.concatenate([np.asarray(ad.io.read_elem(g["obs"]).index, dtype=str) for g in groups])


def save_reference(parts: list[dict[str, Any]], names: np.ndarray, out: str) -> None:
    arrays: dict[str, Any] = {"n_parts": np.int64(len(parts)), "obs_names": names}
    for k, part in enumerate(parts):
        for key, value in part.items():
            arrays[f"p{k}_{key}"] = np.asarray(value)
    np.savez(out, **arrays)


def load_reference(path: str) -> tuple[list[dict[str, Any]], np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        parts = []
        for k in range(int(z["n_parts"])):
            prefix = f"p{k}_"
            part = {key[len(prefix) :]: z[key] for key in z.files if key.startswith(prefix)}
            part["kind"] = str(part["kind"])
            parts.append(part)
        return parts, z["obs_names"]


# ------------------------------------------------------------------------------ row access
@dataclass
class Rows:
    """Rows of a store, addressed by global row (datasets one after another, as the Loader
    numbers them). A row is None where the stored arrays do not define it."""

    parts: list[dict[str, Any]]
    n: int = 0
    plausible: bool = True
    why_implausible: str = ""
    _starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for part in self.parts:
            self._starts.append(self.n)
            self.n += _n_rows(part)
            problem = _implausible(part)
            if problem and self.plausible:
                self.plausible, self.why_implausible = False, problem

    def row(self, i: int) -> tuple[Any, ...] | None:
        if not 0 <= i < self.n:
            return None
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        part, local = self.parts[k], i - self._starts[k]
        if part["kind"] == "dense":
            return (part["X"][local],)
        indptr = part["indptr"]
        if local + 1 >= indptr.size:
            return None
        lo, hi = int(indptr[local]), int(indptr[local + 1])
        if not 0 <= lo <= hi <= min(part["data"].size, part["indices"].size):
            return None
        return part["indices"][lo:hi], part["data"][lo:hi]

    @property
    def n_var(self) -> int:
        part = self.parts[0]
        return int(part["X"].shape[1]) if part["kind"] == "dense" else int(part["shape"][1])


def _n_rows(part: dict[str, Any]) -> int:
    if part["kind"] == "dense":
        return int(part["X"].shape[0])
    return int(part["shape"][0])


def _implausible(part: dict[str, Any]) -> str:
    """Why a dataset's arrays are not a valid store (empty string: they are)."""
    if part["kind"] == "dense":
        return ""
    indptr, indices, data = part["indptr"], part["indices"], part["data"]
    n_obs, n_var = (int(n) for n in part["shape"])
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        return f"index dtypes {indptr.dtype}/{indices.dtype}"
    if indptr.size != n_obs + 1:
        return f"indptr has {indptr.size} entries for {n_obs} rows"
    if indptr.size and (indptr[0] != 0 or np.any(np.diff(indptr.astype(np.int64)) < 0)):
        return "indptr does not start at 0 or decreases"
    if indptr.size and not int(indptr[-1]) == data.size == indices.size:
        return f"indptr ends at {indptr[-1]}, data has {data.size}, indices {indices.size}"
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_var):
        return "column index out of range"
    return ""


def _show(row: tuple[Any, ...] | None) -> str:
    if row is None:
        return "no such row"
    if len(row) == 1:
        return f"{row[0].dtype} {np.array2string(row[0].ravel()[:4], precision=6)}"
    return f"indices {row[0][:4].tolist()} data {row[1].dtype} {np.array2string(row[1][:4], precision=6)}"


def _same(yielded: tuple[Any, ...], ref: tuple[Any, ...] | None) -> bool:
    """Whether a yielded row equals a reference row, bit for bit and dtype for dtype."""
    if ref is None:
        return False
    if len(yielded) == 1:  # dense
        got, want = yielded[0], ref[0]
        return (
            got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()
        )
    got_idx, got_data = yielded
    want_idx, want_data = ref
    return (
        got_data.dtype == want_data.dtype
        and got_idx.shape == want_idx.shape
        and np.array_equal(got_idx.astype(np.int64), want_idx.astype(np.int64))
        and got_data.tobytes() == want_data.tobytes()
    )


# --------------------------------------------------------------------------------- the run
def _stage(name: str) -> None:
    print(f"[corruption-child] stage: {name}", file=sys.stderr, flush=True)


def _limit_memory() -> None:
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = (
            ADDRESS_SPACE_LIMIT
            if hard == resource.RLIM_INFINITY
            else min(hard, ADDRESS_SPACE_LIMIT)
        )
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # pragma: no cover - not on this platform
        pass


def _error_fields(e: BaseException, path: str) -> dict[str, Any]:
    import traceback

    from annbatch.errors import AnnbatchError

    message = str(e)
    names = {path, os.path.realpath(path), os.path.basename(path.rstrip(os.sep))}
    # The message, or the messages it was raised from, must say which store is damaged.
    chain = message
    cause = e.__cause__ or e.__context__
    while cause is not None and len(chain) < 10_000:
        chain += "\n" + str(cause)
        cause = cause.__cause__ or cause.__context__
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    return {
        "outcome": "annbatch_error" if isinstance(e, AnnbatchError) else "other_error",
        "error_type": f"{type(e).__module__}.{type(e).__qualname__}",
        "message": message[:MESSAGE_CHARS],
        "names_store": any(n and n in message for n in names),
        "where": [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames],
    }


def _batch_rows(x: Any, n: int) -> list[tuple[Any, ...]] | str:
    """The rows of a yielded batch (copies), or why they cannot be taken apart."""
    if isinstance(x, np.ndarray):
        if x.shape[0] != n:
            return f"batch X has {x.shape[0]} rows for {n} indices"
        return [(np.array(x[r]),) for r in range(n)]
    import scipy.sparse as sp

    if not sp.issparse(x) or x.format != "csr":
        return f"batch X is a {type(x).__module__}.{type(x).__name__}"
    indptr, indices, data = np.asarray(x.indptr), np.asarray(x.indices), np.asarray(x.data)
    if x.shape[0] != n or indptr.size != n + 1:
        return f"batch X has shape {x.shape} and {indptr.size} indptr entries for {n} indices"
    rows = []
    for r in range(n):
        lo, hi = int(indptr[r]), int(indptr[r + 1])
        if not 0 <= lo <= hi <= min(data.size, indices.size):
            return f"batch X has a malformed indptr ({lo}:{hi} of {data.size})"
        rows.append((indices[lo:hi].copy(), data[lo:hi].copy()))
    return rows


def _compare(
    batches: list[tuple[np.ndarray, list[tuple[Any, ...]], Any]],
    rows: Rows,
    names: np.ndarray | None,
    n_var: int | None,
    *,
    whole_epoch: bool = True,
) -> str:
    """Empty if the epoch yielded exactly ``rows`` (each once), else the first difference.
    Without ``whole_epoch``, the batches are those yielded before an error: each must hold
    the right rows, none twice, but rows may be missing."""
    seen = []
    for index, batch_rows, obs_index in batches:
        for k, i in enumerate(index.tolist()):
            want = rows.row(int(i))
            if not _same(batch_rows[k], want):
                return f"row {i} differs: yielded {_show(batch_rows[k])}, expected {_show(want)}"
        if names is not None and obs_index is not None:
            if index.size and (index.min() < 0 or index.max() >= names.size):
                return "index out of the obs range"
            if not np.array_equal(np.asarray(obs_index, dtype=str), names[index]):
                return "obs rows do not match the index"
        seen.append(index)
    order = np.sort(np.concatenate(seen)) if seen else np.empty(0, dtype=np.int64)
    if not whole_epoch:
        return "" if np.unique(order).size == order.size else "a row was yielded twice"
    if not np.array_equal(order, np.arange(rows.n)):
        return f"the epoch yielded {order.size} rows ({np.unique(order).size} distinct), not each of {rows.n} once"
    if n_var is not None and n_var != rows.n_var:
        return f"batches have {n_var} columns, the store {rows.n_var}"
    return ""


def run(args: dict[str, Any]) -> dict[str, Any]:
    family, path = args["family"], args["path"]
    result: dict[str, Any] = {"verify_checksums": "not asked"}

    _stage("oracle")
    oracle: Rows | None = None
    try:
        oracle = Rows(reference(family, path))
        result.update(oracle_ok=True, oracle_plausible=oracle.plausible)
        result["oracle_note"] = oracle.why_implausible
    except Exception as e:
        result.update(oracle_ok=False, oracle_plausible=False)
        result["oracle_note"] = f"{type(e).__name__}: {str(e)[:300]}"
    parts, names = load_reference(args["pristine"])
    pristine = Rows(parts)

    _stage("open")
    import h5py
    import zarr

    handle = None
    try:
        if family == "zarr":
            handle = zarr.open_group(path, mode="r")
        elif family == "h5ad":
            handle = h5py.File(path, "r")
    except Exception as e:
        return result | {
            "outcome": "open_failed",
            "error_type": f"{type(e).__module__}.{type(e).__qualname__}",
            "message": str(e)[:MESSAGE_CHARS],
            "names_store": False,
        }

    import annbatch

    batches: list[tuple[np.ndarray, list[tuple[Any, ...]], Any]] = []
    n_var: int | None = None
    stage = "load_x_and_obs"
    try:
        _stage(stage)
        if family == "collection":
            data: Any = annbatch.DatasetCollection(path)
        else:
            data = annbatch.load_x_and_obs(handle)
        stage = "Loader"
        _stage(stage)
        kwargs = {
            "batch_size": args["batch_size"],
            "chunk_size": args["chunk_size"],
            "preload_nchunks": args["preload_nchunks"],
            "shuffle": True,
            "return_index": True,
            "to": None,
            "read_ahead": args["read_ahead"],
            "rng": np.random.default_rng(args["seed"]),
        }
        if args.get("verify_checksums"):
            try:
                loader = annbatch.Loader(**kwargs, verify_checksums=True)
                result["verify_checksums"] = "passed"
            except TypeError as e:
                if "verify_checksums" not in str(e):
                    raise
                loader = annbatch.Loader(**kwargs)
                result["verify_checksums"] = "unsupported (TypeError): not passed"
        else:
            loader = annbatch.Loader(**kwargs)
        stage = "add"
        _stage(stage)
        if family == "collection":
            loader.use_collection(data, obs_index=True)  # compared with the cell names
        else:
            loader.add_anndata(data)
        n_var = loader.n_var
        stage = "iterate"
        _stage(stage)
        for batch in loader:
            index = np.asarray(batch["index"], dtype=np.int64).copy()
            taken = _batch_rows(batch["X"], index.size)
            if isinstance(taken, str):
                return result | {"outcome": "wrong_values", "mismatch": taken, "stage": stage}
            obs = batch["obs"]
            batches.append((index, taken, None if obs is None else obs.index.to_numpy()))
    except Exception as e:
        fields = _error_fields(e, path)
        if stage == "Loader":  # reads nothing: an error here is the harness's arguments
            fields["outcome"] = "harness_error"
        elif batches:  # what was yielded before the error must be right too
            fields["rows_before_error"] = int(sum(b[0].size for b in batches))
            before = _compare(batches, pristine, names, n_var, whole_epoch=False)
            if before:
                vs_oracle = "no oracle"
                if oracle is not None:
                    vs_oracle = _compare(batches, oracle, names, n_var, whole_epoch=False)
                if vs_oracle:
                    return result | {
                        "outcome": "wrong_values",
                        "mismatch": f"before the error ({fields.get('error_type')}): "
                        f"pristine: {before}; oracle: {vs_oracle}",
                        "stage": stage,
                    }
                fields["before_error"] = "equals_oracle"
        return result | fields | {"stage": stage}
    finally:
        if handle is not None and family == "h5ad":
            handle.close()

    _stage("compare")
    result["rows_yielded"] = int(sum(b[0].size for b in batches))
    against_pristine = _compare(batches, pristine, names, n_var)
    if not against_pristine:
        return result | {"outcome": "ok_exact_pristine"}
    against_oracle = "no oracle" if oracle is None else _compare(batches, oracle, names, n_var)
    if not against_oracle:
        return result | {"outcome": "ok_equals_oracle", "mismatch": against_pristine}
    return result | {
        "outcome": "wrong_values",
        "mismatch": f"pristine: {against_pristine}; oracle: {against_oracle}",
    }


def main() -> None:
    import faulthandler
    import warnings

    faulthandler.enable()
    _limit_memory()
    # torch is optional and the Loader is asked for numpy: without it the child starts in a
    # second instead of three (annbatch then iterates as a plain iterable).
    sys.modules["torch"] = None  # type: ignore[assignment]
    warnings.simplefilter("ignore")
    args = json.loads(sys.argv[1])
    result = run(args)
    _stage("done")
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
