"""Shared fixtures: real zarr v3 and h5ad stores (and in-memory arrays) with known contents."""

from __future__ import annotations

import itertools
import multiprocessing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import settings

# No deadline for hypothesis examples: under ``-n 2`` (and on a loaded machine) an example's
# time says nothing about the code; speed is the benchmarks' business.
settings.register_profile("annbatch", deadline=None)
settings.load_profile("annbatch")

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from pathlib import Path

FORMATS = ("zarr", "h5ad", "memory")
KINDS = ("dense", "sparse")
N_VAR = 6


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_matrix(n_obs: int, kind: str, seed: int, *, trailing: tuple[int, ...] = ()) -> Any:
    """Rows whose values identify them: row i of dataset `seed` is unique in the pool."""
    rng = np.random.default_rng(seed)
    shape = (n_obs, N_VAR, *trailing)
    dense = (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + seed * 1000).astype(
        np.float32
    )
    if kind == "dense":
        return dense
    mask = rng.random((n_obs, N_VAR)) < 0.5
    return sp.csr_matrix(np.where(mask, dense, 0).astype(np.float32))


def make_obs(n_obs: int, seed: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"dataset": seed, "local": np.arange(n_obs), "label": pd.Categorical(np.arange(n_obs) % 3)},
        index=[f"d{seed}_c{i}" for i in range(n_obs)],
    )


@dataclass
class Store:
    """One dataset on disk (or in memory) and the values it holds."""

    fmt: str
    kind: str
    matrix: Any  # the expected contents, in memory
    obs: pd.DataFrame
    x: Any = None  # what is passed to the Loader
    path: str | None = None  # the AnnData store on disk, holding X and obs
    handles: list[Any] = field(default_factory=list)

    @property
    def n_obs(self) -> int:
        return self.matrix.shape[0]

    def adata(self) -> ad.AnnData:
        return ad.AnnData(X=self.x, obs=self.obs)


class StorePool:
    """Creates stores on demand and caches them for the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple[Any, ...], Store] = {}
        self._counter = itertools.count()

    def get(self, fmt: str, kind: str, n_obs: int, *, trailing: tuple[int, ...] = ()) -> Store:
        key = (fmt, kind, n_obs, trailing)
        if key not in self._cache:
            self._cache[key] = self._create(fmt, kind, n_obs, next(self._counter), trailing)
        return self._cache[key]

    def many(self, fmt: str, kind: str, sizes: Iterable[int]) -> list[Store]:
        return [self.get(fmt, kind, n) for n in sizes]

    def _create(
        self, fmt: str, kind: str, n_obs: int, seed: int, trailing: tuple[int, ...]
    ) -> Store:
        matrix = make_matrix(n_obs, kind, seed, trailing=trailing)
        obs = make_obs(n_obs, seed)
        store = Store(fmt, kind, matrix, obs)
        path = self.root / f"{seed}_{kind}_{n_obs}"
        # Small, odd on-disk chunks so that reads straddle chunk and shard boundaries.
        if kind == "dense":
            rows = max(1, min(n_obs, 7))
            kwargs: dict[str, Any] = {"chunks": (rows, *matrix.shape[1:])}
        else:
            kwargs = {"chunks": (5,)}
        if fmt == "memory":
            store.x = matrix
        elif fmt == "zarr":
            ad.settings.zarr_write_format = 3
            group = zarr.open_group(f"{path}.zarr", mode="w")
            if n_obs:
                kwargs["shards"] = (kwargs["chunks"][0] * 2, *kwargs["chunks"][1:])
            ad.io.write_elem(group, "X", matrix, dataset_kwargs=kwargs if n_obs else {})
            ad.io.write_elem(group, "obs", obs)
            store.path = f"{path}.zarr"
            x = zarr.open_group(store.path, mode="r")["X"]
            store.x = ad.io.sparse_dataset(x) if kind == "sparse" else x
        else:
            store.path = f"{path}.h5ad"
            with h5py.File(store.path, "w") as f:
                ad.io.write_elem(f, "X", matrix, dataset_kwargs=kwargs if n_obs else {})
                ad.io.write_elem(f, "obs", obs)
            handle = h5py.File(store.path, "r")
            store.handles.append(handle)
            store.x = ad.io.sparse_dataset(handle["X"]) if kind == "sparse" else handle["X"]
        return store

    def close(self) -> None:
        for store in self._cache.values():
            for handle in store.handles:
                handle.close()


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorePool]:
    p = StorePool(tmp_path_factory.mktemp("stores"))
    yield p
    p.close()


def to_numpy(x: Any) -> np.ndarray:
    """A batch's X as a dense numpy array, whatever type the Loader yielded."""
    if sp.issparse(x):
        return x.toarray()
    if isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith(("cupy", "cupyx")):  # preload_to_gpu without torch
        return x.toarray().get() if hasattr(x, "indptr") else x.get()
    import torch

    assert isinstance(x, torch.Tensor)
    if x.layout == torch.sparse_csr:
        x = x.to_dense()
    return x.cpu().numpy()


def expected_rows(stores: list[Store]) -> np.ndarray:
    parts = [s.matrix.toarray() if sp.issparse(s.matrix) else s.matrix for s in stores]
    return np.concatenate(parts, axis=0)


def expected_obs(stores: list[Store]) -> pd.DataFrame:
    return pd.concat([s.obs for s in stores if s.n_obs] or [stores[0].obs])


def check_epoch(batches: list[dict[str, Any]], stores: list[Store]) -> np.ndarray:
    """Assert that every yielded row equals the stored row and its obs; return the global order."""
    want_x = expected_rows(stores)
    want_obs = expected_obs(stores)
    order = []
    for batch in batches:
        # DataLoader's default_convert turns numpy arrays into tensors.
        index = np.asarray(batch["index"])
        assert batch["index"] is not None
        x = to_numpy(batch["X"])
        assert x.shape[0] == index.size
        np.testing.assert_array_equal(x, want_x[index])
        pd.testing.assert_frame_equal(batch["obs"], want_obs.iloc[index])
        order.append(index)
    return np.concatenate(order) if order else np.empty(0, dtype=np.int64)


FORKSERVER_PRELOAD = ["annbatch", "anndata", "torch", "tests._build_child"]
"""What the tests' forkserver imports once, for every process forked from it: one list for
every test, since the first test of a pytest process to start the server decides."""


def worker_context(start: str = "forkserver") -> Any:
    """A multiprocessing context for DataLoader workers (and build children) in tests.

    ``forkserver`` (the default) forks each worker from a server that has imported annbatch
    and torch once; under ``spawn`` every worker imports them again (4-6 s a worker on two
    busy cores). The Loader reaches a worker pickled either way. Not ``fork``: a forked worker
    inherits whatever threads other tests' imports (jax) started. Tests about ``spawn`` itself
    pass ``"spawn"``.
    """
    context = multiprocessing.get_context(start)
    if start == "forkserver":
        context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context
