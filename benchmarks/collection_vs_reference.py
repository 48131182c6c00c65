"""Our Loader on our DatasetCollection against the reference loader on its own collection.

Writes seeded sparse h5ad inputs (UMI-like counts from ``_umi.py`` by default; ``--data
uniform``: ``build_memory.py``'s generator), builds one collection with
annbatch and one with the reference (annbatch 0.3.1, its defaults, in its own interpreter),
then times each loader on its own collection, alternating, fresh process per run.

Usage: python benchmarks/collection_vs_reference.py --reference-python /path/to/venv/bin/python
       [--files 4] [--rows-per-file 10000] [--runs 3] [--compression packed-lz4,none]
       [--data umi|uniform]
       [--baseline-src /path/to/other/checkout/src]

With --baseline-src, annbatch from that source tree (an earlier commit) builds its own
collections and reads them too, alternating with ours: a before/after measurement in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import BATCH, run_child, size_mb
from build_memory import write_inputs

BUILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np, annbatch
out, options, inputs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
annbatch.DatasetCollection(out).add_adatas(inputs, rng=np.random.default_rng(0), **options)
"""


def build(
    python: str,
    out: Path,
    inputs: list[Path],
    options: dict | None = None,
    pythonpath: str | None = None,
) -> float:
    if out.exists():
        return float("nan")
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    elif python != sys.executable:  # the reference must build with its own annbatch, not ours
        env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    command = [python, "-c", BUILD, str(out), json.dumps(options or {}), *map(str, inputs)]
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - t0


def write_umi_inputs(folder: Path, files: int, rows: int) -> list[Path]:
    """``files`` h5ad files of ``rows`` seeded UMI-like cells each (seed: the file's number)."""
    import warnings

    import anndata as ad
    from _umi import umi_counts

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = folder / f"umi_{i}_{rows}.h5ad"
        paths.append(path)
        if path.exists():
            continue
        x = umi_counts(rows, seed=i)
        adata = ad.AnnData(X=x)
        adata.obs_names = [f"f{i}_c{k}" for k in range(rows)]
        adata.var_names = [f"g{j}" for j in range(x.shape[1])]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata.write_h5ad(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/collections"))
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--rows-per-file", type=int, default=10_000)
    p.add_argument("--n-var", type=int, default=5_000)
    p.add_argument("--nnz", type=int, default=400)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--max-rows",
        type=int,
        default=10**9,
        help="stop each run after this many rows (default: whole epochs)",
    )
    p.add_argument("--reference-python", required=True)
    p.add_argument(
        "--compression",
        default="packed-lz4,none",
        help="our collections to build and read, by layout (compression=)",
    )
    p.add_argument(
        "--baseline-src", help="src folder of another annbatch checkout, run as further loaders"
    )
    p.add_argument(
        "--data",
        choices=["umi", "uniform"],
        default="umi",
        help="umi: UMI-like counts (benchmarks/_umi.py, 20,000 genes, ~3,200 detected per cell; "
        "--n-var and --nnz are ignored); uniform: --nnz Poisson counts per row at random genes",
    )
    a = p.parse_args()
    if a.data == "umi":
        inputs = write_umi_inputs(a.dir / "inputs", a.files, a.rows_per_file)
        tag = f"umi_{a.files}x{a.rows_per_file}"
    else:
        inputs = write_inputs(a.dir / "inputs", a.files, a.rows_per_file, a.n_var, a.nnz)
        tag = f"{a.files}x{a.rows_per_file}_{a.n_var}_{a.nnz}"
    # name -> (interpreter, collection, zarrs pipeline, build options, PYTHONPATH)
    loaders: dict[str, tuple[str, Path, bool, dict | None, str | None]] = {}
    for codec in a.compression.split(","):
        loaders[f"annbatch (ours) on its collection ({codec})"] = (
            sys.executable,
            a.dir / f"ours_{tag}_{codec}.zarr",
            False,
            {"compression": codec},
            None,
        )
        if a.baseline_src:
            loaders[f"annbatch (baseline) on its collection ({codec})"] = (
                sys.executable,
                a.dir / f"baseline_{tag}_{codec}.zarr",
                False,
                {"compression": codec},
                a.baseline_src,
            )
    loaders["reference 0.3.1 + zarrs on its collection"] = (
        a.reference_python,
        a.dir / f"reference_{tag}.zarr",
        True,
        None,
        None,
    )
    for name, (python, out, _, options, pythonpath) in loaders.items():
        seconds = build(python, out, inputs, options, pythonpath)
        print(
            f"{name.split(' on ')[0]}: built {out} ({size_mb(out):,.0f} MB) in {seconds:.0f} s",
            flush=True,
        )
    print(
        f"\n{a.files} inputs x {a.rows_per_file:,} rows, "
        + (
            "UMI-like counts (20,000 genes, ~3,260 nonzeros per cell)"
            if a.data == "umi"
            else f"{a.n_var:,} genes, {a.nnz} nnz/row"
        )
        + f"; batch {BATCH}, shuffled, median of {a.runs} runs\n"
    )
    print(
        "| chunk / preload | loader | rows/s median (min-max) | first batch s | peak RSS MB (above start) |"
    )
    print("|---|---|---|---|---|")
    for chunk, preload in ((256, 64), (32, 512)):
        results: dict[str, list[dict]] = {name: [] for name in loaders}
        for _ in range(a.runs):
            for name, (python, out, zarrs, _, pythonpath) in loaders.items():
                args = {
                    "path": str(out),
                    "batch": BATCH,
                    "chunk": chunk,
                    "preload": preload,
                    "shuffle": True,
                    "hold_s": 0,
                    "max_rows": a.max_rows,
                    "checksum": False,
                    "zarrs": zarrs,
                    "collection": True,
                }
                results[name].append(run_child(python, args, pythonpath=pythonpath))
        for name, runs in results.items():
            speeds = sorted(r["rows"] / r["seconds"] for r in runs)
            print(
                f"| {chunk} / {preload} | {name} | {statistics.median(speeds):,.0f} ({speeds[0]:,.0f}-{speeds[-1]:,.0f}) "
                f"| {statistics.median(r['first_s'] for r in runs):.2f} "
                f"| {max(r['rss_mb'] for r in runs):,.0f} ({max(r['rss_mb'] - r['base_mb'] for r in runs):,.0f}) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
