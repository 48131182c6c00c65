"""Batch memory lent with each batch and taken back once it is dropped
(``annbatch._core.lent``): never reused while anything reaches it, every held batch exact."""

from __future__ import annotations

import copy
import gc
import pickle
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annbatch import Loader
from annbatch._core import lent
from annbatch._core.lent import BatchMemory, csr_rows, dense_rows, size_class

from conftest import check_epoch

MARK = 0xA5


@pytest.fixture
def lend_everything(monkeypatch):
    """Every batch array in lent memory (tests' batches are far below :data:`lent.SMALLEST`),
    and each block overwritten with a marker when it is given back: a batch still pointing
    into a reused block would then hold the marker, whatever reused it later."""
    monkeypatch.setattr(lent, "SMALLEST", 1)
    taken_back = []
    original = BatchMemory._take_back

    def poisoning(self, block):
        block[:] = MARK
        taken_back.append(block.nbytes)
        original(self, block)

    monkeypatch.setattr(BatchMemory, "_take_back", poisoning)
    return taken_back


def test_size_classes_round_up_by_at_most_an_eighth():
    sizes = [1, 7, 8, 9, 100, 1000, 4095, 4096, 4097, 10**6, 49_152_001]
    for n in sizes:
        c = size_class(n)
        assert n <= c <= max(8, n + n // 8 + 1)
        assert size_class(c) == c  # a class is its own class
    assert size_class(1_000_000) == size_class(1_010_000)  # near sizes share a block


def test_a_block_is_reused_only_once_nothing_reaches_it():
    torch = pytest.importorskip("torch")
    memory = BatchMemory(smallest=1)
    a = memory.empty((100, 10), np.float32)
    address = a.ctypes.data
    view = a[3:7]
    tensor = torch.from_numpy(a)
    del a
    gc.collect()
    b = memory.empty((100, 10), np.float32)  # the first block is still reachable
    assert b.ctypes.data != address
    del view
    gc.collect()
    c = memory.empty((100, 10), np.float32)
    assert c.ctypes.data not in (address, b.ctypes.data)
    del tensor
    gc.collect()
    d = memory.empty((100, 10), np.float32)  # now the first one is free again
    assert d.ctypes.data == address
    assert memory.idle_bytes == 0


def test_idle_memory_is_bounded_by_the_most_lent_at_once():
    memory = BatchMemory(smallest=1)
    held = [memory.empty((1000,), np.float64) for _ in range(3)]
    most = 3 * size_class(8000)
    del held
    gc.collect()
    assert memory.idle_bytes == most  # all three kept: the Loader had them out at once
    one = memory.empty((1000,), np.float64)
    del one
    assert memory.idle_bytes == most
    memory.clear()
    assert memory.idle_bytes == 0


def test_a_block_given_back_while_the_pool_is_busy_is_counted_at_the_next_use():
    # The finalizer may run (garbage collector) on a thread holding the pool's lock: it only
    # queues the block, which the next use counts and keeps.
    memory = BatchMemory(smallest=1)
    a = memory.empty((1000,), np.float32)
    address = a.ctypes.data
    with memory._lock:
        del a
        gc.collect()
    assert memory._lent > 0  # not counted yet
    b = memory.empty((1000,), np.float32)
    assert b.ctypes.data == address  # kept, and lent again
    del b
    gc.collect()
    assert memory.idle_bytes == size_class(4000)
    assert memory._lent == 0


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 3 * 2**20), min_size=1, max_size=40))
def test_a_lent_block_is_never_smaller_than_its_array(sizes):
    memory = BatchMemory(smallest=1)
    held = []
    for k, n in enumerate(sizes):
        out = memory.empty((n,), np.uint8)
        assert out.base._block.nbytes >= out.nbytes == n
        out[:] = k % 251  # writes the whole array: a short block would not hold it
        if k % 3:
            held.append(out)
        del out
    gc.collect()


def test_lent_memory_cannot_be_copied_around_its_arrays():
    out = BatchMemory(smallest=1).empty((100,), np.float32)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.copy(out.base)
    np.testing.assert_array_equal(copy.deepcopy(out), out)  # arrays copy their data


def test_memory_kept_after_a_burst_of_held_batches_shrinks_back():
    # list(loader): many batches held at once, then dropped; later batches one at a time
    # let the excess go once the burst is RECENT lends old.
    memory = BatchMemory(smallest=1)
    block = size_class(8000)
    burst = [memory.empty((1000,), np.float64) for _ in range(50)]
    del burst
    gc.collect()
    assert memory.idle_bytes == 50 * block  # kept: the burst is recent
    for _ in range(lent.RECENT):
        one = memory.empty((1000,), np.float64)
        del one
    assert memory.idle_bytes <= block * 3 // 2  # 1.5x the recent peak: one batch
    assert memory._lent == 0


