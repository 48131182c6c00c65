"""What content fingerprints cost a collection build.

Writes one seeded sparse h5ad input (a few hundred MB of X), then builds a collection from it
with content fingerprints (as annbatch does) and without them (the hashing replaced by a no-op),
alternating, and prints the median of each; then the rerun of the finished build's call, which
reads the input whole to tell that it is the same (hashing only, nothing written).

Usage: python benchmarks/fingerprint.py [--rows 40000] [--genes 20000] [--density 0.05]
       [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from annbatch import DatasetCollection
from annbatch.collection import _build


class _NoDigest:
    """ContentDigest's interface, hashing nothing."""

    def __init__(self, *args: object) -> None:
        pass

    def index(self, *args: object) -> None:
        pass

    def column(self, *args: object) -> None:
        pass

    def rows(self, *args: object) -> None:
        pass

    def hexdigest(self) -> str:
        return "-"


def write_input(path: Path, rows: int, genes: int, density: float) -> int:
    """A CSR float32 input with ``density`` of its values set, obs names, a categorical and
    an int obs column; returns X's bytes (data and indices)."""
    rng = np.random.default_rng(0)
    parts = []
    for lo in range(0, rows, 2_000):
        k = min(2_000, rows - lo)
        mask = rng.random((k, genes), dtype=np.float32) < density
        block = sp.csr_matrix(mask.astype(np.float32))
        block.data = rng.integers(1, 50, block.nnz).astype(np.float32)
        parts.append(block)
    x = sp.vstack(parts, format="csr")
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.integers(0, 30, rows).astype(str)),
            "n_genes": np.diff(x.indptr),
        },
        index=[f"cell_{i}" for i in range(rows)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(genes)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return int(x.data.nbytes + x.indices.nbytes)


def build(source: Path, out: Path, *, hashing: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    _build.ContentDigest = _ORIGINAL if hashing else _NoDigest  # type: ignore[assignment,misc]
    try:
        start = time.perf_counter()
        DatasetCollection(out).add_adatas([str(source)], rng=0, progress=False)
        return time.perf_counter() - start
    finally:
        _build.ContentDigest = _ORIGINAL  # type: ignore[misc]


_ORIGINAL = _build.ContentDigest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = folder / "input.h5ad"
        x_bytes = write_input(source, args.rows, args.genes, args.density)
        print(f"input: {args.rows:,} x {args.genes:,} CSR float32, X {x_bytes / 2**20:,.0f} MiB")
        times: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.repeats):  # alternating, so that drift hits both alike
            times["without"].append(build(source, folder / "out.zarr", hashing=False))
            times["with"].append(build(source, folder / "out.zarr", hashing=True))
        reruns = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                DatasetCollection(folder / "out.zarr").add_adatas(
                    [str(source)], rng=0, progress=False
                )
            assert any("nothing was written" in str(w.message) for w in caught)
            reruns.append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'build':<34}{'median s':>10}  runs")
    for key in ("without", "with"):
        runs = ", ".join(f"{t:.2f}" for t in times[key])
        print(f"{key + ' content fingerprints':<34}{median[key]:>10.2f}  {runs}")
    extra = median["with"] - median["without"]
    print(f"cost: {extra:+.2f} s ({extra / median['without']:+.1%})")
    runs = ", ".join(f"{t:.2f}" for t in reruns)
    print(f"{'rerun, already built (reads all)':<34}{statistics.median(reruns):>10.2f}  {runs}")


if __name__ == "__main__":
    main()
