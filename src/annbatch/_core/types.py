"""Types shared by the pipeline stages: rows in memory, a read's work, where windows go."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

Block: TypeAlias = np.ndarray | sp.csr_matrix
"""Rows held in memory: dense rows, or CSR rows."""

Role: TypeAlias = Literal["dense", "data", "indices"]
Allocate: TypeAlias = "Callable[[Role, tuple[int, ...], np.dtype], np.ndarray]"
"""Where a window is read into: ``allocate(role, shape, dtype)`` returns an uninitialised
C-contiguous array for a dense window (``"dense"``) or a CSR window's values (``"data"``) or
column indices (``"indices"``). The default is :func:`empty_window`; the GPU path passes
pinned memory."""


def empty_window(role: Role, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The default :data:`Allocate`: new memory."""
    return np.empty(shape, dtype=dtype)


def csr_from_arrays(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """A CSR matrix over arrays that the caller built consistent, without scipy's checks.

    scipy's constructor scans ``indices`` to choose an index dtype and validates the
    structure: O(nnz) work that measured as much as a tenth of a window's time, for arrays
    that the reader has just built from a valid store. Index arrays share one dtype here.
    """
    index_dtype = np.int32 if indptr[-1] < 2**31 and indices.dtype == np.int32 else np.int64
    matrix = sp.csr_matrix(shape, dtype=data.dtype)
    matrix.data = data
    matrix.indices = indices if indices.dtype == index_dtype else indices.astype(index_dtype)
    matrix.indptr = indptr.astype(index_dtype, copy=False)
    return matrix


def cast(block: Block, dtype: np.dtype | None) -> Block:
    """``block`` with its values in ``dtype`` (itself if they already are, or ``dtype`` is
    None)."""
    if dtype is None or block.dtype == dtype:
        return block
    return block.astype(dtype)


def canonical_csr(block: sp.csr_matrix) -> sp.csr_matrix:
    """The same rows with ``indptr[0] == 0``: row slices of a CSR matrix can carry an offset
    indptr, which torch and CuPy do not take."""
    if block.indptr.size and block.indptr[0] != 0:
        block = sp.csr_matrix(
            (
                block.data[block.indptr[0] : block.indptr[-1]],
                block.indices[block.indptr[0] : block.indptr[-1]],
                block.indptr - block.indptr[0],
            ),
            shape=block.shape,
        )
    return block


@dataclass(frozen=True, slots=True)
class ReadJob:
    """The work of reading some row ranges of one dataset, split into independent tasks.

    Run every task (in any order, on any threads), then call :meth:`result` once.
    """

    tasks: Sequence[Callable[[], None]]
    """Independent pieces of work; each releases the GIL while it decodes or reads files."""
    result: Callable[[], list[Block]]
    """The rows, after all tasks have run: the ranges one after another, in one or more blocks."""
