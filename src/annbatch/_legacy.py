"""AnnData's older on-disk encodings, read element by element: the one place that knows them.

Every reader of an input goes through here: the collection builder
(:func:`annbatch.collection._inputs.open_input`) and the Loader's
:func:`annbatch.load_x_and_obs`. Files written before anndata 0.7 (scanpy still ships one,
``pbmc68k_reduced``) differ from today's encodings in three ways:

- **data frames** (obs, var) are one compound array, a field per column, the first field the
  index; a categorical column holds integer codes, and its categories are in
  ``uns["<column>_categories"]``;
- **mappings** (obsm, varm) are one compound array too, a field per entry: ``obsm["X_pca"]``
  is the field ``X_pca``, of shape ``(50,)`` per row;
- **sparse matrices** are groups marked by an ``h5sparse_format`` attribute (``"csr"`` or
  ``"csc"``) instead of anndata's ``encoding-type``.

anndata's own element readers are used where they handle these: ``anndata.io.read_elem``
reads a compound array into a numpy record array (decoding fixed-width bytes in h5py, not in
zarr), and ``anndata.io.sparse_dataset`` opens h5sparse groups on disk. No public anndata
reader turns a compound array into a data frame or finds its categories in ``uns``: only
``read_h5ad`` and ``read_zarr`` of a whole store do, with every element (for zarr, X too) in
memory. That part is here, following anndata's rules (the first field is the index; a column
becomes categorical when ``uns`` has its categories and every code indexes into them), and
the tests compare it with ``anndata.read_h5ad`` on real files.

anndata 0.7's encodings (``encoding-version`` 0.1.0; categories under ``__categories``) carry
encoding metadata, and ``anndata.io.read_elem`` reads them as they are.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, TypeVar

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import zarr

if TYPE_CHECKING:
    from collections.abc import Callable

_SPARSE_ENCODINGS = frozenset({"csr_matrix", "csc_matrix"})
_T = TypeVar("_T")


def is_records(elem: Any) -> bool:
    """Whether ``elem`` is a compound array (a data frame or mapping written before anndata 0.7)."""
    return isinstance(elem, h5py.Dataset | zarr.Array) and elem.dtype.names is not None


def is_sparse_group(elem: Any) -> bool:
    """Whether ``elem`` is a group holding a sparse matrix, in anndata's encoding or h5sparse's."""
    if not isinstance(elem, h5py.Group | zarr.Group):
        return False
    return elem.attrs.get("encoding-type") in _SPARSE_ENCODINGS or "h5sparse_format" in elem.attrs


def open_element(elem: Any) -> Any:
    """A stored element ready to read rows from: sparse groups (either marking) opened with
    anndata's ``sparse_dataset``; anything else as it is."""
    if is_sparse_group(elem):
        return _quiet(ad.io.sparse_dataset, elem)
    return elem


def read_frame(group: zarr.Group | h5py.Group, key: str) -> pd.DataFrame:
    """The data frame ``group[key]`` (``"obs"`` or ``"var"``) in any encoding anndata reads,
    whole; a compound array gets its categories from ``group["uns"]``."""
    elem = group[key]
    if not is_records(elem):
        frame: pd.DataFrame = _quiet(ad.io.read_elem, elem)
        return frame
    records = _quiet(ad.io.read_elem, elem)
    names = list(records.dtype.names)
    frame = pd.DataFrame({name: _decoded(records[name]) for name in names[1:]})
    frame.index = pd.Index(_decoded(records[names[0]]), name=names[0])
    uns = group.get("uns")
    if isinstance(uns, h5py.Group | zarr.Group):
        for column in frame.columns:
            stored = uns.get(f"{column}_categories")
            if stored is not None:
                frame[column] = _categorical(frame[column], stored)
    return frame


def _categorical(column: pd.Series, stored: Any) -> pd.Series | pd.Categorical:
    """``column``'s codes with the categories ``stored`` in uns, where they fit (else as is:
    obs and var share uns, so the name may be the other frame's column's, as in anndata)."""
    categories = np.atleast_1d(_decoded(np.asarray(_quiet(ad.io.read_elem, stored))))
    codes = column.to_numpy()
    if codes.dtype.kind not in "iu" or not len(codes):
        return column
    if codes.min() < -1 or codes.max() >= len(categories):
        return column
    return pd.Categorical.from_codes(codes, categories)


def elements(group: zarr.Group | h5py.Group, key: str) -> dict[str, Any]:
    """The entries of the mapping ``group[key]`` (``"obsm"``, ``"varm"``, ``"layers"``), on
    disk, by name: a compound array's fields as :class:`RecordField`, sparse groups opened (see
    :func:`open_element`), arrays and other groups (data frames) as they are."""
    elem: Any = group.get(key)
    if elem is None:
        return {}
    if is_records(elem):
        return {name: RecordField(elem, name) for name in elem.dtype.names}
    if not isinstance(elem, h5py.Group | zarr.Group):
        return {}
    return {name: open_element(elem[name]) for name in elem}


class RecordField:
    """One field of a compound array, sliceable by rows like an array: ``field[a:b]`` has shape
    ``(b - a, *field_shape)``. h5py reads only this field's bytes; zarr reads the records."""

    def __init__(self, records: h5py.Dataset | zarr.Array, name: str) -> None:
        fields: Any = records.dtype.fields
        field_dtype: np.dtype = fields[name][0]
        self.records: Any = records
        self.name = name
        self.dtype: np.dtype = field_dtype.base
        self.shape: tuple[int, ...] = (int(records.shape[0]), *field_dtype.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(self.records, h5py.Dataset):
            return np.asarray(self.records.fields(self.name)[rows])
        return np.ascontiguousarray(self.records[rows][self.name])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[:]
        return values if dtype is None else values.astype(dtype)

    def __repr__(self) -> str:
        return f"RecordField({self.name!r} of {self.records.name}, shape={self.shape}, dtype={self.dtype})"


def _decoded(values: np.ndarray) -> np.ndarray:
    """Fixed-width bytes as strings (UTF-8); anything else as it is."""
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8")
    return values


def _quiet(read: Callable[[Any], _T], elem: Any) -> _T:
    """``read(elem)`` without anndata's notes on old encodings (the user cannot act on them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read(elem)
