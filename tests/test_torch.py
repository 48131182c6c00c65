"""torch output, DataLoader workers, and running without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, IterableDataset

from annbatch import Loader
from annbatch._core.convert import to_torch

from conftest import check_epoch, worker_context


def test_loader_is_an_iterable_dataset():
    assert isinstance(Loader(), IterableDataset)


def test_to_torch_is_the_default():
    assert Loader()._output == "torch"


def test_dense_tensor_shares_memory():
    block = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensor = to_torch(block)
    assert tensor.data_ptr() == block.ctypes.data
    block[0, 0] = 42
    assert tensor[0, 0] == 42


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_sparse_tensor_shares_memory(index_dtype):
    block = sp.csr_matrix(np.eye(4, 5, dtype=np.float32))
    block.indices = block.indices.astype(index_dtype)
    block.indptr = block.indptr.astype(index_dtype)
    tensor = to_torch(block)
    assert tensor.layout == torch.sparse_csr
    assert tensor.values().data_ptr() == block.data.ctypes.data
    assert tensor.col_indices().data_ptr() == block.indices.ctypes.data
    np.testing.assert_array_equal(tensor.to_dense().numpy(), block.toarray())


def test_sparse_row_slice_with_offset_indptr():
    block = sp.csr_matrix(np.arange(20, dtype=np.float32).reshape(5, 4))[2:4]
    np.testing.assert_array_equal(to_torch(block).to_dense().numpy(), block.toarray())


@pytest.mark.parametrize("fmt", ["zarr", "h5ad", "memory"])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_torch_batches_equal_stored_rows(pool, fmt, kind):
    stores = pool.many(fmt, kind, [19, 8])
    loader = Loader(
        chunk_size=3,
        preload_nchunks=3,
        batch_size=4,
        shuffle=True,
        return_index=True,
        rng=np.random.default_rng(0),
    )
    batches = list(loader.add_anndatas([s.adata() for s in stores]))
    layout = torch.strided if kind == "dense" else torch.sparse_csr
    assert all(isinstance(b["X"], torch.Tensor) and b["X"].layout == layout for b in batches)
    check_epoch(batches, stores)


# Three workers on a two-core machine is deliberate here: it tests uneven work sharing.
more_workers_than_cores = pytest.mark.filterwarnings(
    "ignore:This DataLoader will create 3 worker processes:UserWarning"
)


def _epoch(loader: Loader, start: str = "spawn", **dataloader_kwargs) -> list[dict]:
    dl = DataLoader(
        loader, batch_size=None, multiprocessing_context=worker_context(start), **dataloader_kwargs
    )
    return list(dl)


@pytest.mark.slow
@more_workers_than_cores
@pytest.mark.parametrize(
    ("fmt", "kind", "num_workers", "chunk_size", "preload_nchunks", "batch_size", "start"),
    [
        ("zarr", "sparse", 2, 1, 16, 8, "spawn"),
        ("zarr", "dense", 3, 4, 2, 4, "forkserver"),
        ("h5ad", "sparse", 2, 1, 8, 8, "forkserver"),
        ("h5ad", "dense", 2, 5, 3, 5, "spawn"),
        ("memory", "sparse", 2, 1, 32, 16, "forkserver"),
    ],
)
def test_dataloader_workers_yield_every_row_once(
    pool, fmt, kind, num_workers, chunk_size, preload_nchunks, batch_size, start
):
    stores = pool.many(fmt, kind, [41, 30])
    loader = Loader(
        chunk_size=chunk_size,
        preload_nchunks=preload_nchunks,
        batch_size=batch_size,
        shuffle=True,
        return_index=True,
        rng=np.random.default_rng(0),
    ).add_anndatas([s.adata() for s in stores])
    torch.manual_seed(0)
    first = check_epoch(_epoch(loader, start, num_workers=num_workers), stores)
    assert sorted(first) == list(range(71))
    second = check_epoch(_epoch(loader, start, num_workers=num_workers), stores)
    assert sorted(second) == list(range(71))
    assert not np.array_equal(first, second), "the second epoch repeated the first"


@pytest.mark.slow
def test_persistent_workers_draw_a_new_order_each_epoch(pool):
    stores = pool.many("zarr", "sparse", [50])
    loader = Loader(chunk_size=1, preload_nchunks=10, batch_size=5, shuffle=True, return_index=True)
    loader.add_anndatas([s.adata() for s in stores])
    dl = DataLoader(
        loader,
        batch_size=None,
        num_workers=2,
        multiprocessing_context="spawn",
        persistent_workers=True,
    )
    orders = [np.concatenate([b["index"] for b in dl]) for _ in range(2)]
    for order in orders:
        assert sorted(order) == list(range(50))
    assert not np.array_equal(orders[0], orders[1])
    assert len(dl) == 10


@pytest.mark.slow
@more_workers_than_cores
def test_more_workers_than_windows(pool):
    stores = pool.many("h5ad", "dense", [10])
    loader = Loader(chunk_size=4, preload_nchunks=2, batch_size=4, return_index=True).add_anndatas(
        [s.adata() for s in stores]
    )
    batches = _epoch(loader, num_workers=3)
    assert sorted(check_epoch(batches, stores)) == list(range(10))


def test_without_torch_yields_numpy(pool):
    """With torch blocked from importing, annbatch still works and yields numpy / scipy."""
    store = pool.get("zarr", "sparse", 20)
    dense = pool.get("zarr", "dense", 20)
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class BlockTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")

        sys.meta_path.insert(0, BlockTorch())
        import anndata as ad, numpy as np, scipy.sparse as sp, zarr
        import annbatch

        sparse = ad.io.sparse_dataset(zarr.open_group({store.path!r}, mode="r")["X"])
        dense = zarr.open_group({dense.path!r}, mode="r")["X"]
        for x, kind in ((sparse, sp.csr_matrix), (dense, np.ndarray)):
            loader = annbatch.Loader(batch_size=4, shuffle=True).add_dataset(x)
            batches = list(loader)
            assert all(type(b["X"]) is kind for b in batches), [type(b["X"]) for b in batches]
            assert sum(b["X"].shape[0] for b in batches) == 20
        try:
            annbatch.Loader(to="torch")
        except ImportError as e:
            assert "needs the optional dependency 'torch'" in str(e)
        else:
            raise AssertionError("to='torch' without torch must fail")
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_import_annbatch_does_not_import_torch():
    code = "import sys, annbatch; assert 'torch' not in sys.modules; assert 'zarr' not in sys.modules; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr
