"""Read-ahead: overlap, bounded memory, errors with their traceback, and clean shutdown."""

from __future__ import annotations

import gc
import threading
import time
import traceback

import numpy as np
import pytest
import zarr

from annbatch import Loader
from annbatch._core.prefetch import Prefetcher
from annbatch.errors import CorruptChunkError

from conftest import check_epoch


def _alive(prefetcher: Prefetcher) -> bool:
    """Whether the prefetcher's producer thread is still running."""
    return prefetcher._thread.is_alive()


def _producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "annbatch-read-ahead"]


def _wait_for_no_producers(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _producer_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _producer_threads(), "a read-ahead thread outlived its iteration"


def _loader(pool, read_ahead=1, **kwargs):
    store = pool.get("zarr", "sparse", 64)
    kwargs = {"chunk_size": 4, "preload_nchunks": 2, "batch_size": 4, **kwargs}
    return Loader(read_ahead=read_ahead, return_index=True, to=None, **kwargs).add_anndata(
        store.adata()
    ), store


@pytest.mark.parametrize("read_ahead", [0, 1, 2, 5])
@pytest.mark.parametrize("shuffle", [False, True])
def test_same_rows_with_any_read_ahead(pool, read_ahead, shuffle):
    loader, store = _loader(pool, read_ahead, shuffle=shuffle, rng=np.random.default_rng(0))
    order = check_epoch(list(loader), [store])
    reference, _ = _loader(pool, 0, shuffle=shuffle, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(order, np.concatenate([b["index"] for b in reference]))
    _wait_for_no_producers()


def test_producer_runs_ahead_while_consumer_holds_a_batch():
    produced = []

    def source():
        for i in range(10):
            produced.append(i)
            yield i

    prefetcher = Prefetcher(source(), depth=2)
    assert next(prefetcher) == 0
    time.sleep(0.2)
    # One item held by the consumer, two produced ahead; no third until a slot frees.
    assert produced == [0, 1, 2]
    assert next(prefetcher) == 1
    time.sleep(0.2)
    assert produced == [0, 1, 2, 3]
    prefetcher.close()
    assert not _alive(prefetcher)


class Boom(RuntimeError):
    pass


def test_error_in_background_reaches_consumer_with_traceback():
    def source():
        yield 1
        raise_boom()

    def raise_boom():
        raise Boom("disk on fire")

    prefetcher = Prefetcher(source(), depth=1)
    assert next(prefetcher) == 1
    with pytest.raises(Boom, match="disk on fire") as info:
        next(prefetcher)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "raise_boom" in frames, frames
    assert not _alive(prefetcher)


def test_read_error_reaches_the_loop(tmp_path):
    # A real failure in the background: a chunk file cut short on disk, met mid-epoch.
    x = np.arange(64 * 5, dtype=np.float32).reshape(64, 5)
    array = zarr.create_array(tmp_path / "x.zarr", shape=x.shape, chunks=(8, 5), dtype=x.dtype)
    array[:] = x
    damaged = tmp_path / "x.zarr" / "c" / "5" / "0"
    damaged.write_bytes(damaged.read_bytes()[:5])
    loader = Loader(chunk_size=8, preload_nchunks=1, batch_size=8, shuffle=False, to=None)
    loader.add_dataset(zarr.open_array(tmp_path / "x.zarr", mode="r"))
    batches = iter(loader)
    seen = [next(batches)["X"] for _ in range(5)]  # the batches before the damaged chunk
    np.testing.assert_array_equal(np.concatenate(seen), x[:40])
    with pytest.raises(CorruptChunkError, match="chunk c/5/0") as info:
        next(batches)
    assert "_decode" in [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    _wait_for_no_producers()


def test_break_stops_the_producer(pool):
    loader, _ = _loader(pool, read_ahead=2)
    for _ in loader:
        assert _producer_threads()
        break
    _wait_for_no_producers()
    loader.add_anndata(loader_store_adata(pool))  # no iteration is left running


def loader_store_adata(pool):
    return pool.get("zarr", "sparse", 64).adata()


def test_exception_in_training_step_stops_the_producer(pool):
    loader, _ = _loader(pool, read_ahead=2)

    def train():
        for i, _batch in enumerate(loader):
            if i == 2:
                raise Boom("nan loss")

    with pytest.raises(Boom):
        train()
    gc.collect()
    _wait_for_no_producers()


def test_dropping_the_iterator_stops_the_producer(pool):
    loader, _ = _loader(pool, read_ahead=3)
    iterator = iter(loader)
    next(iterator)
    assert _producer_threads()
    del iterator
    gc.collect()
    _wait_for_no_producers()


def test_dropping_loader_and_iterator_frees_windows(pool):
    import weakref

    loader, _ = _loader(pool, read_ahead=3)
    iterator = iter(loader)
    batch = next(iterator)
    ref = weakref.ref(loader)
    del loader, iterator, batch
    gc.collect()
    _wait_for_no_producers()
    assert ref() is None, "the Loader is kept alive after its iteration was dropped"


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bad_read_ahead(value):
    from annbatch.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="read_ahead must be a non-negative integer"):
        Loader(read_ahead=value)


def test_stopping_early_abandons_the_window_being_read(tmp_path, monkeypatch):
    import annbatch._core.chunks.local as local

    x = np.arange(4000 * 8, dtype=np.float32).reshape(4000, 8)
    array = zarr.create_array(tmp_path / "x.zarr", shape=x.shape, chunks=(10, 8), dtype=x.dtype)
    array[:] = x
    calls = {"n": 0}
    original = local.ReadTask.__call__

    def slow_task(self):
        calls["n"] += 1
        time.sleep(0.05)  # a slow disk: reading a window takes a while
        original(self)

    monkeypatch.setattr(local.ReadTask, "__call__", slow_task)
    loader = Loader(chunk_size=10, preload_nchunks=40, batch_size=100, shuffle=True, to=None)
    loader.add_dataset(zarr.open_array(tmp_path / "x.zarr", mode="r"))
    for batch in loader:
        per_window = calls["n"]  # the first window is read
        assert batch["X"].shape == (100, 8)
        time.sleep(0.08)  # a training step, while the second window is being read ahead
        break
    _wait_for_no_producers()
    # Tasks of the second window that had not started were dropped, not run to the end.
    assert calls["n"] < 2 * per_window
    assert not [t for t in threading.enumerate() if t.name.startswith("annbatch-read_")]
