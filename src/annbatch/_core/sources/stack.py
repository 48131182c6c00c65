"""Every CSR dataset of a Loader as one row space, stacked once.

A window of an atlas draws its rows from dozens of datasets, and reads their values, column
indices and row pointers each as one stack (:mod:`annbatch._core.chunks.stacked`). Stacked
anew for every window (only the datasets it touches), each window paid for checking that the
arrays can be stacked, and the row pointers' chunk table (where each chunk of the stack lies)
was made again each time: ~15% of a 100-million-cell stream. A :class:`CSRStack` stacks the
arrays of all of a Loader's CSR datasets once, when they are added (:func:`link`), so that
every window reads at fixed places and every table is made once.

A stack is shared by its datasets' sources (each holds ``(stack, its place)`` in one
attribute, replaced at once when the Loader's datasets change, so that a window read
meanwhile sees either the old stack or the new one) and never pickled: a process that
receives the sources links them again. It holds the sources' readers, not the sources.
"""

from __future__ import annotations

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
    """Every dataset's row pointers; None where some dataset holds them in memory, or they
    cannot be read as one."""


class CSRStack:
    """The CSR datasets of one Loader, in order, whose arrays are stacked when a window first
    needs them (see the module docstring).

    Parameters
    ----------
    sources
        The datasets (each read chunk by chunk), in the order of their rows.
    """

    def __init__(self, sources: Sequence[CSRSource]) -> None:
        self._direct = [s._direct for s in sources]  # not the sources: no reference cycle
        self._indptr = [s._indptr for s in sources]
        self._stacks: Stacks | None = None
        self._made = False

    def stacks(self) -> Stacks | None:
        """The stacked arrays; None where the datasets' arrays cannot be read as one (other
        layouts or dtypes, object storage). No lock: threads that ask at once may each make
        them (cheap; either is right), and a process forked meanwhile inherits no held lock."""
        if not self._made:
            self._stacks = self._make()
            self._made = True
        return self._stacks

    def _make(self) -> Stacks | None:
        direct = [d for d in self._direct if d is not None]  # (link takes only these)
        if len(direct) != len(self._direct):
            return None
        data = StackedReader.of([d[0] for d in direct])
        indices = StackedReader.of([d[1] for d in direct])
        if data is None or indices is None:
            return None
        pointers = self._indptr
        indptr = None
        if all(isinstance(p, StoredIndptr) for p in pointers):
            indptr = IndptrStack(pointers)  # type: ignore[arg-type]
            if indptr.bases is None:  # a window's own datasets may still stack
                indptr = None
        return Stacks(data, indices, indptr)


def link(sources: Sequence[RowSource]) -> None:
    """Give the CSR sources among ``sources`` (a Loader's datasets, in order) one
    :class:`CSRStack` (each source learns its place in it); sources of other kinds, or a lone
    CSR source, get none."""
    csr = [s for s in sources if isinstance(s, CSRSource)]
    chunked = [s for s in csr if s.reads_chunks_once]
    stack = CSRStack(chunked) if len(chunked) > 1 else None
    for s in csr:
        if stack is None or not s.reads_chunks_once:
            s._place = None
    if stack is not None:
        for k, s in enumerate(chunked):
            s._place = (stack, k)  # one assignment: read whole by a window on another thread
