"""Two DDP ranks (gloo, on the CPU), each with two DataLoader workers, reading one local
collection: every epoch, each row reaches exactly one rank, and each epoch is shuffled anew.

On GPUs the same program runs under ``torchrun`` with the ``nccl`` backend (the process group
then comes from the environment); here ``torch.multiprocessing`` starts the two ranks.

Usage: python examples/ddp.py [--n-obs N] [--n-var N] [--epochs N]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

import annbatch


def write_collection(folder: Path, n_obs: int, n_var: int) -> Path:
    """A collection built from two h5ad files of synthetic counts."""
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
    path = folder / "atlas.zarr"
    annbatch.DatasetCollection(path).add_adatas(paths, dataset_size=n_obs, progress=False)
    return path


def rank_main(rank: int, port: int, path: str, epochs: int, queue) -> None:
    """One DDP rank: its share of each epoch, read by 2 DataLoader worker processes."""
    import warnings

    import torch.distributed as dist
    from torch.utils.data import DataLoader

    # torch notes once per process, as it rebuilds a worker's sparse CSR tensor, that their
    # support is in beta and that it does not check them (annbatch made them valid).
    warnings.filterwarnings(
        "ignore", message="Sparse (CSR tensor support is in beta|invariant checks are implicitly)"
    )
    # Under torchrun: dist.init_process_group("nccl"), rank and world size from the environment.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loader = annbatch.Loader(
            batch_size=256,
            chunk_size=32,
            preload_nchunks=16,
            shuffle=True,
            return_index=True,  # each batch's rows, to check the shares below
            to="torch",
            rng=np.random.default_rng(0),  # one seed on every rank: disjoint shares
        ).use_collection(annbatch.DatasetCollection(path, mode="r"))
        batches = DataLoader(
            loader, batch_size=None, num_workers=2, multiprocessing_context="spawn"
        )
        for epoch in range(epochs):
            loader.set_epoch(epoch)  # as with DistributedSampler: a new order every epoch
            rows = [np.asarray(batch["index"]) for batch in batches]
            queue.put((epoch, rank, np.concatenate(rows)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-obs", type=int, default=2_000, help="rows per input file")
    parser.add_argument("--n-var", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        path = write_collection(Path(tmp), args.n_obs, args.n_var)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(rank_main, args=(port, str(path), args.epochs, queue), nprocs=2, join=True)
        got = [queue.get() for _ in range(2 * args.epochs)]
    n_obs = 2 * args.n_obs
    orders = []
    for epoch in range(args.epochs):
        shares = {rank: rows for e, rank, rows in got if e == epoch}
        both = np.concatenate([shares[0], shares[1]])
        assert np.array_equal(np.sort(both), np.arange(n_obs)), "a row missing or repeated"
        orders.append(both)
        sizes = {rank: rows.size for rank, rows in sorted(shares.items())}
        print(f"epoch {epoch}: rows per rank {sizes}, every one of the {n_obs:,} rows once")
    if args.epochs > 1:
        assert not np.array_equal(orders[0], orders[1]), "the same order twice"
        print("each epoch in a new order")


if __name__ == "__main__":  # spawned ranks and workers import this file: nothing runs on import
    main()
