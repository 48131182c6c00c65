"""Row sources: one module per kind of input array, all read through :class:`RowSource`.

The Loader only ever talks to :class:`RowSource`: a 2-D (or N-D) array of rows that can be
read as contiguous row ranges. Adapters exist for dense ``zarr.Array``, ``h5py.Dataset`` and
``numpy.ndarray``, and for CSR matrices stored by anndata (zarr or HDF5) or held by scipy.
HDF5 handles cannot cross process boundaries, so adapters pickle them as (file, name) and
reopen them read-only in the receiving process (DataLoader workers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import anndata.abc
import h5py
import numpy as np
import scipy.sparse as sp
import zarr

from annbatch._core.sources._common import check_h5_open
from annbatch._core.sources.csr import CSRSource
from annbatch._core.sources.dense import DenseSource
from annbatch.errors import UnsupportedDatasetError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch._core.types import Allocate, Block, ReadJob

__all__ = ["ACCEPTED", "CSRSource", "DenseSource", "RowSource", "as_row_source"]

ACCEPTED = (
    "zarr.Array, h5py.Dataset, anndata.abc.CSRDataset (zarr or h5ad), numpy.ndarray "
    "or scipy.sparse CSR"
)


class RowSource(Protocol):
    """An array of rows that the Loader can read by contiguous row ranges.

    A source owns its reads: it validates what it reads (and raises an
    :mod:`annbatch.errors` class naming itself and the rows), and it builds its window's
    blocks (:meth:`window_job`), so that the reader only runs tasks.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape; axis 0 indexes rows."""

    @property
    def dtype(self) -> np.dtype:
        """Element dtype."""

    @property
    def is_sparse(self) -> bool:
        """Whether rows come back as ``scipy.sparse.csr_matrix``."""

    @property
    def dataset_type(self) -> type:
        """The user-facing type of the input (``zarr.Array``, ``anndata.abc.CSRDataset``...)."""

    @property
    def reads_chunks_once(self) -> bool:
        """Whether :meth:`read_job` decodes each on-disk chunk once per call by itself, so the
        planner need not merge ranges that share a chunk."""

    def read(self, start: int, stop: int) -> Block:
        """Rows ``start:stop`` as a numpy array or a CSR matrix."""

    def read_job(self, starts: np.ndarray, stops: np.ndarray, n_tasks: int) -> ReadJob:
        """The work of reading rows ``starts[i]:stops[i]`` (sorted, disjoint), one range after
        another, split into about ``n_tasks`` tasks. What is read is checked before the job's
        result is built."""

    def window_job(
        self,
        parts: Sequence[tuple[RowSource, np.ndarray, np.ndarray]],
        n_tasks: int,
        allocate: Allocate,
        *,
        narrow: bool = False,
    ) -> ReadJob:
        """The work of reading one window: ``(source, starts, stops)`` of this source and of
        other sources of the same type (all datasets of a Loader share one), in order. The
        blocks hold the parts' rows one after another. CSR sources read chunk by chunk put
        them all in one block, whose arrays come from ``allocate`` (the GPU path passes
        pinned memory); other sources read into memory of their own. ``narrow``: values may
        stay in the dtype they are stored in, narrower than :attr:`dtype` (the caller casts
        them when it cuts batches); otherwise each block holds its source's :attr:`dtype`."""

    def check_open(self) -> None:
        """Raise :class:`~annbatch.errors.ClosedDatasetError` if the source can no longer be read."""

    def shares_chunk(self, row_a: int, row_b: int) -> bool:
        """Whether rows ``row_a < row_b`` lie in one on-disk chunk, so reading the rows
        between them decodes nothing more."""

    def describe(self) -> str:
        """A short human-readable name for error messages."""


def as_row_source(
    dataset: object, *, where: str, verify_checksums: bool = False, stored_dtype: bool = False
) -> RowSource:
    """Wrap a user's array in the matching :class:`RowSource`, or explain why it cannot be.

    Parameters
    ----------
    dataset
        The array to read from.
    where
        How to name the dataset in errors, e.g. ``"dataset 2"``.
    verify_checksums
        Verify the checksum of every chunk read, also of chunks that are only partly wanted
        (see :func:`annbatch._core.chunks.direct_array`).
    stored_dtype
        Yield values in the dtype they are stored in, also where a packed collection layout
        stored them narrower than they were (:mod:`annbatch._narrow`).
    """
    if isinstance(dataset, zarr.Group | h5py.Group):
        check_h5_open(dataset, where)
        if dataset.attrs.get("encoding-type") in ("csr_matrix", "csc_matrix"):
            # a sparse matrix as anndata stores it (X, a layer): opened as anndata opens it
            dataset = anndata.io.sparse_dataset(dataset)
    if isinstance(dataset, anndata.abc.CSCDataset):
        msg = (
            f"{where} is a CSC matrix; the Loader reads rows and needs CSR. Rewrite the store "
            "with X as CSR (e.g. `adata.X = adata.X.tocsr()` before writing)."
        )
        raise UnsupportedDatasetError(msg)
    if isinstance(dataset, anndata.abc.CSRDataset):
        check_h5_open(dataset.group, where)
        return CSRSource.from_anndata(
            dataset, verify_checksums=verify_checksums, stored_dtype=stored_dtype
        )
    if isinstance(dataset, sp.sparray | sp.spmatrix):
        if not isinstance(dataset, sp.csr_matrix | sp.csr_array):
            msg = f"{where} is a scipy.sparse matrix in {dataset.format.upper()} format; expected CSR (convert with `.tocsr()`)"
            raise UnsupportedDatasetError(msg)
        return CSRSource.from_scipy(dataset)
    if isinstance(dataset, zarr.Array | h5py.Dataset | np.ndarray):
        check_h5_open(dataset, where)
        if dataset.ndim < 2:
            msg = f"{where} has shape {dataset.shape}; expected at least 2 dimensions (rows, columns, ...)"
            raise UnsupportedDatasetError(msg)
        return DenseSource(dataset, verify_checksums=verify_checksums, stored_dtype=stored_dtype)
    if isinstance(dataset, zarr.Group | h5py.Group):
        msg = (
            f"{where} is a {type(dataset).__name__} that holds no array or sparse matrix "
            "anndata wrote (no encoding-type csr_matrix); pass an array or a sparse matrix"
        )
        raise UnsupportedDatasetError(msg)
    msg = f"{where} is a {type(dataset).__module__}.{type(dataset).__name__}; expected one of {ACCEPTED}"
    raise UnsupportedDatasetError(msg)
