"""Shuffle quality next to speed: how well batches mix donors, per loader setting.

Writes a seeded atlas sorted by donor (one zarr store, as published atlases are) and the same
rows as one h5ad file per donor, builds a DatasetCollection from the donor files, then for each
setting streams two epochs and prints rows/s next to the donor mixing score of the first
(:func:`annbatch.quality.mixing_score`: 1 = as mixed as fully random batches, 0 = one donor
per batch), and "batch-mates again": of the rows half a chunk apart (i, i + chunk_size // 2)
that shared a batch in the first epoch, the share that share one again in the second (fully
random batches: about batch size / rows). Samplers: ChunkSampler, with random chunk offsets (chunk+offset), and
WeightedSampler.balanced over donors, without replacement (balanced). Each setting runs in a
fresh process.

Usage: python benchmarks/shuffle_quality.py [--donors 100] [--cells-per-donor 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import run_child

SETTINGS = [  # (source, sampler, chunk_size, preload_nchunks)
    ("sorted atlas", "chunk", 256, 64),
    ("sorted atlas", "chunk+offset", 256, 64),
    ("sorted atlas", "chunk", 32, 512),
    ("sorted atlas", "chunk+offset", 32, 512),
    ("sorted atlas", "chunk", 8, 2048),
    ("sorted atlas", "chunk", 1, 16384),
    ("sorted atlas", "balanced", 1, 16384),
    ("collection", "chunk", 256, 64),
    ("collection", "chunk", 32, 512),
]
BATCH = 4096

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, zarr
import annbatch
from annbatch.quality import mixing_score
from annbatch.samplers import WeightedSampler
args = json.loads(sys.argv[1])
if args["collection"]:
    adatas = [annbatch.load_x_and_obs(g) for g in annbatch.DatasetCollection(args["path"]).datasets]
else:
    adatas = [annbatch.load_x_and_obs(zarr.open_group(args["path"], mode="r"))]
donors = np.concatenate([a.obs["donor"].to_numpy() for a in adatas])
if args["sampler"] == "balanced":
    sampler = WeightedSampler.balanced(donors, replacement=False, batch_size=args["batch"],
                                       window_size=args["chunk"] * args["preload"], rng=np.random.default_rng(0))
else:
    sampler = annbatch.ChunkSampler(args["chunk"], args["preload"], args["batch"], shuffle=True,
                                    random_offset=args["sampler"] == "chunk+offset", rng=np.random.default_rng(0))
loader = annbatch.Loader(batch_sampler=sampler, to=None, return_index=True).add_anndatas(adatas)
epochs, rates = [], []
for epoch in range(2):
    batch_of = np.full(len(donors), -1)
    labels, rows, t0 = [], 0, time.perf_counter()
    for number, batch in enumerate(loader):
        labels.append(batch["obs"]["donor"].to_numpy())
        batch_of[batch["index"]] = number
        rows += batch["X"].shape[0]
    rates.append(rows / (time.perf_counter() - t0))
    epochs.append((batch_of, mixing_score(labels)))
# Rows half a chunk apart (i, i + d) that share a batch in the first epoch: how many share one
# again in the second? With fixed chunk boundaries the same pairs are chunk-mates every epoch.
(first, score), (second, _) = epochs
d = max(1, args["chunk"] // 2)
together = first[:-d] == first[d:]
again = together & (second[:-d] == second[d:])
print(json.dumps({"rows_s": float(np.median(rates)), "score": score,
                  "again": float(again.sum() / max(1, together.sum()))}))
"""


def make_data(folder: Path, donors: int, cells: int, n_var: int, nnz: int) -> tuple[Path, Path]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from annbatch import DatasetCollection

    folder.mkdir(parents=True, exist_ok=True)
    atlas, collection = (
        folder / f"atlas_{donors}x{cells}.zarr",
        folder / f"collection_{donors}x{cells}.zarr",
    )
    if atlas.exists() and collection.exists():
        return atlas, collection
    rng = np.random.default_rng(0)
    var = pd.DataFrame(index=[f"g{j}" for j in range(n_var)])
    parts, paths = [], []
    for d in range(donors):
        indices = np.sort(rng.integers(0, n_var, size=(cells, nnz), dtype=np.int32), axis=1).ravel()
        x = sp.csr_matrix(
            (
                rng.poisson(2.0, cells * nnz).astype(np.float32) + 1,
                indices,
                np.arange(cells + 1) * nnz,
            ),
            shape=(cells, n_var),
        )
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
    p.add_argument("--donors", type=int, default=100)
    p.add_argument("--cells-per-donor", type=int, default=1_000)
    p.add_argument("--n-var", type=int, default=2_000)
    p.add_argument("--nnz", type=int, default=200)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    atlas, collection = make_data(a.dir, a.donors, a.cells_per_donor, a.n_var, a.nnz)
    print(
        f"{a.donors} donors x {a.cells_per_donor:,} cells, {a.n_var:,} genes, {a.nnz} nnz/row; batch {BATCH}; "
        f"median of {a.runs} runs\n"
    )
    print(
        "| rows from | sampler | chunk / preload | rows/s | donor mixing (1 = random) | batch-mates again |"
    )
    print("|---|---|---|---|---|---|")
    for source, sampler, chunk, preload in SETTINGS:
        args = {
            "path": str(collection if source == "collection" else atlas),
            "collection": source == "collection",
            "sampler": sampler,
            "batch": BATCH,
            "chunk": chunk,
            "preload": preload,
        }
        runs = []
        for _ in range(a.runs):
            runs.append(run_child(sys.executable, args, child=CHILD))
        speed = statistics.median(r["rows_s"] for r in runs)
        score = statistics.median(r["score"] for r in runs)
        again = statistics.median(r["again"] for r in runs)
        print(
            f"| {source} | {sampler} | {chunk} / {preload} | {speed:,.0f} | {score:.2f} | {again:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
