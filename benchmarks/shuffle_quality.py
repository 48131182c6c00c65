"""Shuffle quality next to speed: how well batches mix donors, per loader setting.

Writes a seeded atlas sorted by donor (one zarr store, as published atlases are) and the same
rows as one h5ad file per donor, builds a DatasetCollection from the donor files, then for each
setting streams one epoch (up to --max-rows) and prints rows/s next to the donor mixing score
(:func:`annbatch.quality.mixing_score`: 1 = as mixed as fully random batches, 0 = one donor
per batch). Each setting runs in a fresh process.

Usage: python benchmarks/shuffle_quality.py [--donors 20] [--cells-per-donor 5000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

SETTINGS = [  # (source, chunk_size, preload_nchunks)
    ("sorted atlas", 256, 64),
    ("sorted atlas", 32, 512),
    ("sorted atlas", 8, 2048),
    ("sorted atlas", 1, 16384),
    ("collection", 256, 64),
    ("collection", 32, 512),
]
BATCH = 4096

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, zarr
import annbatch
from annbatch.quality import mixing_score
args = json.loads(sys.argv[1])
loader = annbatch.Loader(batch_size=args["batch"], chunk_size=args["chunk"], preload_nchunks=args["preload"],
                         shuffle=True, to_torch=False, rng=np.random.default_rng(0))
if args["collection"]:
    loader.use_collection(annbatch.DatasetCollection(args["path"]))
else:
    loader.add_anndata(annbatch.load_x_and_obs(zarr.open_group(args["path"], mode="r")))
labels, rows, t0 = [], 0, time.perf_counter()
for batch in loader:
    labels.append(batch["obs"]["donor"].to_numpy())
    rows += batch["X"].shape[0]
    seconds = time.perf_counter() - t0  # up to the last batch used, as in bench.py
    if rows >= args["max_rows"]:
        break
print(json.dumps({"rows_s": rows / seconds, "score": mixing_score(labels)}))
"""


def make_data(folder: Path, donors: int, cells: int, n_var: int, nnz: int) -> tuple[Path, Path]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from annbatch import DatasetCollection

    folder.mkdir(parents=True, exist_ok=True)
    atlas, collection = folder / f"atlas_{donors}x{cells}.zarr", folder / f"collection_{donors}x{cells}.zarr"
    if atlas.exists() and collection.exists():
        return atlas, collection
    rng = np.random.default_rng(0)
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_var)])
    parts, paths = [], []
    for d in range(donors):
        indices = np.sort(rng.integers(0, n_var, size=(cells, nnz), dtype=np.int32), axis=1).ravel()
        x = sp.csr_matrix((rng.poisson(2.0, cells * nnz).astype(np.float32) + 1, indices, np.arange(cells + 1) * nnz),
                          shape=(cells, n_var))
        x.sum_duplicates()
        obs = pd.DataFrame({"donor": f"donor_{d:02d}"}, index=[f"d{d}_c{i}" for i in range(cells)])
        adata = ad.AnnData(X=x, obs=obs, var=var)
        parts.append(adata)
        path = folder / f"donor_{d:02d}.h5ad"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(path)
        paths.append(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.settings.zarr_write_format = 3
        ad.concat(parts).write_zarr(atlas)  # sorted by donor, zarr v3 (anndata's default chunks)
    DatasetCollection(collection).add_adatas(paths, rng=0, progress=False)
    return atlas, collection


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/shuffle"))
    p.add_argument("--donors", type=int, default=20)
    p.add_argument("--cells-per-donor", type=int, default=5_000)
    p.add_argument("--n-var", type=int, default=2_000)
    p.add_argument("--nnz", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-rows", type=int, default=10**9)
    a = p.parse_args()
    atlas, collection = make_data(a.dir, a.donors, a.cells_per_donor, a.n_var, a.nnz)
    print(f"{a.donors} donors x {a.cells_per_donor:,} cells, {a.n_var:,} genes, {a.nnz} nnz/row; batch {BATCH}; "
          f"median of {a.runs} runs\n")
    print("| rows from | chunk / preload | rows/s | donor mixing score (1 = random) |")
    print("|---|---|---|---|")
    for source, chunk, preload in SETTINGS:
        args = {"path": str(collection if source == "collection" else atlas), "collection": source == "collection",
                "batch": BATCH, "chunk": chunk, "preload": preload, "max_rows": a.max_rows}
        runs = []
        for _ in range(a.runs):
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                                 check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        speed = statistics.median(r["rows_s"] for r in runs)
        score = statistics.median(r["score"] for r in runs)
        print(f"| {source} | {chunk} / {preload} | {speed:,.0f} | {score:.2f} |", flush=True)


if __name__ == "__main__":
    main()
