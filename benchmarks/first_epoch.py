"""The first epoch of a fresh process against its later epochs (issue 28, item 3).

Each run is a fresh process that opens the data, iterates ``--epochs`` shuffled epochs
(``set_epoch`` between them) and reports rows/s per epoch; the table gives each run's epochs
and the ratio of the first to the median of the later ones. Inputs: bench.py's sparse store
(an anndata zarr store, 200,000 x 20,000 float32, 1,500 nonzeros per row, 131,072-entry
chunks; written on first use) read with ``add_dataset``, and a collection built from it with
this package's defaults (``DatasetCollection.add_adatas``) read with ``use_collection``.

With ``--baseline-src`` (the ``src`` folder of another checkout, e.g. a ``git worktree`` of an
earlier commit; repeatable), that annbatch runs too, alternating with this one run by run.

Usage: python benchmarks/first_epoch.py [--n-obs 200000] [--epochs 3] [--runs 3]
       [--inputs store,collection] [--chunk 256] [--preload 64] [--batch 4096]
       [--baseline-src /path/to/checkout/src]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import make_stores, run_child

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np
args = json.loads(sys.argv[1])
import annbatch
loader = annbatch.Loader(batch_size=args["batch"], chunk_size=args["chunk"],
                         preload_nchunks=args["preload"], shuffle=True,
                         rng=np.random.default_rng(0), to=args["to"])
if args["input"] == "collection":
    loader.use_collection(annbatch.DatasetCollection(args["path"], mode="r"))
else:
    import anndata as ad, zarr
    loader.add_dataset(ad.io.sparse_dataset(zarr.open_group(args["path"], mode="r")["X"]))
rates = []
for epoch in range(args["epochs"]):
    loader.set_epoch(epoch)
    rows = 0
    t0 = time.perf_counter()
    for batch in loader:
        rows += batch["X"].shape[0]
    rates.append(rows / (time.perf_counter() - t0))
print(json.dumps(rates))
"""


def build_collection(store: Path, out: Path) -> Path:
    """A collection of ``store`` built with this package's defaults (once)."""
    if not (out / "zarr.json").exists():
        import anndata as ad
        import pandas as pd
        import zarr

        import annbatch

        print(f"building {out} ...", file=sys.stderr)
        x = ad.io.read_elem(zarr.open_group(store, mode="r")["X"])  # the store holds only X
        adata = ad.AnnData(
            X=x,
            obs=pd.DataFrame(index=[f"c{i}" for i in range(x.shape[0])]),
            var=pd.DataFrame(index=[f"g{j}" for j in range(x.shape[1])]),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            annbatch.DatasetCollection(out, mode="w").add_adatas([adata], progress=False)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/bench"))
    p.add_argument("--n-obs", type=int, default=200_000)
    p.add_argument("--n-var", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=1_500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--inputs", default="store,collection")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--preload", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--to", default="torch", help="the Loader's to= (torch, numpy)")
    p.add_argument(
        "--baseline-src",
        action="append",
        default=[],
        help="src folder of another annbatch checkout (repeat for several; named by the "
        "checkout's folder)",
    )
    a = p.parse_args()
    if a.epochs < 2:
        p.error("--epochs must be at least 2: the first epoch is compared to the later ones")
    a.dir.mkdir(parents=True, exist_ok=True)
    store = make_stores(a.dir, a.n_obs, a.n_var, a.nnz, 2_000, 0)["sparse"]
    paths = {"store": store}
    if "collection" in a.inputs:
        paths["collection"] = build_collection(store, a.dir / f"{store.stem}_collection.zarr")
    variants: dict[str, str | None] = {"ours": None}
    for other in a.baseline_src:
        variants[Path(other).resolve().parent.name] = other
    src = str(Path(__file__).resolve().parents[1] / "src")
    results: dict[tuple[str, str], list[list[float]]] = {}
    for run in range(a.runs):
        for kind in a.inputs.split(","):
            for name, pythonpath in variants.items():
                args = {
                    "input": kind,
                    "path": str(paths[kind]),
                    "epochs": a.epochs,
                    "chunk": a.chunk,
                    "preload": a.preload,
                    "batch": a.batch,
                    "to": a.to,
                }
                rates = run_child(sys.executable, args, child=CHILD, pythonpath=pythonpath or src)
                results.setdefault((kind, name), []).append(rates)
                print(f"run {run + 1} {kind} {name}: {[round(r) for r in rates]}", file=sys.stderr)
    print(
        f"\n{a.n_obs:,} x {a.n_var:,}, {a.nnz:,} nonzeros per row; chunk {a.chunk}, preload "
        f"{a.preload}, batch {a.batch}, to={a.to}; {a.runs} runs, fresh processes, alternating\n"
    )
    head = " | ".join(f"epoch {e + 1}" for e in range(a.epochs))
    print(f"| input | annbatch | run | {head} | first / median of later |")
    print("|---|---|---|" + "---|" * a.epochs + "---|")
    for (kind, name), runs in results.items():
        for i, rates in enumerate(runs):
            ratio = rates[0] / statistics.median(rates[1:])
            cells = " | ".join(f"{r:,.0f}" for r in rates)
            print(f"| {kind} | {name} | {i + 1} | {cells} | {ratio:.2f} |")
    print()
    for (kind, name), runs in results.items():
        ratios = [r[0] / statistics.median(r[1:]) for r in runs]
        firsts = [r[0] for r in runs]
        later = [statistics.median(r[1:]) for r in runs]
        print(
            f"{kind} / {name}: first / later median {statistics.median(ratios):.2f}; "
            f"first epoch median {statistics.median(firsts):,.0f} rows/s, later "
            f"{statistics.median(later):,.0f}"
        )
    print(json.dumps({f"{k}/{n}": v for (k, n), v in results.items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
