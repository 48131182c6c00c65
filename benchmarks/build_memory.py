"""Collection builds stay within their memory budget, whatever the size of the inputs.

Writes seeded sparse inputs (h5ad, several files) larger in memory than the budget, builds a
collection from them in a fresh process, and prints rows/s and that process's peak RSS above
its start (VmHWM - VmRSS before the build).

Usage: python benchmarks/build_memory.py [--files 4] [--rows-per-file 100000] [--budget 256MB]
       [--obs-columns 100] [--baseline-src PATH]

``--obs-columns`` gives every input that many obs columns (float, int, categorical and unique
strings in turn); ``--baseline-src`` also builds with annbatch from that source tree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

CHILD = r"""
import json, shutil, sys, time, warnings
warnings.simplefilter("ignore")
from annbatch import DatasetCollection
out, budget, inputs = sys.argv[1], sys.argv[2], sys.argv[3:]
shutil.rmtree(out, ignore_errors=True)
status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) / 1024
base = status("VmRSS")
t0 = time.perf_counter()
c = DatasetCollection(out).add_adatas(inputs, memory_budget=budget, rng=0, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "n_obs": c.n_obs, "datasets": len(c),
                  "peak_mb": status("VmHWM"), "base_mb": base}))
"""


def _obs(i: int, rows: int, columns: int) -> dict:
    """``columns`` obs columns of input ``i`` (the first one is always ``sample``)."""
    rng = np.random.default_rng(1000 + i)
    out: dict = {"sample": f"s{i}"}
    for j in range(1, columns):
        kind = j % 4
        if kind == 0:
            out[f"float_{j}"] = rng.random(rows)
        elif kind == 1:
            out[f"int_{j}"] = rng.integers(0, 10**6, rows)
        elif kind == 2:
            import pandas as pd

            out[f"cat_{j}"] = pd.Categorical(rng.integers(0, 50, rows).astype(str))
        else:
            out[f"str_{j}"] = np.char.add(f"f{i}c{j}_", np.arange(rows).astype(str)).astype(object)
    return out


def write_inputs(
    folder: Path, files: int, rows: int, n_var: int, nnz: int, obs_columns: int = 1
) -> list[Path]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        suffix = "" if obs_columns == 1 else f"_obs{obs_columns}"
        path = folder / f"input_{i}_{rows}x{n_var}_{nnz}{suffix}.h5ad"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        indices = np.sort(rng.integers(0, n_var, size=(rows, nnz), dtype=np.int32), axis=1).ravel()
        x = sp.csr_matrix(
            (
                rng.poisson(2.0, rows * nnz).astype(np.float32) + 1,
                indices,
                np.arange(rows + 1) * nnz,
            ),
            shape=(rows, n_var),
        )
        x.sum_duplicates()
        obs = pd.DataFrame(_obs(i, rows, obs_columns), index=[f"f{i}_c{k}" for k in range(rows)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.AnnData(
                X=x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_var)])
            ).write_h5ad(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/build"))
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--n-var", type=int, default=5_000)
    p.add_argument("--nnz", type=int, default=400)
    p.add_argument("--budget", default="256MB")
    p.add_argument("--obs-columns", type=int, default=1)
    p.add_argument("--baseline-src", help="also build with annbatch from this source tree")
    a = p.parse_args()
    paths = write_inputs(a.dir, a.files, a.rows_per_file, a.n_var, a.nnz, a.obs_columns)
    in_memory = a.files * a.rows_per_file * a.nnz * 8 / 2**20  # data + indices, float32 + int32
    print(
        "| build | inputs | X in memory | obs columns | budget | datasets | rows/s | peak RSS MB (above start) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, pythonpath in [("ours", None), ("baseline", a.baseline_src)]:
        if name == "baseline" and pythonpath is None:
            continue
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                str(a.dir / "collection.zarr"),
                a.budget,
                *map(str, paths),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {a.files} h5ad x {a.rows_per_file:,} rows, {a.n_var:,} genes, {a.nnz} nnz/row | {in_memory:,.0f} MB "
            f"| {a.obs_columns} | {a.budget} | {r['datasets']} | {r['n_obs'] / r['seconds']:,.0f} "
            f"| {r['peak_mb']:,.0f} ({r['peak_mb'] - r['base_mb']:,.0f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
