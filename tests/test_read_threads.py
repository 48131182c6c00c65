"""Where a window is read: on the read threads, or on the thread that asked for it when its
local reads are too small to pay for the handovers (annbatch._core.reader.worth_threads).
Real collections and stores on disk; both ways must give the same batches, every row once."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import annbatch._core.reader as reader_module
from annbatch import Loader

if TYPE_CHECKING:
    from pathlib import Path

ALWAYS, NEVER = 0, 1 << 62  # PARALLEL_MIN_BYTES that send every window to / away from threads


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory):
    """A collection of 4 datasets (chunks of 64 entries, so a window's ranges start and end
    inside chunks) with obs, and its rows as a frame."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    import annbatch.collection._layout as layout
    from annbatch import DatasetCollection

    tmp = tmp_path_factory.mktemp("threads")
    rng = np.random.default_rng(5)
    n_obs, n_var = 500, 30
    dense = (rng.random((n_obs, n_var)) < 0.3) * rng.integers(1, 100, (n_obs, n_var))
    names = [f"cell{k}" for k in range(n_obs)]
    adata = ad.AnnData(
        X=sp.csr_matrix(dense.astype("float32")),
        obs=pd.DataFrame(
            {"k": np.arange(n_obs), "kind": pd.Categorical(rng.choice(["a", "b", "c"], n_obs))},
            index=names,
        ),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_var)]),
    )
    adata.write_h5ad(tmp / "in.h5ad")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SPARSE_CHUNK", "SPARSE_CHUNK_UNCOMPRESSED", "PACKED_LZ4_CHUNK"):
            mp.setattr(layout, name, 64)
        built = DatasetCollection(tmp / "c.zarr").add_adatas(
            [str(tmp / "in.h5ad")], dataset_size=125, progress=False, rng=0
        )
    return built, adata


def _epoch(
    collection, monkeypatch, threshold: int, **kwargs
) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    monkeypatch.setattr(reader_module, "PARALLEL_MIN_BYTES", threshold)
    loader = Loader(shuffle=True, to=None, rng=np.random.default_rng(11), **kwargs)
    loader.use_collection(collection, obs_index=True)
    return [(list(b["obs"].index), b["X"].toarray(), b["obs"]["k"].to_numpy()) for b in loader]


@settings(max_examples=12, deadline=None)
@given(
    chunk=st.sampled_from([1, 7, 64, 100]),
    preload=st.integers(1, 12),
    batch=st.sampled_from([1, 16, 50]),
)
def test_threads_and_the_calling_thread_yield_the_same_batches(
    collection, chunk, preload, batch
) -> None:
    built, adata = collection
    preload = max(preload, -(-batch // chunk))  # a window holds at least one batch
    kwargs = {"chunk_size": chunk, "preload_nchunks": preload, "batch_size": batch}
    with pytest.MonkeyPatch.context() as mp:
        threaded = _epoch(built, mp, ALWAYS, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        here = _epoch(built, mp, NEVER, **kwargs)
    assert len(threaded) == len(here)
    rows = adata.obs_names
    for (names_t, x_t, k_t), (names_h, x_h, k_h) in zip(threaded, here, strict=True):
        assert names_t == names_h
        np.testing.assert_array_equal(x_t, x_h)
        np.testing.assert_array_equal(k_t, k_h)
        at = rows.get_indexer(names_t)
        np.testing.assert_array_equal(x_t, adata.X[at].toarray())  # the stored rows
        np.testing.assert_array_equal(k_t, adata.obs["k"].to_numpy()[at])  # obs aligned
    seen = [n for names, _, _ in here for n in names]
    assert sorted(seen) == sorted(rows)  # every row once


def _read_threads_started(loader: Loader, seen: list[bool] | None = None) -> bool:
    """Iterate ``loader``; whether read threads ran meanwhile (also appended to ``seen``
    after each batch, for an epoch that raises)."""
    seen = [] if seen is None else seen
    for _ in loader:
        seen.append(any(t.name.startswith("annbatch-read_") for t in threading.enumerate()))
    return any(seen)


def test_small_windows_are_read_on_the_calling_thread(collection, monkeypatch) -> None:
    """Read threads start only when a window has enough to decode: a pool's threads start
    with its first task, so none exist when every window is read where it is asked for."""
    built, _ = collection
    monkeypatch.setattr(reader_module, "WAIT_RATIO", 1e9)  # a loaded machine is no storage wait
    loader = Loader(chunk_size=16, preload_nchunks=4, batch_size=32, shuffle=True, to=None)
    loader.use_collection(built)
    assert not _read_threads_started(loader)
    monkeypatch.setattr(reader_module, "PARALLEL_MIN_BYTES", ALWAYS)
    assert _read_threads_started(loader)


def test_a_window_that_waits_on_storage_sends_the_epoch_to_the_read_threads(
    collection, monkeypatch
) -> None:
    """Small windows read on the calling thread while reads cost CPU; once one waits on
    storage (here every whole-chunk read of obs and row pointers takes 2 ms, as on a cold
    network file system), the rest of the epoch is read on the read threads."""
    import os
    import time

    import annbatch._core.chunks.small as small

    site = reader_module.ReadSite()
    with site.timed(here=True):
        time.sleep(0.02)
    assert site.waited
    assert site.threads([])  # whatever the window
    idle = reader_module.ReadSite()
    with idle.timed(here=False):
        time.sleep(0.02)
    assert not idle.waited

    class SlowOS:
        def __getattr__(self, name: str):
            return getattr(os, name)

        def pread(self, fd: int, n: int, offset: int) -> bytes:
            time.sleep(0.002)
            return os.pread(fd, n, offset)

    monkeypatch.setattr(small, "os", SlowOS())
    built, adata = collection
    loader = Loader(chunk_size=16, preload_nchunks=4, batch_size=32, shuffle=True, to=None)
    loader.use_collection(built, obs_index=True)
    seen = []
    started = False
    for batch in loader:
        started |= any(t.name.startswith("annbatch-read_") for t in threading.enumerate())
        seen.extend(batch["obs"].index)
    assert started
    assert sorted(seen) == sorted(adata.obs_names)


def test_damage_found_on_the_calling_thread_is_raised_to_the_user(
    tmp_path: Path, collection, monkeypatch
) -> None:
    """A damaged chunk read on the calling thread (no read threads) fails the iteration with
    the error naming it, as it does from a read thread."""
    import shutil

    from annbatch import DatasetCollection
    from annbatch.errors import ChecksumMismatchError

    built, _ = collection
    copy = tmp_path / "c.zarr"
    shutil.copytree(built.path, copy)
    for shard in sorted(copy.glob("dataset_*/X/indices/c/*"))[-1:]:  # the last dataset's
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 3] ^= 0xFF  # a byte of a chunk's column indices (the index is last)
        shard.write_bytes(bytes(raw))
    monkeypatch.setattr(reader_module, "WAIT_RATIO", 1e9)
    loader = Loader(chunk_size=16, preload_nchunks=2, batch_size=32, shuffle=False, to=None)
    loader.use_collection(DatasetCollection(copy, mode="r"))
    seen: list[bool] = []
    with pytest.raises(ChecksumMismatchError, match="indices"):
        _read_threads_started(loader, seen)
    assert seen  # batches of the datasets before it came first
    assert not any(seen)  # read on the calling thread
