"""Assembler: turn the blocks of one window into batches.

Two strategies yield exactly the same rows in the same order:

``"concat-shuffle"``
    Concatenate all blocks into one window buffer, then take each batch's rows from it.
    Holds the window twice at its peak; one fancy-index per batch (fast for sparse).
``"shuffle-concat"``
    Keep the blocks apart; for each batch, take its rows from every block it touches and put
    them together. Never materialises the whole window a second time.

With ``densify=True`` (``Loader(dense=True)``) sparse batches are made dense where they are cut,
on the same read thread (:func:`dense_group`): the consumer gets an array it can use as is.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import scipy.sparse as sp

from annbatch._core.lent import csr_rows, dense_rows
from annbatch._core.types import cast
from annbatch.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from concurrent.futures import Executor

    from annbatch._core.lent import BatchMemory
    from annbatch._core.types import Block

ConcatStrategy = Literal["concat-shuffle", "shuffle-concat"]
CONCAT_STRATEGIES: tuple[str, ...] = get_args(ConcatStrategy)


def parse_concat_strategy(value: object) -> ConcatStrategy | None:
    """Check a user's ``concat_strategy`` (None means: choose from the data)."""
    if value is None or value in CONCAT_STRATEGIES:
        return value  # type: ignore[return-value]
    msg = f"concat_strategy must be one of {CONCAT_STRATEGIES} or None, got {value!r}"
    raise InvalidArgumentError(msg)


def as_slice(positions: np.ndarray) -> slice | None:
    """The equivalent slice if ``positions`` is a run of consecutive integers, else None."""
    n = positions.size
    if n == 0:
        return None
    first = int(positions[0])
    if int(positions[-1]) - first == n - 1 and (n < 3 or bool(np.all(np.diff(positions) == 1))):
        return slice(first, first + n)
    return None


def take_rows(
    block: Block,
    positions: np.ndarray,
    memory: BatchMemory | None = None,
    dtype: np.dtype | None = None,
) -> Block:
    """Rows ``positions`` of ``block``, by slicing where they are consecutive (a dense block's
    rows: a view). With ``memory``, copies are made in memory it lends
    (:mod:`~annbatch._core.lent`). ``dtype``: the values cast to it (None: the block's)."""
    if memory is not None and isinstance(block, sp.csr_matrix):
        return csr_rows(block, positions, memory, dtype)
    consecutive = as_slice(positions)
    if consecutive is not None:
        return cast(block[consecutive], dtype)
    if memory is not None and isinstance(block, np.ndarray):
        return cast(dense_rows(block, positions, memory), dtype)
    return cast(block[positions], dtype)


def concatenate(blocks: Sequence[Block]) -> Block:
    """Stack blocks along rows; sparse blocks give a CSR matrix."""
    if isinstance(blocks[0], np.ndarray):
        return np.concatenate(blocks, axis=0)
    return sp.vstack(blocks, format="csr")


def assemble(
    blocks: Sequence[Block],
    splits: Sequence[np.ndarray],
    strategy: ConcatStrategy,
    executor: Executor | None = None,
    n_tasks: int = 1,
    *,
    densify: bool = False,
    on_done: Callable[[], None] | None = None,
    memory: BatchMemory | None = None,
    dtype: np.dtype | None = None,
) -> list[Future[Block]]:
    """One future per split, holding the rows at those positions of the concatenated blocks.

    With an ``executor``, the batches are cut on its threads (numpy and scipy release the GIL
    while they copy rows), in ``n_tasks`` groups of consecutive splits, and each future is
    set as soon as its batch is cut (with ``densify``, a group's batches together): the first
    batch of a window is ready before the last is cut. Without one, all are cut here and the futures are done on return. An error while
    cutting a batch is set on that batch's future and on every later one of its group.

    Parameters
    ----------
    blocks
        The window's rows, block after block.
    splits
        Positions into the concatenated rows, one array per batch.
    strategy
        See the module docstring.
    executor, n_tasks
        Where to cut the batches, and into how many tasks to group the splits.
    densify
        Make sparse batches dense where they are cut, a group at a time (:func:`dense_group`).
    on_done
        Called once every batch has been cut (or failed), on the thread that cut the last
        group: nothing reads ``blocks`` after that. Never called if a group is cancelled
        before it runs.
    memory
        Where batches are copied to: memory lent with each batch and taken back once the
        user drops it (:mod:`~annbatch._core.lent`); None: new memory for each.
    dtype
        The batches' values are cast to it as they are cut (None: the blocks' dtype). Blocks
        may hold narrower values (see :func:`annbatch._core.reader.run_job`'s ``promote``).
    """
    if strategy == "concat-shuffle" and len(blocks) > 1:
        blocks = [concatenate(blocks)]
    futures: list[Future[Block]] = [Future() for _ in splits]
    if not blocks:
        if on_done is not None:
            on_done()
        return []
    starts = np.concatenate([[0], np.cumsum([b.shape[0] for b in blocks])])

    def rows(positions: np.ndarray) -> Block:
        if len(blocks) == 1:
            return take_rows(blocks[0], positions, memory, dtype)
        return _gather(blocks, starts, positions, memory, dtype)

    def cut(numbers: list[int]) -> None:
        done = 0
        try:
            if densify and not isinstance(blocks[0], np.ndarray):
                batches: Iterable[Block] = dense_group(rows, [splits[i] for i in numbers], memory)
            else:
                batches = (rows(splits[i]) for i in numbers)  # each set as soon as it is cut
            for i, batch in zip(numbers, batches, strict=True):
                futures[i].set_result(batch)
                done += 1
        except BaseException as e:
            for i in numbers[done:]:
                futures[i].set_exception(e)

    groups = [g.tolist() for g in np.array_split(np.arange(len(splits)), max(1, n_tasks)) if g.size]
    left = [len(groups)]
    lock = threading.Lock()

    def cut_and_count(numbers: list[int]) -> None:
        try:
            cut(numbers)
        finally:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last and on_done is not None:
                on_done()

    if not groups and on_done is not None:
        on_done()
    for group in groups:
        if executor is None:
            cut_and_count(group)
        else:
            executor.submit(cut_and_count, group)
    return futures


