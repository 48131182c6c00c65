"""Inputs of a collection build: open AnnData files or objects, check them, align their genes.

Every check runs before anything is written: missing or unreadable files, CSC matrices,
dense mixed with sparse, non-unique gene names and differing dtypes each raise a clear error
naming the input.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import anndata.abc
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from annbatch import _legacy
from annbatch._narrow import widened
from annbatch.collection._lazy import LazyRows, is_lazy
from annbatch.collection._obs import FrameColumns, GroupColumns, ObsColumns
from annbatch.errors import (
    IncompatibleDatasetsError,
    InputFileError,
    InvalidArgumentError,
    UnsupportedDatasetError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

SOURCE_COLUMN = "src_path"
"""obs column of a collection that names the input each row came from."""


@dataclass
class Input:
    """One input, opened: X stays where it is (on disk, or the AnnData's own matrix)."""

    name: str
    """How the input is named in errors and in the ``src_path`` obs column."""
    x: Any
    """Row-sliceable matrix: ``x[a:b]`` gives numpy rows or scipy CSR rows; None for an
    AnnData without X (its rows are then in its layers and obsm only)."""
    obs: ObsColumns
    """obs, read a column at a time."""
    var_names: pd.Index
    dtype: np.dtype | None
    """X's dtype (None without X)."""
    sparse: bool
    handle: Any = None
    """An open h5py.File to close when the build is done."""
    read_var: Callable[[], pd.DataFrame] | None = None
    """Reads the input's var (only needed to merge var columns)."""
    elements: dict[str, Any] = field(default_factory=dict)
    """Row-indexed elements besides X, by path (``"layers/counts"``, ``"obsm/X_pca"``): each
    row-sliceable, dense of any rank or CSR (layers share X's genes)."""

    @property
    def has_x(self) -> bool:
        return self.x is not None

    @property
    def n_obs(self) -> int:
        return int(self.obs.n_obs if self.x is None else self.x.shape[0])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def _x_of(x: Any, name: str) -> tuple[Any, bool]:
    """(row-sliceable X, is sparse) or a clear error; (None, False) without X."""
    if x is None:
        return None, False
    if is_lazy(x):  # a dask array (anndata.experimental.read_elem_lazy): read block by block
        if x.ndim != 2:
            msg = f"{name}: X is a lazily loaded array of {x.ndim} dimensions; expected 2"
            raise UnsupportedDatasetError(msg)
        lazy = LazyRows(x, f"{name}: X")
        return lazy, lazy.is_sparse
    if isinstance(x, anndata.abc.CSCDataset) or (
        isinstance(x, sp.spmatrix | sp.sparray) and x.format != "csr"
    ):
        msg = f"{name}: X is stored as CSC (or another non-CSR sparse format); rewrite it as CSR (`adata.X = adata.X.tocsr()`)"
        raise UnsupportedDatasetError(msg)
    if isinstance(x, anndata.abc.CSRDataset | sp.csr_matrix | sp.csr_array):
        return x, True
    if isinstance(x, np.ndarray | h5py.Dataset | zarr.Array) and x.ndim == 2:
        return x, False
    kind = f"{type(x).__module__.split('.')[0]}.{type(x).__qualname__}"
    msg = f"{name}: X has type {kind}; expected a 2-D dense array or a CSR matrix"
    raise UnsupportedDatasetError(msg)


def _open_group(path: Path) -> tuple[Any, Any]:
    """(root group, handle to close) of an h5ad file or a zarr AnnData store."""
    if not path.exists():
        msg = f"input {path} does not exist"
        raise InputFileError(msg)
    try:
        if path.is_dir():
            return zarr.open_group(path, mode="r"), None
        handle = h5py.File(path, mode="r")
    except Exception as e:
        msg = f"input {path} is neither a readable h5ad file nor a zarr AnnData store ({e})"
        raise InputFileError(msg) from e
    return handle, handle


def open_input(
    item: str | os.PathLike[str] | ad.AnnData | zarr.Group | h5py.Group,
    position: int,
    name: str | None = None,
) -> Input:
    """Open one input (a path to .h5ad / .zarr, an open AnnData group, or an AnnData)
    without reading X; ``name`` overrides how it is named (in errors and ``src_path``)."""
    if isinstance(item, ad.AnnData):
        if name is None:
            name = str(item.filename) if item.isbacked else f"AnnData {position}"
        x, sparse = _x_of(item.X, name)
        x = _widened_on_disk(x, f"{name}: X")
        return Input(
            name,
            x,
            FrameColumns(item.obs),
            pd.Index(item.var_names),
            None if x is None else np.dtype(x.dtype),
            sparse,
            read_var=lambda: item.var,
            elements=_elements(item, name),
        )
    if isinstance(item, zarr.Group | h5py.Group):
        where = item.file.filename if isinstance(item, h5py.Group) else str(item.store_path)
        return _from_group(item, name or where, None)
    if not isinstance(item, str | os.PathLike):
        msg = f"input {position} is a {type(item).__name__}; expected a path, an AnnData group or an AnnData"
        raise InvalidArgumentError(msg)
    path = Path(item)
    group, handle = _open_group(path)
    return _from_group(group, name or str(path), handle)


def _from_group(group: Any, name: str, handle: Any) -> Input:
    whole_var: pd.DataFrame | None = None  # var of an older encoding, read whole
    try:
        if "obs" not in group or "var" not in group:
            msg = f"input {name} holds no AnnData (it needs obs and var)"
            raise InputFileError(msg)
        if group["obs"].attrs.get("encoding-version") == "0.2.0":
            obs: ObsColumns = GroupColumns(group["obs"])
            var_names = GroupColumns(group["var"]).index()
        else:  # older encodings (anndata < 0.8), read whole: see annbatch._legacy
            obs = FrameColumns(_legacy.read_frame(group, "obs"))
            whole_var = _legacy.read_frame(group, "var")
            var_names = pd.Index(whole_var.index)
        elements = _elements(group, name)
        x, sparse = _x_of(_legacy.open_element(group.get("X")), name)
        if x is not None:  # X of a packed collection: read back in the type it had
            x = _widened_on_disk(x, f"{name}: X")
    except Exception:
        if handle is not None:
            handle.close()
        raise

    def read_var() -> pd.DataFrame:
        return whole_var if whole_var is not None else _legacy.read_frame(group, "var")

    dtype = None if x is None else np.dtype(x.dtype)
    return Input(name, x, obs, var_names, dtype, sparse, handle, read_var, elements)


ELEMENT_GROUPS = ("layers", "obsm")
"""AnnData's row-indexed mappings that a collection carries besides X."""


def _elements(adata: Any, name: str) -> dict[str, Any]:
    """The layers and obsm arrays of an AnnData (or an AnnData group), row-sliceable; obsm
    data frames, which a collection does not carry, are left out with a warning."""
    found: dict[str, Any] = {}
    skipped = []
    for key in ELEMENT_GROUPS:
        if isinstance(adata, ad.AnnData):
            mapping = dict(getattr(adata, key).items())
        else:  # on disk, in any encoding (sparse groups opened): see annbatch._legacy
            mapping = _legacy.elements(adata, key)
        for elem_name, elem in mapping.items():
            path = f"{key}/{elem_name}"
            if isinstance(elem, h5py.Group | zarr.Group):  # data frames and the like
                skipped.append(path)
                continue
            if is_lazy(elem):  # a dask array: read block by block (CSC is not carried)
                if getattr(getattr(elem, "_meta", None), "format", "csr") != "csr":
                    skipped.append(path)
                    continue
                elem = LazyRows(elem, f"{name}: {path}")
            elem = _widened_on_disk(elem, f"{name}: {path}")
            if isinstance(elem, pd.DataFrame) or not hasattr(elem, "shape"):
                skipped.append(path)
                continue
            if isinstance(elem, anndata.abc.CSCDataset) or (
                sp.issparse(elem) and elem.format != "csr"
            ):
                skipped.append(path)
                continue
            found[path] = elem
    if skipped:
        warnings.warn(
            f"{name}: {', '.join(skipped[:8])} {'is' if len(skipped) == 1 else 'are'} not carried "
            "into the collection (only dense arrays and CSR matrices are)",
            UserWarning,
            stacklevel=5,
        )
    return found


def _widened_on_disk(x: Any, where: str) -> Any:
    """``x`` widened if it is an element on disk (an anndata CSR dataset, a zarr or h5py array)
    of a packed collection; anything else (in memory, where the record is lost) as it is."""
    if isinstance(x, anndata.abc.CSRDataset):
        return widened(x, x.group, where)
    if isinstance(x, zarr.Array | h5py.Dataset):
        return widened(x, x, where)
    return x


def open_inputs(
    items: Sequence[str | os.PathLike[str] | ad.AnnData | zarr.Group | h5py.Group],
    load_adata: Callable[[Any], ad.AnnData] | None = None,
) -> list[Input]:
    """Open and check all inputs (each through ``load_adata`` when given); close them all if
    any check fails."""
    if isinstance(items, str | os.PathLike | ad.AnnData | zarr.Group | h5py.Group):
        items = [items]
    if not items:
        msg = "no inputs given; pass paths to .h5ad or .zarr AnnData stores, or AnnData objects"
        raise InvalidArgumentError(msg)
    if load_adata is not None and not callable(load_adata):
        msg = f"load_adata must be a callable returning an AnnData, got {load_adata!r}"
        raise InvalidArgumentError(msg)
    opened: list[Input] = []
    try:
        for i, item in enumerate(items):
            if load_adata is None:
                opened.append(open_input(item, i))
                continue
            adata = load_adata(item)
            if not isinstance(adata, ad.AnnData):
                msg = f"load_adata({item!r}) returned a {type(adata).__name__}; expected an AnnData"
                raise InvalidArgumentError(msg)
            name = str(item) if isinstance(item, str | os.PathLike) else None
            opened.append(open_input(adata, i, name=name))
        check_inputs(opened)
    except BaseException:
        for inp in opened:
            inp.close()
        raise
    return opened


def check_inputs(inputs: Sequence[Input]) -> None:
    """Raise if the inputs cannot form one collection."""
    for inp in inputs:
        if not inp.var_names.is_unique:
            dup = inp.var_names[inp.var_names.duplicated()].unique()[:5].tolist()
            msg = f"{inp.name}: gene names are not unique (for example {dup}); make them unique first (`adata.var_names_make_unique()`)"
            raise IncompatibleDatasetsError(msg)
        if inp.obs.n_obs != inp.n_obs:
            msg = f"{inp.name}: obs has {inp.obs.n_obs} rows but X has {inp.n_obs}"
            raise IncompatibleDatasetsError(msg)
        if not inp.has_x and not inp.elements:
            msg = f"{inp.name} has neither X nor a layer or obsm array: it holds nothing to stream"
            raise IncompatibleDatasetsError(msg)
    if sum(inp.n_obs for inp in inputs) == 0:
        msg = f"the inputs hold no rows ({', '.join(inp.name for inp in inputs)})"
        raise InvalidArgumentError(msg)
    first = inputs[0]
    for inp in inputs[1:]:
        if inp.has_x != first.has_x:
            with_x, without = (inp, first) if inp.has_x else (first, inp)
            msg = f"{with_x.name} has X but {without.name} has none; a collection holds X from every input or from none"
            raise IncompatibleDatasetsError(msg)
        if not first.has_x:
            continue
        if inp.sparse != first.sparse:
            kinds = {True: "sparse CSR", False: "dense"}
            msg = f"{inp.name}: X is {kinds[inp.sparse]} but {first.name} is {kinds[first.sparse]}; a collection holds one kind"
            raise IncompatibleDatasetsError(msg)
        if inp.dtype != first.dtype:
            msg = f"{inp.name}: X has dtype {inp.dtype} but {first.name} has {first.dtype}; cast them to one dtype first"
            raise IncompatibleDatasetsError(msg)


@dataclass(frozen=True)
class ElementSpec:
    """What one carried element holds, the same in every input."""

    path: str
    """``"layers/<name>"`` or ``"obsm/<name>"``."""
    sparse: bool
    dtype: np.dtype
    tail: tuple[int, ...]
    """Shape after the rows (obsm; layers: ``()``, their columns are the genes)."""

    @property
    def is_layer(self) -> bool:
        return self.path.startswith("layers/")

    def describe(self) -> dict[str, Any]:
        """A JSON description, recorded in the collection's manifest."""
        return {"sparse": self.sparse, "dtype": self.dtype.str, "tail": list(self.tail)}


def element_specs(inputs: Sequence[Input]) -> list[ElementSpec]:
    """The elements every input has (an inner join, as ``anndata.concat``'s default); the
    others are dropped with a warning. Raise if a shared one differs in kind or shape."""
    shared = [p for p in inputs[0].elements if all(p in inp.elements for inp in inputs[1:])]
    dropped = sorted({p for inp in inputs for p in inp.elements} - set(shared))
    if dropped:
        warnings.warn(
            f"{', '.join(dropped[:8])} {'is' if len(dropped) == 1 else 'are'} not in every input "
            "and not carried into the collection (only elements all inputs have are)",
            UserWarning,
            stacklevel=4,
        )
    specs = []
    for path in shared:
        kinds = set()
        for inp in inputs:
            elem = inp.elements[path]
            sparse = (
                sp.issparse(elem)
                or isinstance(elem, anndata.abc.CSRDataset)
                or getattr(elem, "is_sparse", False)
            )
            tail = () if path.startswith("layers/") else tuple(int(d) for d in elem.shape[1:])
            if elem.shape[0] != inp.n_obs:
                has = "X has" if inp.has_x else "obs has"
                msg = f"{inp.name}: {path} has {elem.shape[0]} rows but {has} {inp.n_obs}"
                raise IncompatibleDatasetsError(msg)
            if path.startswith("layers/") and elem.shape[1:] != (len(inp.var_names),):
                msg = f"{inp.name}: {path} has shape {elem.shape}; a layer has X's shape"
                raise IncompatibleDatasetsError(msg)
            kinds.add((sparse, np.dtype(elem.dtype), tail))
        if len(kinds) > 1:
            listed = sorted(f"{'sparse' if k[0] else 'dense'} {k[1]} {k[2]}" for k in kinds)
            msg = f"{path} differs between the inputs ({'; '.join(listed)}); cast it to one kind first"
            raise IncompatibleDatasetsError(msg)
        sparse, dtype, tail = kinds.pop()
        specs.append(ElementSpec(path, sparse, dtype, tail))
    if not inputs[0].has_x and not specs:
        msg = "the inputs have no X and share no layer or obsm array: the collection would hold nothing to stream"
        raise IncompatibleDatasetsError(msg)
    return specs


def union_var_names(inputs: Sequence[Input]) -> pd.Index:
    """Outer join of the inputs' gene names, in order of first appearance."""
    seen: dict[str, None] = {}
    for inp in inputs:
        seen.update(dict.fromkeys(inp.var_names.astype(str)))
    return pd.Index(list(seen), dtype=object)


def column_map(inp: Input, var_names: pd.Index) -> np.ndarray | None:
    """Output column of each input column (-1: dropped); None when they are the same."""
    names = inp.var_names.astype(str)
    if names.equals(var_names):
        return None
    return var_names.get_indexer(names).astype(np.int64)


def align_rows(rows: Any, mapping: np.ndarray | None, n_var: int) -> Any:
    """Rows of an input with their columns moved to the collection's genes (zeros elsewhere)."""
    if mapping is None:
        return rows
    if sp.issparse(rows):
        rows = sp.csr_matrix(rows)
        cols = mapping[rows.indices]
        keep = cols >= 0
        kept_before = np.concatenate([[0], np.cumsum(keep)])  # kept entries before each position
        indptr = kept_before[rows.indptr]
        out = sp.csr_matrix((rows.data[keep], cols[keep], indptr), shape=(rows.shape[0], n_var))
        out.sort_indices()
        return out
    out = np.zeros((rows.shape[0], n_var), dtype=rows.dtype)
    keep = mapping >= 0
    out[:, mapping[keep]] = np.asarray(rows)[:, keep]
    return out
