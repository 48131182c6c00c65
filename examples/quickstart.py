"""Write a small AnnData store and stream it through annbatch.Loader, printing rows/s.

Usage: python examples/quickstart.py [--dir DIR] [--n-obs N] [--n-var N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

import annbatch


def make_adata(n_obs: int, n_var: int, rng: np.random.Generator) -> ad.AnnData:
    """Synthetic counts: ~5% nonzero, with a cell-type label per row."""
    x = sp.random(n_obs, n_var, density=0.05, format="csr", dtype=np.float32, rng=rng)
    x.data = rng.poisson(3.0, size=x.nnz).astype(np.float32) + 1
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(["B", "T", "NK", "mono"], size=n_obs))},
        index=[f"cell_{i}" for i in range(n_obs)],
    )
    return ad.AnnData(X=x, obs=obs)


def write_stores(adata: ad.AnnData, out: Path) -> tuple[Path, Path]:
    """The same data as zarr v3 (sharded) and as h5ad."""
    ad.settings.zarr_write_format = 3
    with warnings.catch_warnings():
        # zarr notes that consolidated metadata is outside the v3 spec; harmless here.
        warnings.simplefilter("ignore", UserWarning)
        adata.write_zarr(out / "demo.zarr")
    adata.write_h5ad(out / "demo.h5ad")
    return out / "demo.zarr", out / "demo.h5ad"


def stream(loader: annbatch.Loader) -> tuple[int, float]:
    start = time.perf_counter()
    rows = 0
    for batch in loader:
        rows += batch["X"].shape[0]
    return rows, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, help="where to write the stores (default: a temporary folder)"
    )
    parser.add_argument("--n-obs", type=int, default=50_000)
    parser.add_argument("--n-var", type=int, default=2_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        zarr_path, h5ad_path = write_stores(make_adata(args.n_obs, args.n_var, rng), out)
        print(f"wrote {args.n_obs:,} cells x {args.n_var:,} genes to {zarr_path} and {h5ad_path}")

        settings = dict(batch_size=4096, chunk_size=32, preload_nchunks=512, shuffle=True)
        with h5py.File(h5ad_path, "r") as f:
            sources = {
                "zarr": annbatch.load_x_and_obs(zarr.open_group(zarr_path, mode="r")),
                "h5ad": annbatch.load_x_and_obs(f),
            }
            for name, adata in sources.items():
                loader = annbatch.Loader(**settings, rng=np.random.default_rng(0)).add_anndata(
                    adata
                )
                rows, seconds = stream(loader)
                print(
                    f"{name:>5}: {rows:,} rows in {seconds:.2f} s = {rows / seconds:,.0f} rows/s ({loader})"
                )


if __name__ == "__main__":
    main()
