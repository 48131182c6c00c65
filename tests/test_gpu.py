"""preload_to_gpu: the GPU stage. Tests marked ``gpu`` need CuPy and a CUDA device and are
skipped elsewhere; the rest check, on any machine, what must hold without a GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

from annbatch import Loader
from annbatch._core.gpu import _split_copy, device_sparse_dtype
from annbatch.errors import GPUUnavailableError, InvalidArgumentError, UnsupportedDatasetError

from conftest import FORMATS, KINDS, check_epoch, to_numpy


# ------------------------------------------------------------------- without a GPU, anywhere
@pytest.mark.parametrize(
    ("stored", "on_gpu"),
    [
        ("float32", "float32"),
        ("float64", "float64"),
        ("bool", "bool"),
        ("float16", "float32"),
        ("int8", "float32"),
        ("uint8", "float32"),
        ("int16", "float32"),
        ("uint16", "float32"),
        ("int32", "float64"),
        ("uint32", "float64"),
        ("int64", "float64"),
        ("uint64", "float64"),
    ],
)
def test_sparse_values_on_the_gpu_are_exact_floats(stored, on_gpu):
    assert device_sparse_dtype(np.dtype(stored)) == np.dtype(on_gpu)
    # The rule is exact: every value of the stored type survives the conversion.
    info = np.iinfo(stored) if np.dtype(stored).kind in "iu" else None
    if info is not None and np.dtype(stored).itemsize <= 4:
        extremes = np.array([info.min, info.max], dtype=stored)
        assert np.array_equal(extremes.astype(on_gpu).astype(stored), extremes)


def test_sparse_strings_cannot_go_to_the_gpu():
    with pytest.raises(UnsupportedDatasetError, match="cannot be put on the GPU"):
        device_sparse_dtype(np.dtype("U3"))


@pytest.mark.parametrize("rows", [0, 1, 7, 300_000])
@pytest.mark.parametrize("pieces", [1, 3, 16])
def test_staging_copies_split_across_threads_copy_everything(rows, pieces):
    src = np.arange(rows * 5, dtype=np.int64).reshape(rows, 5)
    dest = np.zeros((rows, 5), dtype=np.int32)  # index arrays are narrowed while staged
    tasks = _split_copy(dest, src, pieces)
    assert len(tasks) <= pieces
    for task in tasks:
        task()
    np.testing.assert_array_equal(dest, src)


def test_preload_to_gpu_must_be_a_bool():
    with pytest.raises(InvalidArgumentError, match="preload_to_gpu must be a bool"):
        Loader(preload_to_gpu="yes")  # type: ignore[arg-type]


def test_preload_to_gpu_without_cupy_says_what_to_install():
    # cupy made unimportable, whatever this machine has: the error comes at construction,
    # and every CPU path still works without importing it.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["cupy"] = None
        import numpy as np
        import annbatch
        from annbatch.errors import GPUUnavailableError
        try:
            annbatch.Loader(preload_to_gpu=True)
        except GPUUnavailableError as e:
            assert "cupy" in str(e) and ".[gpu]" in str(e), str(e)
        else:
            raise AssertionError("preload_to_gpu=True without cupy must fail")
        loader = annbatch.Loader(batch_size=3, to=None).add_dataset(np.ones((7, 2)))
        assert sum(b["X"].shape[0] for b in loader) == 7
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


def _has_cuda() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA device")
def test_preload_to_gpu_without_a_device_fails_at_construction():
    with pytest.raises(GPUUnavailableError, match="preload_to_gpu=True needs"):
        Loader(preload_to_gpu=True)


# ------------------------------------------------------------------------ on a CUDA device
gpu = pytest.mark.gpu


@pytest.fixture
def cp():
    cupy = pytest.importorskip("cupy")
    if not _has_cuda():
        pytest.skip("needs a CUDA device")
    return cupy


def _epoch(stores, *, to_torch: bool, preload_to_gpu: bool, **kwargs):
    loader = Loader(
        return_index=True, to="torch" if to_torch else None, preload_to_gpu=preload_to_gpu, **kwargs
    ).add_anndatas([s.adata() for s in stores])
    return loader, list(loader)


@gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy", ["concat-shuffle", "shuffle-concat"])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("to_torch", [False, True])
@pytest.mark.parametrize(("chunk_size", "preload_nchunks", "batch_size"), [(5, 3, 4), (1, 16, 5)])
def test_same_rows_as_the_cpu(
    cp, pool, fmt, kind, strategy, shuffle, to_torch, chunk_size, preload_nchunks, batch_size
):
    stores = pool.many(fmt, kind, (37, 0, 21))
    settings = {
        "chunk_size": chunk_size,
        "preload_nchunks": preload_nchunks,
        "batch_size": batch_size,
        "shuffle": shuffle,
        "concat_strategy": strategy,
    }
    _, on_cpu = _epoch(
        stores, to_torch=False, preload_to_gpu=False, rng=np.random.default_rng(3), **settings
    )
    _, on_gpu = _epoch(
        stores, to_torch=to_torch, preload_to_gpu=True, rng=np.random.default_rng(3), **settings
    )
    order = check_epoch(on_gpu, stores)
    np.testing.assert_array_equal(order, np.concatenate([b["index"] for b in on_cpu]))
    for batch in on_gpu:
        x = batch["X"]
        if to_torch:
            import torch

            assert isinstance(x, torch.Tensor)
            assert x.is_cuda
            assert x.layout == (torch.sparse_csr if kind == "sparse" else torch.strided)
        elif kind == "sparse":
            import cupyx.scipy.sparse as cusp

            assert isinstance(x, cusp.csr_matrix)
        else:
            assert isinstance(x, cp.ndarray)


@gpu
@pytest.mark.parametrize("dtype", ["int32", "uint16", "int64"])
def test_integer_sparse_values_arrive_as_exact_floats(cp, dtype):
    rng = np.random.default_rng(0)
    matrix = sp.random(50, 9, density=0.3, format="csr", random_state=1, dtype=np.float64)
    matrix.data = rng.integers(0, np.iinfo(dtype).max, matrix.nnz, dtype=dtype)
    loader = Loader(
        preload_to_gpu=True,
        to=None,
        batch_size=7,
        chunk_size=4,
        preload_nchunks=3,
        return_index=True,
    )
    loader.add_dataset(matrix)
    for batch in loader:
        assert batch["X"].dtype == device_sparse_dtype(np.dtype(dtype))
        np.testing.assert_array_equal(to_numpy(batch["X"]), matrix[batch["index"]].toarray())


@gpu
@pytest.mark.parametrize("compressors", [None, "auto"], ids=["uncompressed", "zstd"])
@pytest.mark.parametrize("layout", ["dense", "csr-int32", "csr-int64"])
def test_windows_read_straight_into_pinned_memory(cp, tmp_path, layout, compressors):
    # Windows read by our own chunk reader go straight into the pinned staging buffers; int64
    # indices go through ordinary memory (the GPU takes int32).
    import anndata as ad
    import zarr

    rng = np.random.default_rng(1)
    matrix = sp.random(300, 40, density=0.2, format="csr", random_state=2, dtype=np.float32)
    if layout == "csr-int64":
        matrix.indices, matrix.indptr = (
            matrix.indices.astype(np.int64),
            matrix.indptr.astype(np.int64),
        )
    x = matrix.toarray() if layout == "dense" else matrix
    group = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    chunks = (16, 40) if layout == "dense" else (100,)
    ad.io.write_elem(group, "X", x, dataset_kwargs={"chunks": chunks, "compressors": compressors})
    stored = group["X"]
    loader = Loader(
        preload_to_gpu=True,
        to=None,
        batch_size=32,
        chunk_size=8,
        preload_nchunks=6,
        shuffle=True,
        rng=rng,
        return_index=True,
    )
    loader.add_dataset(ad.io.sparse_dataset(stored) if layout != "dense" else stored)
    seen = []
    for _ in range(2):  # a second epoch reuses the staging buffers
        for batch in loader:
            np.testing.assert_array_equal(to_numpy(batch["X"]), matrix[batch["index"]].toarray())
            seen.append(batch["index"])
    assert np.sort(np.concatenate(seen)).tolist() == sorted(list(range(300)) * 2)


@gpu
def test_torch_tensors_share_memory_with_cupy(cp):
    from annbatch._core import gpu as gpu_stage

    dense = cp.arange(12, dtype=cp.float32).reshape(4, 3)
    assert gpu_stage.to_torch(dense).data_ptr() == dense.data.ptr
    import cupyx.scipy.sparse as cusp

    csr = cusp.csr_matrix(dense)
    tensor = gpu_stage.to_torch(csr)
    assert tensor.values().data_ptr() == csr.data.data.ptr
    assert tensor.crow_indices().data_ptr() == csr.indptr.data.ptr


@gpu
@pytest.mark.parametrize("kind", KINDS)
def test_no_memory_growth_over_many_windows(cp, pool, kind):
    # 40 windows of 32 rows: after each window the pool is emptied, so the memory it holds
    # stays at about one window (plus the one read ahead), however many windows pass.
    store = pool.get("zarr", kind, 1280)
    loader = Loader(
        preload_to_gpu=True,
        to=None,
        chunk_size=4,
        preload_nchunks=8,
        batch_size=8,
        shuffle=True,
    ).add_anndata(store.adata())
    mempool = cp.get_default_memory_pool()
    mempool.free_all_blocks()
    held = []
    for i, batch in enumerate(loader):
        del batch
        if i % 4 == 3:  # the last batch of a window
            held.append(mempool.total_bytes())
    assert len(held) == 40
    assert max(held[20:]) <= max(held[:20]), held  # no growth
    assert max(held) < 2**20, held  # a few windows of 32 rows, and the batches cut from them
    mempool.free_all_blocks()
    assert mempool.used_bytes() == 0


@gpu
def test_break_on_the_gpu_path(cp, pool):
    store = pool.get("zarr", "sparse", 200)
    loader = Loader(preload_to_gpu=True, to=None, chunk_size=5, preload_nchunks=2, batch_size=5)
    loader.add_anndata(store.adata())
    for i, _batch in enumerate(loader):
        if i == 3:
            break
    del _batch  # the batch kept from the loop above holds GPU memory
    assert sum(b["X"].shape[0] for b in loader) == 200  # the next epoch starts cleanly
    assert cp.get_default_memory_pool().used_bytes() == 0


@gpu
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_dataloader_workers_are_refused(cp, pool):
    import gc

    import torch

    store = pool.get("zarr", "dense", 40)
    loader = Loader(preload_to_gpu=True, batch_size=4, chunk_size=4, preload_nchunks=2)
    loader.add_anndata(store.adata())
    workers = torch.utils.data.DataLoader(
        loader, batch_size=None, num_workers=2, multiprocessing_context="spawn"
    )
    with pytest.raises(GPUUnavailableError, match="DataLoader worker"):
        list(workers)
    # torch's iterator, dropped after its workers failed, reports an error while it reaps
    # them: let that happen here, where it is expected, not at the end of the session.
    gc.collect()


@gpu
@pytest.mark.parametrize("to_torch", [False, True])
@pytest.mark.parametrize("read_ahead", [0, 1])
@pytest.mark.parametrize("kind", KINDS)
def test_windows_land_on_the_consumers_device(cp, pool, kind, read_ahead, to_torch):
    # Under DDP each rank makes its own GPU current before iterating; the read-ahead thread
    # must copy to that device, not to device 0. Checked on the last device there is.
    device = cp.cuda.runtime.getDeviceCount() - 1
    store = pool.get("zarr", kind, 100)
    with cp.cuda.Device(device):
        loader = Loader(
            preload_to_gpu=True,
            to="torch" if to_torch else None,
            chunk_size=5,
            preload_nchunks=4,
            batch_size=10,
            read_ahead=read_ahead,
        ).add_anndata(store.adata())
        for batch in loader:
            x = batch["X"]
            if to_torch:
                assert x.device.type == "cuda"
                assert x.device.index == device
            else:
                assert (x.data if hasattr(x, "indptr") else x).device.id == device
