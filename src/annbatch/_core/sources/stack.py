"""Every CSR dataset of a Loader as one row space, stacked once.

A window of an atlas draws its rows from dozens of datasets, and reads their values, column
indices and row pointers each as one stack (:mod:`annbatch._core.chunks.stacked`). Stacked
anew for every window (only the datasets it touches), each window paid for checking that the
arrays can be stacked, and the row pointers' chunk table (where each chunk of the stack lies)
was made again each time: ~15% of a 100-million-cell stream. A :class:`CSRStack` stacks the
arrays of all of a Loader's CSR datasets once, when they are added (:func:`link`), so that
every window reads at fixed places and every table is made once.

A stack is shared by its datasets' sources and never pickled: a process that receives the
sources links them again.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple

from annbatch._core.chunks.stacked import StackedReader
from annbatch._core.sources.csr import CSRSource
from annbatch._core.sources.indptr import IndptrStack, StoredIndptr

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch._core.sources import RowSource


class Stacks(NamedTuple):
    """The stacked arrays of a :class:`CSRStack`."""

    data: StackedReader
    """Every dataset's values."""
    indices: StackedReader
    """Every dataset's column indices."""
    indptr: IndptrStack | None
    """Every dataset's row pointers; None where some dataset holds them in memory."""


class CSRStack:
    """The CSR datasets of one Loader, in order, whose arrays are stacked when a window first
    needs them (see the module docstring).

    Parameters
    ----------
    sources
        The datasets (each read chunk by chunk), in the order of their rows.
    """

    def __init__(self, sources: Sequence[CSRSource]) -> None:
        self.sources = list(sources)
        self._lock = threading.Lock()
        self._stacks: Stacks | None = None
        self._made = False

    def stacks(self) -> Stacks | None:
        """The stacked arrays; None where the datasets' arrays cannot be read as one (other
        layouts or dtypes, object storage)."""
        if not self._made:
            with self._lock:
                if not self._made:
                    self._stacks = self._make()
                    self._made = True
        return self._stacks

    def _make(self) -> Stacks | None:
        direct = [s._direct for s in self.sources]
        if any(d is None for d in direct):
            return None
        data = StackedReader.of([d[0] for d in direct if d is not None])
        indices = StackedReader.of([d[1] for d in direct if d is not None])
        if data is None or indices is None:
            return None
        pointers = [s._indptr for s in self.sources]
        indptr = None
        if all(isinstance(p, StoredIndptr) for p in pointers):
            indptr = IndptrStack(pointers)  # type: ignore[arg-type]
        return Stacks(data, indices, indptr)


def link(sources: Sequence[RowSource]) -> None:
    """Give the CSR sources among ``sources`` (a Loader's datasets, in order) one
    :class:`CSRStack` (each source learns its place in it); sources of other kinds, or a lone
    CSR source, get none."""
    csr = [s for s in sources if isinstance(s, CSRSource)]
    chunked = [s for s in csr if s.reads_chunks_once]
    stack = CSRStack(chunked) if len(chunked) > 1 else None
    for s in csr:
        s._stack, s._member = None, -1
    if stack is not None:
        for k, s in enumerate(chunked):
            s._stack, s._member = stack, k
