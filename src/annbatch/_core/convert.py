"""Converter: numpy / scipy batches to the user's array library, sharing memory."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from annbatch._compat import import_optional
from annbatch._core.types import canonical_csr

if TYPE_CHECKING:
    from annbatch._core.types import Block

OutputKind = Literal["numpy", "torch", "jax"]


def to_torch(block: Block) -> Any:
    """A ``torch.Tensor`` (dense) or sparse CSR tensor sharing memory with ``block``."""
    torch = import_optional("torch", purpose="to='torch'", extra="torch")
    if isinstance(block, np.ndarray):
        return torch.from_numpy(block)
    block = canonical_csr(block)
    indptr, indices = block.indptr, block.indices
    if indptr.dtype != indices.dtype:
        # torch needs one index dtype for both; widening copies only the index arrays.
        indptr, indices = indptr.astype(np.int64), indices.astype(np.int64)
    return csr_tensor(
        torch,
        torch.from_numpy(indptr),
        torch.from_numpy(indices),
        torch.from_numpy(block.data),
        block.shape,
    )


def csr_tensor(torch: Any, indptr: Any, indices: Any, data: Any, shape: tuple[int, ...]) -> Any:
    """A torch sparse CSR tensor over the given tensors (CPU or CUDA), without copying.

    The layout comes from a valid CSR matrix (scipy's or CuPy's); checking it again would cost
    O(nnz). torch's once-per-process note that sparse CSR support is in beta is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(indptr, indices, data, size=shape, check_invariants=False)


def to_jax(block: Block) -> Any:
    """A ``jax.Array`` (dense) or ``jax.experimental.sparse.BCSR`` (copied to jax's device).

    jax keeps 64-bit values only with ``jax_enable_x64``; otherwise it stores float64 and
    int64 as their 32-bit types (jax's own rule).
    """
    jax = import_optional("jax", purpose="to='jax'", extra="jax")
    if isinstance(block, np.ndarray):
        return jax.numpy.asarray(block)
    from jax.experimental import sparse

    block = canonical_csr(block)
    arrays = (block.data, block.indices, block.indptr)
    return sparse.BCSR(tuple(jax.numpy.asarray(a) for a in arrays), shape=block.shape)


def convert(block: Block, kind: OutputKind) -> Any:
    """Convert one batch to the output kind."""
    if kind == "torch":
        return to_torch(block)
    if kind == "jax":
        return to_jax(block)
    return block
