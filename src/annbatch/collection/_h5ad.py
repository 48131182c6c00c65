"""Collections of h5ad files: a folder of ``dataset_NNNNNN.h5ad`` and a JSON manifest, read,
built, appended to and converted.

They are built as a zarr collection in a scratch folder inside the collection (so a build is
resumable and crash-safe exactly as a zarr build), then each dataset is rewritten as an h5ad
file (written to a temporary name and renamed, so a present file is a whole one), then the
manifest is written (atomically) and the scratch folder removed. Reading them needs no
manifest: a folder of ``.h5ad`` files written by another tool reads in file-name order.

An append to a finished collection goes the same way: the scratch zarr collection starts as a
copy of the manifest (its earlier datasets are read, for their obs types and var, from the h5ad
files), the zarr build appends the new datasets to it, and only those are converted. Until the
new manifest replaces the old one, readers see the collection as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import zarr

from annbatch._anndata_io import read_obs
from annbatch._narrow import widen
from annbatch.collection import _runner as runner
from annbatch.collection._build import checkpoint
from annbatch.collection._disk import naming, with_consequence
from annbatch.collection._store import ATTR, FORMAT_VERSION, CollectionStore
from annbatch.errors import CollectionPathError, StoreReadError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import numpy as np

    from annbatch.collection._policy import Request

MANIFEST = "annbatch-collection.json"
"""The manifest of an h5ad collection, in its folder."""
SCRATCH = "_annbatch_build.zarr"
"""The zarr collection an h5ad collection is built as, in its folder, until it is converted."""


class H5adStore(CollectionStore):
    """A collection of h5ad files: its folder and its JSON manifest (see the module)."""

    h5ad = True

    def state(self) -> dict[str, Any] | None:
        """The collection's state (see :func:`read_state`)."""
        return read_state(self.path, lambda p: CollectionStore(p).state())

    def open_datasets(self, names: Sequence[str], mode: str) -> list[Any]:
        """The h5ad files ``names``, opened read-only whatever ``mode`` (they close when no
        longer referenced)."""
        files = []
        for name in names:
            try:
                files.append(h5py.File(self.path / name, "r"))
            except OSError as e:
                msg = f"the dataset {name} of the collection {self.where} is not readable as an HDF5 file ({e}); the collection is damaged"
                raise StoreReadError(msg) from e
        return files

    def describe(self, names: Sequence[str], mode: str) -> list[dict[str, Any]]:
        """Each dataset's X as :func:`describe` gives it, and its bytes."""
        datasets = []
        for name in names:
            with h5py.File(self.path / name, "r") as f:
                entry = {"name": name, **describe(f)}
            datasets.append({**entry, "bytes": (self.path / name).stat().st_size})
        return datasets


def holds_h5ad(folder: Path) -> bool:
    """Whether ``folder`` holds an annbatch h5ad collection, finished or being built."""
    return any((folder / name).exists() for name in (MANIFEST, SCRATCH))


def add(
    store: H5adStore,
    request: Request,
    rng: np.random.Generator | int | None,
    load_adata: Callable[[Any], ad.AnnData] | None,
    *,
    compressor: str | None,
    append: bool,
    force: bool,
    progress: bool,
) -> None:
    """Build the h5ad collection at ``store``, resume its build, or append to it: a zarr build
    of the scratch collection (:func:`annbatch.collection._runner.add`), then :func:`convert`.
    A call without ``append`` on a finished collection is checked as a zarr collection's."""
    folder = store.path
    state = store.state()
    scratch_path = folder / SCRATCH
    appending = state is not None and state["state"] == "complete"
    pending = False
    if state is not None and appending:
        pending = _pending_append(folder, state)
        if scratch_path.exists() and not pending:  # killed after the manifest was written
            checkpoint("delete the h5ad build's scratch")
            shutil.rmtree(scratch_path)
        if not (append or pending):
            # Without append, a finished collection is never written to: the call that built
            # it writes nothing, any other is refused (annbatch.collection._policy.is_repeat).
            runner.add(store, request, rng, load_adata, append=False, force=force, progress=False)
            return
    try:
        if not appending:
            with naming(folder):
                folder.mkdir(parents=True, exist_ok=True)
        elif not pending:
            _begin_append(store, state)  # type: ignore[arg-type]
        scratch = CollectionStore(scratch_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner.add(
                scratch, request, rng, load_adata, append=appending, force=force, progress=progress
            )
        for w in caught:  # said of the collection, not of its scratch folder
            if (pending or not appending) and "nothing was written" in str(w.message):
                continue  # built already, interrupted while converting: the conversion resumes
            text = str(w.message).replace(str(scratch_path), str(folder))
            warnings.warn(text, w.category, stacklevel=3)
        convert(folder, scratch, compressor)
    except Exception as e:
        where = store.where
        full = with_consequence(e, where, runner.after_full_disk(where, append=appending))
        # A refused append (nothing began) or one that found the disk full is undone; one
        # that failed otherwise after its scratch build finished resumes when run again.
        if appending and (full is not None or not _pending_append(folder, state)):  # type: ignore[arg-type]
            _undo_append(folder, state)  # type: ignore[arg-type]
        if full is None:
            raise
        raise full from full.__cause__


def _undo_append(folder: Path, state: dict[str, Any]) -> None:
    """Put the h5ad collection ``state`` back as it was, unless the append's manifest
    replaced its own already: delete the files the append converted, then its scratch
    collection (its manifest first: a half-deleted scratch is not an append to resume)."""
    if read_state(folder, lambda p: None) != state:
        return  # the append finished
    scratch = folder / SCRATCH
    try:
        held = CollectionStore(scratch).state() or {}
    except CollectionPathError:
        held = {}
    kept = {d["name"] for d in state["datasets"]}
    for entry in held.get("datasets", []):
        target = folder / f"{entry['name']}.h5ad"
        if target.name not in kept:
            target.unlink(missing_ok=True)
            target.with_suffix(".h5ad.tmp").unlink(missing_ok=True)
    (folder / f"{MANIFEST}.tmp").unlink(missing_ok=True)
    (scratch / "zarr.json").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)


