"""Narrow value types: counts stored in the smallest integer type that holds them exactly.

Single-cell counts are small integers held in float32 (4 bytes), and column indices fit in 16
bits for up to 65,536 genes. A collection in a ``packed`` layout (see
:mod:`annbatch.collection._layout`) stores each such array in the narrowest integer type that
holds every value exactly, chosen per array at write time, and records the type the values had
in the attribute :data:`VALUES_DTYPE_ATTR` of the element (the CSR group, or the dense array).
Rows stay fixed-width, so a row range is still a byte range.

Readers widen back: annbatch's row sources yield the recorded type (or, on request, the stored
one); anndata, which knows nothing of the attribute, reads the narrow type with the same values.
Only exact narrowing is done: a value that is not an integer (or is NaN, infinite or -0.0), or
an array whose range needs as many bytes as it has, is stored as it is.
"""

from __future__ import annotations

from typing import Any

import anndata.abc
import numpy as np
import scipy.sparse as sp

from annbatch.errors import CorruptDataError

VALUES_DTYPE_ATTR = "annbatch-values-dtype"
"""Attribute of a narrowed element (a CSR group or a dense array): the dtype its values had,
which readers widen to."""

_UNSIGNED = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))
_SIGNED = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32))
_BLOCK = 1 << 22
"""Values checked at a time (bounds the temporaries of the checks)."""


def narrowest(values: np.ndarray) -> np.dtype | None:
    """The narrowest integer dtype that holds every value of ``values`` exactly, if it is
    narrower than ``values.dtype``; None otherwise (also for non-numeric or empty arrays)."""
    dtype = np.dtype(values.dtype)
    if dtype.kind not in "fiu" or values.size == 0:
        return None
    flat = values.reshape(-1)
    lo, hi = np.inf, -np.inf
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        if dtype.kind == "f":
            if not np.all(np.isfinite(block)) or not np.array_equal(block, np.rint(block)):
                return None
            if np.any(np.signbit(block) & (block == 0)):  # -0.0 would come back as 0.0
                return None
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    for candidate in _UNSIGNED if lo >= 0 else _SIGNED:
        info = np.iinfo(candidate)
        if info.min <= lo and hi <= info.max:
            return candidate if candidate.itemsize < dtype.itemsize else None
    return None


def narrow_values(x: Any) -> tuple[Any, np.dtype | None]:
    """``x`` (a numpy array or a scipy CSR matrix) with its values in :func:`narrowest`'s
    type, and the dtype they had (None: left as they were). CSR column indices are narrowed
    too (to uint16 for up to 65,536 columns); readers widen them to int32 whatever the
    attribute says."""
    if sp.issparse(x):
        narrow = narrowest(x.data)
        index_type = _index_dtype(x.shape[1], x.indices.dtype)
        if narrow is None and index_type == x.indices.dtype:
            return x, None
        data = x.data if narrow is None else x.data.astype(narrow)
        indices = x.indices.astype(index_type, copy=False)
        out = sp.csr_matrix(x.shape, dtype=data.dtype)
        out.data, out.indices, out.indptr = data, indices, x.indptr  # scipy would widen indices
        return out, np.dtype(x.dtype)
    narrow = narrowest(np.asarray(x))
    if narrow is None:
        return x, None
    return np.asarray(x).astype(narrow), np.dtype(x.dtype)


def _index_dtype(n_var: int, current: np.dtype) -> np.dtype:
    for candidate in _UNSIGNED:
        if n_var <= int(np.iinfo(candidate).max) + 1:
            return (
                candidate if candidate.itemsize < np.dtype(current).itemsize else np.dtype(current)
            )
    return np.dtype(current)


_NUMERIC = {
    name: np.dtype(name)
    for name in (
        "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
        "float16", "float32", "float64",
    )
}  # fmt: skip
"""The dtypes the attribute may name (numpy's names: native byte order, nothing to parse)."""


def declared_dtype(attrs: Any, stored: np.dtype, where: str) -> np.dtype | None:
    """The dtype an element's values had before they were narrowed (its
    :data:`VALUES_DTYPE_ATTR`), checked: a numeric dtype that holds every value of the stored
    one. None when the element carries no such attribute.

    Raises
    ------
    CorruptDataError
        The attribute is not a dtype, or not one the stored values widen to exactly.
    """
    raw = attrs.get(VALUES_DTYPE_ATTR) if attrs is not None else None
    if raw is None:
        return None
    declared = _NUMERIC.get(str(raw))
    if declared is None or not _widens_exactly(stored, declared):
        msg = (
            f"{where}: its attribute {VALUES_DTYPE_ATTR}={raw!r} is not a numeric dtype that the "
            f"stored {stored} values widen to exactly; the store is damaged"
        )
        raise CorruptDataError(msg)
    return declared


def _widens_exactly(stored: np.dtype, declared: np.dtype) -> bool:
    """Whether every value of ``stored`` is exactly a value of ``declared`` (an integer in a
    float: the float's significand must hold it, so twice the integer's bytes)."""
    if not np.can_cast(stored, declared, "safe"):
        return False
    return declared.kind != "f" or stored.kind == "f" or 2 * stored.itemsize <= declared.itemsize


class Widened:
    """Row slices of a narrowed matrix (an anndata CSR dataset or a dense array), given back
    in the dtype its values had: ``x[a:b]`` casts what the matrix gives."""

    def __init__(self, matrix: Any, dtype: np.dtype) -> None:
        self.matrix = matrix
        self.dtype = dtype
        self.shape = tuple(matrix.shape)
        self.ndim = len(self.shape)
        self.is_sparse = sp.issparse(matrix) or isinstance(matrix, anndata.abc.CSRDataset)

    def __getattr__(self, name: str) -> Any:  # the matrix's own (group, nnz...)
        if "matrix" not in self.__dict__:  # (not initialised: unpickling, copy)
            raise AttributeError(name)
        return getattr(self.__dict__["matrix"], name)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, key: Any) -> Any:
        rows = self.matrix[key]
        if sp.issparse(rows):
            return rows.astype(self.dtype)
        return np.asarray(rows).astype(self.dtype)


def widened(matrix: Any, stored: Any, where: str) -> Any:
    """``matrix`` (an opened element: an anndata CSR dataset or an array) read in the dtype
    recorded on ``stored`` (its zarr or h5py element), if it was narrowed; else ``matrix``."""
    declared = declared_dtype(getattr(stored, "attrs", None), np.dtype(matrix.dtype), where)
    return matrix if declared is None else Widened(matrix, declared)


def widen(element: Any, stored: Any) -> Any:
    """``element`` (what anndata read of a stored element) in the dtype recorded on ``stored``
    (the zarr or h5py element), if it was narrowed; else ``element`` itself."""
    declared = declared_dtype(getattr(stored, "attrs", None), np.dtype(element.dtype), str(stored))
    return element if declared is None else element.astype(declared)