def dense_group(
    rows: Callable[[np.ndarray], sp.csr_matrix],
    splits: Sequence[np.ndarray],
    memory: BatchMemory | None = None,
) -> list[np.ndarray]:
    """Dense batches of the CSR rows at ``splits``: cut together (``rows`` of all of them at
    once) and written by scipy's ``toarray`` into one zeroed array (values of repeated
    column indices summed), in the rows' dtype; each batch is a view of it. The array is new
    memory, or with ``memory`` memory lent until every batch over it is dropped
    (:mod:`~annbatch._core.lent`).

    Never a buffer reused while a batch over it lives: a batch is the user's to keep; holding
    one keeps its group's array alive (the group is a ``1 / n_tasks`` share of the window).
    One array per group rather than per batch because fresh memory is most of what
    densifying costs (page faults, and the kernel zeroing pages), and numpy asks for huge
    pages from 4 MiB on. Measured in the
    Loader (200,000 x 2,000 float32 counts, 1,500 values per row, batches of 256, 2 cores):
    0.87-1.01x the sparse batches' rows/s a group at a time, 0.62-0.81x a batch at a time
    (twice the page faults). ``toarray`` runs in C++ without the GIL; a numpy scatter
    (``out[rows, indices] = data``) measured 3 to 5 times slower on one batch.
    """
    bounds = np.cumsum([0, *(s.size for s in splits)])
    csr = rows(np.concatenate(splits))
    if memory is None:
        return split_rows(csr.toarray(), bounds)
    dense = memory.zeros(csr.shape, csr.dtype)
    csr.toarray(out=dense)
    return split_rows(dense, bounds)


def done(value: Block) -> Future[Block]:
    """A future that already holds ``value``."""
    future: Future[Block] = Future()
    future.set_result(value)
    return future


def split_rows(window: np.ndarray, bounds: np.ndarray) -> list[Block]:
    """Batches ``window[bounds[b]:bounds[b + 1]]``, as views of the window's buffer."""
    return [window[a:b] for a, b in itertools.pairwise(bounds.tolist())]


def _gather(
    blocks: Sequence[Block],
    starts: np.ndarray,
    split: np.ndarray,
    memory: BatchMemory | None = None,
    dtype: np.dtype | None = None,
) -> Block:
    owner = np.searchsorted(starts, split, side="right") - 1
    local = split - starts[owner]
    if split.size and owner[0] == owner[-1] and bool(np.all(owner == owner[0])):
        return take_rows(blocks[int(owner[0])], local, memory, dtype)
    first = blocks[0]
    if isinstance(first, np.ndarray):
        out = np.empty(
            (split.size, *first.shape[1:]),
            dtype=np.result_type(*blocks) if dtype is None else dtype,
        )
        for b in np.unique(owner):
            mask = owner == b
            out[mask] = blocks[int(b)][local[mask]]
        return out
    # Sparse: gather per block in block order, then restore the split's order.
    order = np.argsort(owner, kind="stable")
    owner_sorted, local_sorted = owner[order], local[order]
    bounds = np.flatnonzero(np.diff(owner_sorted)) + 1
    pieces = [
        take_rows(blocks[int(owner_sorted[lo])], local_sorted[lo:hi])
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, split.size], strict=True)
    ]
    stacked = sp.vstack(pieces, format="csr")
    return cast(stacked[np.argsort(order)], dtype)