def _pending_append(folder: Path, state: dict[str, Any]) -> bool:
    """Whether the scratch collection holds an interrupted append to the finished h5ad
    collection ``state``: a build in progress, or datasets not converted yet."""
    scratch = folder / SCRATCH
    if not scratch.exists():
        return False
    try:
        held = CollectionStore(scratch).state()
    except CollectionPathError:
        return False  # not even begun: left to be deleted
    if held is None:
        return False
    return held["state"] != "complete" or len(held["datasets"]) > len(state["datasets"])


def _begin_append(store: H5adStore, state: dict[str, Any]) -> None:
    """Start an append to a finished h5ad collection: a scratch zarr collection whose
    manifest is the h5ad collection's (its datasets are read from the h5ad files), which
    the zarr build appends to as to any collection; the new datasets are converted after."""
    if state.get("version") != FORMAT_VERSION or "x" not in state:
        msg = (
            f"{store.where} is a folder of h5ad files without annbatch's manifest; appending "
            "needs a collection annbatch built. Build a new collection from these files instead"
        )
        raise CollectionPathError(msg)
    base = {k: v for k, v in state.items() if k not in ("format", "h5ad_compressor")}
    base["state"] = "complete"
    base["datasets"] = [{**d, "name": d["name"].removesuffix(".h5ad")} for d in state["datasets"]]
    checkpoint("begin h5ad append")
    with naming(store.path / SCRATCH):
        zarr.create_group(
            store.path / SCRATCH, zarr_format=3, attributes={ATTR: base}, overwrite=True
        )


