"""Collection layouts on UMI-like counts: bytes per nonzero and the Loader's rows/s, measured.

Writes seeded UMI-like counts (``_umi.py``: ~3,200 detected genes of 20,000 per cell) as one
h5ad input, builds a collection from it with each of annbatch's layouts
(``DatasetCollection.add_adatas(compression=...)``), and one in the reference library's
collection layout (64 rows per chunk, Blosc LZ4 with byte shuffle: ``n_obs_per_chunk=64``,
what ``write_sharded`` writes), then times our Loader on each: page cache warm, shuffled,
batch 4,096, at chunk 256 / preload 64 and chunk 32 / preload 512. Runs alternate between the
layouts; each is a fresh process that reads ``--epochs`` epochs and reports the rows/s of
all but the first (the first pays for imports, thread start-up and page faults). Also printed:
bytes per nonzero of X on disk (data, indices and indptr; obs and var excluded) and each
layout's rows/s as a ratio of ``none`` (the inputs' types, uncompressed).

Usage: python benchmarks/layout.py [--n-obs 20000] [--runs 5] [--epochs 3]
       [--layouts packed,packed-lz4,none,lz4,zstd,reference]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import BATCH, run_child

SETTINGS = [(256, 64), (32, 512)]

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, annbatch
a = json.loads(sys.argv[1])
collection = annbatch.DatasetCollection(a["path"], mode="r")
loader = annbatch.Loader(batch_size=a["batch"], chunk_size=a["chunk"], preload_nchunks=a["preload"],
                         shuffle=True, to=None, rng=np.random.default_rng(0))
loader.add_datasets([g["X"] for g in collection])
speeds = []
for epoch in range(a["epochs"]):
    t0 = time.perf_counter(); rows = 0
    for batch in loader:
        rows += batch["X"].shape[0]
    speeds.append(rows / (time.perf_counter() - t0))
print(json.dumps({"rows_per_s": sum(speeds[1:]) / max(1, len(speeds) - 1) if len(speeds) > 1 else speeds[0]}))
"""


def build(source: Path, target: Path, layout: str) -> None:
    """A collection of ``source`` in ``layout`` (an annbatch compression, or ``reference``)."""
    import numpy as np

    from annbatch import DatasetCollection

    if target.exists():
        return
    options = {"n_obs_per_chunk": 64} if layout == "reference" else {"compression": layout}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        DatasetCollection(target).add_adatas(
            [source], rng=np.random.default_rng(0), progress=False, **options
        )


def x_bytes_per_nnz(path: Path) -> float:
    """Bytes of X's arrays on disk per stored nonzero, over all datasets."""
    import zarr

    nbytes = nnz = 0
    for group in zarr.open_group(path, mode="r").groups():
        x = path / group[0] / "X"
        nbytes += sum(f.stat().st_size for f in x.rglob("*") if f.is_file())
        nnz += int(group[1]["X"]["data"].shape[0])
    return nbytes / max(1, nnz)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/layout"))
    p.add_argument("--n-obs", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--layouts", default="packed,packed-lz4,none,lz4,zstd,reference")
    a = p.parse_args()
    layouts = a.layouts.split(",")

    import anndata as ad
    from _umi import umi_counts

    a.dir.mkdir(parents=True, exist_ok=True)
    source = a.dir / f"umi_{a.n_obs}.h5ad"
    if not source.exists():
        x = umi_counts(a.n_obs, seed=0)
        adata = ad.AnnData(X=x)
        adata.obs_names = [f"c{i}" for i in range(a.n_obs)]
        adata.var_names = [f"g{j}" for j in range(x.shape[1])]
        adata.write_h5ad(source)
    paths = {name: a.dir / f"umi_{a.n_obs}_{name}.zarr" for name in layouts}
    for name, path in paths.items():
        build(source, path, name)
    speeds: dict[str, dict[tuple[int, int], list[float]]] = {
        n: {s: [] for s in SETTINGS} for n in layouts
    }
    for _ in range(a.runs):
        for setting in SETTINGS:
            for name in layouts:
                args = {
                    "path": str(paths[name]),
                    "batch": BATCH,
                    "chunk": setting[0],
                    "preload": setting[1],
                    "epochs": a.epochs,
                }
                speeds[name][setting].append(
                    run_child(sys.executable, args, child=CHILD)["rows_per_s"]
                )
    median = {n: {s: statistics.median(v) for s, v in d.items()} for n, d in speeds.items()}
    nnz_per_row = umi_counts_nnz(source) / a.n_obs
    print(
        f"\n{a.n_obs:,} UMI-like cells x 20,000 genes ({nnz_per_row:,.0f} nonzeros per cell); our "
        f"Loader, batch {BATCH}, shuffled; rows/s = median over {a.runs} alternating runs of the "
        f"mean of epochs 2-{a.epochs}\n"
    )
    header = " | ".join(f"chunk {c} / {pl} rows/s | vs none" for c, pl in SETTINGS)
    print(f"| layout | X bytes per nonzero | {header} |")
    print("|---|---|" + "---|---|" * len(SETTINGS))
    for name in layouts:
        cells = []
        for s in SETTINGS:
            base = median.get("none", {}).get(s)
            ratio = f"{median[name][s] / base:.2f}x" if base else "-"
            cells.append(f"{median[name][s]:,.0f} | {ratio}")
        label = "reference layout (64 rows/chunk, LZ4)" if name == "reference" else name
        print(f"| {label} | {x_bytes_per_nnz(paths[name]):.2f} | {' | '.join(cells)} |")


def umi_counts_nnz(source: Path) -> int:
    import h5py

    with h5py.File(source, "r") as f:
        return int(f["X"]["data"].shape[0])


if __name__ == "__main__":
    main()