def test_small_and_object_arrays_are_ordinary_memory():
    memory = BatchMemory()  # lends from lent.SMALLEST bytes on
    small = memory.empty((10,), np.float32)
    assert not isinstance(small.base, lent._Lent)
    objects = BatchMemory(smallest=1).empty((4,), object)
    assert not isinstance(objects.base, lent._Lent)


_FORK_CHILD = """
import gc, os, sys
import numpy as np
from annbatch._core.lent import BatchMemory
memory = BatchMemory(smallest=1)
lent_out = memory.empty((1000,), np.float32)  # still held at the fork
kept = memory.empty((1000,), np.float32)
del kept
gc.collect()
assert memory.idle_bytes > 0
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child: nothing of the parent's memory is handed out again
    del lent_out
    gc.collect()
    os.write(write, str(memory.idle_bytes).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 64).decode())
"""


def test_a_copied_pickled_or_forked_memory_starts_empty():
    memory = BatchMemory(smallest=1)
    kept = memory.empty((1000,), np.float32)
    del kept
    gc.collect()
    assert memory.idle_bytes > 0
    for other in (copy.copy(memory), pickle.loads(pickle.dumps(memory))):
        assert other.idle_bytes == 0
        assert other._smallest == 1
    # Forked in a process of its own (a test process may hold threads that object to fork).
    done = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


@settings(max_examples=60, deadline=None)
@given(
    n_rows=st.integers(0, 40),
    n_cols=st.integers(1, 30),
    density=st.floats(0, 1),
    picks=st.lists(st.integers(0, 10**6), max_size=60),
    index_dtype=st.sampled_from([np.int32, np.int64]),
)
def test_csr_rows_equal_scipy_indexing(n_rows, n_cols, density, picks, index_dtype):
    rng = np.random.default_rng(len(picks))
    matrix = sp.random(n_rows, n_cols, density=density, format="csr", random_state=rng)
    matrix.indices = matrix.indices.astype(index_dtype)
    matrix.indptr = matrix.indptr.astype(index_dtype)
    positions = np.array([p % n_rows for p in picks] if n_rows else [], dtype=np.int64)
    got = csr_rows(matrix, positions, BatchMemory(smallest=1))
    want = matrix[positions]
    assert got.shape == want.shape
    assert (got.indices.dtype, got.indptr.dtype) == (want.indices.dtype, want.indptr.dtype)
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)
    dense = matrix.toarray()
    np.testing.assert_array_equal(
        dense_rows(dense, positions, BatchMemory(smallest=1)), dense[positions]
    )


def _indices_in_range(batch, n_var):
    """A sparse batch's column indices in range, checked before anything densifies it: a
    batch whose memory was reused under it would otherwise crash the test process."""
    x = batch["X"]
    if isinstance(x, sp.spmatrix | sp.sparray):
        indices = x.indices
    elif getattr(x, "layout", None) is not None and str(x.layout) == "torch.sparse_csr":
        indices = x.col_indices().numpy()
    else:
        return
    assert indices.size == 0 or (indices.min() >= 0 and indices.max() < n_var)


@pytest.mark.slow
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from(["sparse", "dense"]),
    chunk=st.integers(1, 12),
    preload=st.integers(1, 8),
    batch=st.integers(1, 96),
    read_ahead=st.integers(0, 2),
    to=st.sampled_from([None, "torch"]),
    dense=st.booleans(),
    strategy=st.sampled_from([None, "concat-shuffle", "shuffle-concat"]),
    keep=st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_held_batches_stay_exact_while_dropped_ones_are_reused(
    pool, lend_everything, kind, chunk, preload, batch, read_ahead, to, dense, strategy, keep
):
    """A user keeps some batches (a replay buffer) and drops the others: the dropped ones'
    memory is reused for later batches, and every kept one still holds the stored rows."""
    stores = pool.many("zarr", kind, [37, 0, 52, 11])
    batch = 1 + (batch - 1) % (chunk * preload)
    loader = Loader(
        chunk_size=chunk,
        preload_nchunks=preload,
        batch_size=batch,
        shuffle=True,
        read_ahead=read_ahead,
        return_index=True,
        to=to,
        dense=dense,
        concat_strategy=strategy,
        rng=np.random.default_rng(0),
    )
    for store in stores:
        loader.add_anndata(store.adata())
    n_var = stores[0].adata().n_vars
    held, k = [], 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = []
        for b in loader:
            _indices_in_range(b, n_var)
            check_epoch([b], stores)  # exact when yielded
            seen.append(np.asarray(b["index"]))
            if keep[k % len(keep)]:
                held.append(b)
            k += 1
            del b
        assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(100))
    gc.collect()
    for b in held:
        _indices_in_range(b, n_var)
    check_epoch(held, stores)  # exact after later batches reused the dropped ones' memory
    if not all(keep) and kind == "sparse":
        assert lend_everything  # sparse batches are lent: some came back (to be reused)
