"""Checks of stored structure, so that damaged or foreign data never reaches code that trusts it.

Windows of CSR rows are built without scipy's checks (:func:`annbatch._core.types.
csr_from_arrays`), and row slices are taken from ``indptr`` held in memory: an ``indptr`` that
decreases, or a column index outside ``[0, n_var)``, would make numpy or scipy read or write
outside their buffers. So ``indptr`` is checked once, when a dataset is added, and the column
indices of every window are range-checked while it is assembled (one vectorised pass over the
window's indices, on the read threads).
"""

from __future__ import annotations

import numpy as np

from annbatch.errors import CorruptDataError


def check_indptr(
    indptr: np.ndarray, *, n_obs: int, nnz: int, exact: bool, where: str
) -> np.ndarray:
    """``indptr`` as int64, after checking that it describes ``n_obs`` rows over ``nnz`` entries.

    Parameters
    ----------
    indptr
        The CSR row pointers as stored.
    n_obs
        Rows the dataset says it has.
    nnz
        Entries stored in ``data`` and ``indices`` (the shorter of the two).
    exact
        Whether ``indptr[-1]`` must equal ``nnz`` (on disk, anndata writes exactly ``nnz``
        entries) or may be smaller (scipy matrices may hold spare room).
    where
        The dataset, as named in errors.
    """
    indptr = np.asarray(indptr)
    if indptr.ndim != 1 or indptr.dtype.kind not in "iu":
        msg = f"{where}: indptr must be a 1-D integer array, got {indptr.dtype} of shape {indptr.shape}"
        raise CorruptDataError(msg)
    if indptr.size != n_obs + 1:
        msg = f"{where}: indptr has {indptr.size} entries; a CSR matrix of {n_obs} rows needs {n_obs + 1}"
        raise CorruptDataError(msg)
    if indptr.dtype.kind == "u" and indptr.size and int(indptr.max()) >= 2**63:
        msg = f"{where}: indptr holds values beyond the int64 range; the store is damaged"
        raise CorruptDataError(msg)
    indptr = indptr.astype(np.int64, copy=False)
    if indptr[0] != 0:
        msg = f"{where}: indptr starts at {int(indptr[0])}, not 0; the store is damaged"
        raise CorruptDataError(msg)
    steps = np.diff(indptr)
    if steps.size and int(steps.min()) < 0:
        row = int(np.argmax(steps < 0))
        msg = (
            f"{where}: indptr decreases at row {row} ({int(indptr[row])} -> "
            f"{int(indptr[row + 1])}); the store is damaged"
        )
        raise CorruptDataError(msg)
    last = int(indptr[-1])
    if last > nnz or (exact and last != nnz):
        msg = (
            f"{where}: indptr ends at {last} but {nnz} entries are stored in data and "
            f"indices; the store is damaged or was written by a tool that does not follow "
            f"anndata's CSR encoding"
        )
        raise CorruptDataError(msg)
    return indptr


def check_indices(indices: np.ndarray, *, n_var: int, where: str) -> None:
    """Raise unless every column index lies in ``[0, n_var)``.

    One pass over the indices: seen as unsigned, a negative index is larger than any valid one.
    """
    if indices.size == 0:
        return
    if indices.dtype.kind not in "iu":
        msg = f"{where}: column indices have dtype {indices.dtype}; expected integers"
        raise CorruptDataError(msg)
    unsigned = indices.view(np.dtype(f"u{indices.dtype.itemsize}"))
    largest = int(unsigned.max())
    if largest >= n_var:
        bad = int(np.flatnonzero(unsigned >= n_var)[0])
        msg = f"{where}: column index {int(indices[bad])} is outside [0, {n_var}); the store is damaged"
        raise CorruptDataError(msg)
