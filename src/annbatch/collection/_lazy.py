"""Lazily loaded (dask) arrays as build inputs, read one dask block at a time.

``anndata.experimental.read_elem_lazy`` gives X, a layer or an obsm array as a dask array
over the file (scvi-tools' ``load_adata`` does this). A build reads its inputs in row blocks
sized by the memory budget; :class:`LazyRows` answers each block from the dask blocks it
overlaps, computing one dask block at a time and keeping only the last one, so the array is
never materialized whole and a block is computed once however the build's blocks fall.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from annbatch.errors import UnsupportedDatasetError

if TYPE_CHECKING:
    from dask.array import Array as DaskArray


def is_lazy(x: object) -> bool:
    """Whether ``x`` is a dask array (checked without importing dask)."""
    return type(x).__module__.startswith("dask.array") and hasattr(x, "blocks")


class LazyRows:
    """Row slices of a 2-D (or N-D) dask array: ``rows[a:b]`` gives numpy rows, or scipy CSR
    rows when the dask blocks are CSR matrices.

    Parameters
    ----------
    array
        The dask array. A block along the rows is computed with all its columns.
    where
        How errors name it (``"input.h5ad: X"``).
    """

    def __init__(self, array: DaskArray, where: str) -> None:
        meta: Any = getattr(array, "_meta", None)  # an empty block: the blocks' type
        self.is_sparse = sp.issparse(meta)
        if self.is_sparse and meta.format != "csr":
            msg = f"{where} is a lazily loaded {meta.format.upper()} matrix; only CSR (or dense) is read, rewrite it as CSR"
            raise UnsupportedDatasetError(msg)
        self.array = array
        self.where = where
        self.shape = tuple(int(n) for n in array.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(array.dtype)
        self._starts = np.concatenate([[0], np.cumsum(array.chunks[0])]).astype(np.int64)
        self._cached: tuple[int, Any] | None = None  # (block number, its computed rows)
        self._nnz: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nnz(self) -> int:
        """Stored entries of a CSR array, counted block by block the first time it is asked."""
        if not self.is_sparse:
            msg = f"{self.where} is dense; it has no nnz"
            raise AttributeError(msg)
        if self._nnz is None:
            self._nnz = sum(int(self._block(k).nnz) for k in range(len(self._starts) - 1))
        return self._nnz

    def _block(self, k: int) -> Any:
        """Row block ``k`` of the dask array (all columns), computed; the last one computed is
        kept. The synchronous scheduler computes it in this thread: one block in memory."""
        if self._cached is None or self._cached[0] != k:
            self._cached = None  # free the previous block before computing the next
            computed = self.array.blocks[k].compute(scheduler="synchronous")
            computed = sp.csr_matrix(computed) if self.is_sparse else np.asarray(computed)
            self._cached = (k, computed)
        return self._cached[1]

    def __getitem__(self, key: slice) -> Any:
        if not isinstance(key, slice) or key.step not in (None, 1):
            msg = f"{self.where} is read in row slices, got {key!r}"
            raise TypeError(msg)
        lo, hi, _ = key.indices(self.shape[0])
        hi = max(lo, hi)
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        parts = []
        k = max(first, 0)
        while k < len(self._starts) - 1 and self._starts[k] < hi:
            start = int(self._starts[k])
            parts.append(self._block(k)[max(lo, start) - start : hi - start])
            k += 1
        if not parts:  # an empty slice
            empty = self.array[0:0].compute(scheduler="synchronous")
            return sp.csr_matrix(empty) if self.is_sparse else np.asarray(empty)
        if len(parts) == 1:
            return parts[0]
        if self.is_sparse:
            return sp.vstack(parts, format="csr")
        return np.concatenate(parts, axis=0)