def read_state(
    folder: Path, read_scratch: Callable[[Path], dict[str, Any] | None]
) -> dict[str, Any] | None:
    """The h5ad collection's state: its manifest; a build in progress (the scratch zarr
    collection's state, marked as building); the ``.h5ad`` files of a folder without a
    manifest; or None for an empty or missing folder."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return None
    if not folder.is_dir():
        msg = f"{folder} is a file; an h5ad collection is a folder"
        raise CollectionPathError(msg)
    manifest = folder / MANIFEST
    if manifest.exists():
        return json.loads(manifest.read_text())
    if (folder / SCRATCH).exists():
        state = read_scratch(folder / SCRATCH)
        return None if state is None else {**state, "state": "building"}
    files = sorted(p.name for p in folder.glob("*.h5ad"))
    if not files:
        msg = f"{folder} holds neither an h5ad collection nor .h5ad files; choose another path"
        raise CollectionPathError(msg)
    datasets = []
    var_names: list[str] = []
    for name in files:
        with h5py.File(folder / name, "r") as f:
            obs = f["obs"]
            index = obs[obs.attrs.get("_index", "_index")]
            datasets.append({"name": name, "n_obs": int(index.shape[0])})
            if not var_names:
                var = f["var"]
                var_names = [
                    str(v) for v in ad.io.read_elem(var[var.attrs.get("_index", "_index")])
                ]
    return {"state": "complete", "datasets": datasets, "var_names": var_names, "format": "h5ad"}


def describe(f: h5py.File) -> dict[str, Any]:
    """Rows, columns, dtype, stored entries (CSR), codec and chunking of an h5ad dataset's X,
    as :func:`annbatch.collection._layout.describe_x` gives them for a zarr dataset."""
    if "X" not in f:
        obs, var = f["obs"], f["var"]
        return {
            "n_obs": int(obs[obs.attrs.get("_index", "_index")].shape[0]),
            "n_var": int(var[var.attrs.get("_index", "_index")].shape[0]),
            "dtype": None, "stored": "-", "nnz": None, "encoding": "none", "chunks": (),
            "shards": None, "codec": "-", "checksum": False,
        }  # fmt: skip
    x = f["X"]
    csr = isinstance(x, h5py.Group)
    values = x["data"] if csr else x
    shape = tuple(int(n) for n in (x.attrs["shape"] if csr else x.shape))
    stored = str(values.dtype) + (f" + {x['indices'].dtype} indices" if csr else "")
    return {
        "n_obs": shape[0],
        "n_var": shape[1] if len(shape) > 1 else 1,
        "dtype": str(values.dtype),
        "stored": stored,
        "nnz": int(values.shape[0]) if csr else None,
        "encoding": str(x.attrs.get("encoding-type", "array")),
        "chunks": tuple(values.chunks or ()),
        "shards": None,
        "codec": values.compression or "none",
        "checksum": bool(values.fletcher32),
    }


def _widen(adata: ad.AnnData, group: Any) -> None:
    """X, layers and obsm of a dataset read from a packed zarr collection, in the types the
    inputs had (see :mod:`annbatch._narrow`)."""
    if "X" in group and adata.X is not None:
        adata.X = widen(adata.X, group["X"])
    for key in ("layers", "obsm"):
        mapping = getattr(adata, key)
        for name in list(mapping.keys()):
            if key in group and name in group[key]:
                mapping[name] = widen(mapping[name], group[key][name])


def _h5ad_image(adata: ad.AnnData, compressor: str | None) -> io.BytesIO:
    """``adata`` as an h5ad file in memory (what ``write_h5ad`` writes to disk).

    The file is written out by Python, not by HDF5: HDF5 that meets a full disk cannot close
    the file, and a later h5py call of the process may crash (seen: a segfault closing
    another file)."""
    image = io.BytesIO()
    with (
        warnings.catch_warnings(),
        ad.settings.override(allow_write_nullable_strings=True),
    ):
        warnings.simplefilter("ignore")
        adata.strings_to_categoricals()  # as write_h5ad does
        with h5py.File(image, "w") as f:
            ad.io.write_elem(f, "/", adata, dataset_kwargs={"compression": compressor})
    return image


@contextlib.contextmanager
def _whole_or_none(tmp: Path, target: Path) -> Iterator[None]:
    """Writing ``tmp`` to rename it to ``target``: on failure the partial file is deleted (it
    may hold the space a full disk lacks), and a full disk names ``target``."""
    try:
        with naming(target):
            yield
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def convert(folder: Path, scratch: CollectionStore, compressor: str | None) -> None:
    """Rewrite every dataset of the finished zarr collection ``scratch`` that is not an h5ad
    file in ``folder`` yet as one, then write the manifest and remove the scratch collection."""
    datasets = []
    state = scratch.complete_state()
    root = zarr.open_group(scratch.path, mode="r")
    for entry in state["datasets"]:
        name = entry["name"]
        target = folder / f"{name}.h5ad"
        if not target.exists():  # (after an append, the datasets before it are h5ad files)
            checkpoint(f"convert {name} to h5ad")
            group: Any = root[name]
            adata = ad.io.read_elem(group)  # one dataset in memory (and its h5ad image, below)
            adata.obs = read_obs(group)  # with the types annbatch stores differently restored
            _widen(adata, group)  # h5ad files hold the values in the type the inputs had
            image = _h5ad_image(adata, compressor)
            del adata
            tmp = target.with_suffix(".h5ad.tmp")
            with _whole_or_none(tmp, target):
                with open(tmp, "wb") as f:
                    f.write(image.getbuffer())
                os.replace(tmp, target)
            del image
        datasets.append({"name": target.name, "n_obs": entry["n_obs"]})
    manifest = {
        **{k: v for k, v in state.items() if k != "datasets"},
        "datasets": datasets,
        "format": "h5ad",
        "h5ad_compressor": compressor,
    }
    checkpoint("manifest: h5ad")
    tmp = folder / f"{MANIFEST}.tmp"
    with _whole_or_none(tmp, folder / MANIFEST):
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, folder / MANIFEST)
    checkpoint("delete the h5ad build's scratch")
    shutil.rmtree(folder / SCRATCH)
