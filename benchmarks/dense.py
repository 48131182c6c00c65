"""Dense output (issue 28 item 2): rows/s of dense torch batches made by ``Loader(dense=True)``,
against the sparse batches and against densifying them in the loop with ``Tensor.to_dense()``.

Generates (once, cached in ``--dir``) a zarr store of UMI-like counts (``benchmarks/_umi.py``,
drawn in blocks of 20,000 rows, each with its own seed and gene means, like one donor each:
``--n-obs`` x ``--n-var`` float32 CSR, about ``--nnz`` nonzeros per row), then, for each batch
size, runs each mode in a fresh process, alternating the modes within each of ``--runs``
runs:

``sparse``
    ``Loader(to="torch")``: sparse CSR tensors, as they come.
``to_dense``
    the same, then ``batch["X"].to_dense()`` in the loop, at torch's default thread count.
``to_dense, 1 thread``
    the same with ``torch.set_num_threads(1)`` (only with ``--one-thread``).
``dense=True``
    ``Loader(to="torch", dense=True)``: dense tensors made on the read threads.

Every run shuffles (chunk ``--chunk``, ``--preload`` chunks per window, a seed per run shared
by the modes) and takes batches until ``--max-rows`` rows; rows/s is measured from the first
batch to the last (steady state: the first window's read, the same for every mode, is left
out). The table gives medians with min-max, each mode's speed relative to ``sparse`` and to
``to_dense``, and the CPU time (user + system, all threads of the process) per row: on a
machine shared with other work rows/s depends on what else runs, CPU time per row much less.
Subprocesses inherit the environment, PYTHONPATH included: run it with the
annbatch to measure.

Usage: python benchmarks/dense.py [--n-obs 200000] [--n-var 2000] [--nnz 1500] [--runs 3]
       [--batch-sizes 256,4096] [--max-rows 131072] [--one-thread] [--dir data/bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _umi import umi_counts
from bench import run_child

CHILD = r"""
import json, resource, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, torch, zarr, anndata as ad
args = json.loads(sys.argv[1])
if args["one_thread"]:
    torch.set_num_threads(1)
import annbatch
x = ad.io.sparse_dataset(zarr.open_group(args["path"], mode="r")["X"])
loader = annbatch.Loader(
    batch_size=args["batch"], chunk_size=args["chunk"], preload_nchunks=args["preload"],
    shuffle=True, rng=np.random.default_rng(args["seed"]), to="torch", dense=args["dense"],
).add_dataset(x)
to_dense = args["to_dense"]
rows, first, t0 = 0, None, time.perf_counter()
for batch in loader:
    X = batch["X"]
    if to_dense:
        X = X.to_dense()
    if first is None:  # steady state from here on
        first, t0, r0 = X.shape[0], time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    rows += X.shape[0]
    if rows >= args["max_rows"]:
        break
seconds, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(json.dumps({"rows": rows - first, "seconds": seconds, "cpu_s": cpu,
                  "threads": torch.get_num_threads(), "layout": str(X.layout), "dtype": str(X.dtype)}))
"""

MODES = {  # name -> (dense=, to_dense in the loop, one torch thread)
    "sparse": (False, False, False),
    "to_dense": (False, True, False),
    "to_dense, 1 thread": (False, True, True),
    "dense=True": (True, False, False),
}


def make_store(root: Path, n_obs: int, n_var: int, nnz: int, seed: int) -> Path:
    """A zarr v3 store of UMI-like counts (CSR, float32), written in blocks; cached."""
    import anndata as ad
    import zarr

    path = root / f"umi_{n_obs}x{n_var}_{nnz}.zarr"
    if (path / "done").exists():
        return path
    print(f"writing {path} ...", file=sys.stderr)
    ad.settings.zarr_write_format = 3
    group = zarr.open_group(path, mode="w")
    block = 20_000
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lo in range(0, n_obs, block):
            part = umi_counts(min(block, n_obs - lo), n_var, detected=nnz, seed=seed + lo)
            if lo == 0:
                kwargs = {"chunks": (131_072,), "shards": (4_194_304,)}
                ad.io.write_elem(group, "X", part, dataset_kwargs=kwargs)
            else:
                ad.io.sparse_dataset(group["X"]).append(part)
    (path / "done").touch()
    print(f"written in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/bench"))
    p.add_argument("--n-obs", type=int, default=200_000)
    p.add_argument("--n-var", type=int, default=2_000)
    p.add_argument("--nnz", type=int, default=1_500, help="about this many nonzeros per row")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--preload", type=int, default=64)
    p.add_argument("--batch-sizes", default="256,4096")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-rows", type=int, default=131_072, help="rows per run")
    p.add_argument("--one-thread", action="store_true", help="also to_dense with 1 torch thread")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    path = make_store(a.dir, a.n_obs, a.n_var, a.nnz, a.seed)
    modes = {k: v for k, v in MODES.items() if a.one_thread or k != "to_dense, 1 thread"}
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    rates: dict[tuple[int, str], list[float]] = {}
    cpu: dict[tuple[int, str], list[float]] = {}
    threads = None
    for batch in batch_sizes:
        for run in range(a.runs):  # alternate the modes within each run
            for name, (dense, to_dense, one_thread) in modes.items():
                args = {
                    "path": str(path),
                    "batch": batch,
                    "chunk": a.chunk,
                    "preload": a.preload,
                    "seed": a.seed + run,
                    "max_rows": a.max_rows,
                    "dense": dense,
                    "to_dense": to_dense,
                    "one_thread": one_thread,
                }
                out = run_child(sys.executable, args, child=CHILD)
                if not one_thread:
                    threads = out["threads"]
                want = "torch.sparse_csr" if name == "sparse" else "torch.strided"
                if (out["layout"], out["dtype"]) != (want, "torch.float32"):
                    msg = f"{name} yielded {out['layout']} {out['dtype']}; expected {want} float32"
                    raise RuntimeError(msg)
                rates.setdefault((batch, name), []).append(out["rows"] / out["seconds"])
                cpu.setdefault((batch, name), []).append(out["cpu_s"] / out["rows"] * 1e6)
    print(
        f"store: {a.n_obs:,} x {a.n_var:,} UMI-like float32 CSR (~{a.nnz:,} nonzeros per row); "
        f"chunk {a.chunk}, preload {a.preload}, shuffled; {a.max_rows:,} rows per run, "
        f"{a.runs} runs, fresh processes; torch's default threads here: {threads}\n"
    )
    print("| batch | mode | rows/s median (min-max) | / sparse | / to_dense | CPU µs/row |")
    print("|---|---|---|---|---|---|")
    for batch in batch_sizes:
        sparse = statistics.median(rates[batch, "sparse"])
        to_dense = statistics.median(rates[batch, "to_dense"])
        for name in modes:
            speeds = sorted(rates[batch, name])
            med = statistics.median(speeds)
            print(
                f"| {batch} | {name} | {med:,.0f} ({speeds[0]:,.0f}-{speeds[-1]:,.0f}) "
                f"| {med / sparse:.2f} | {med / to_dense:.1f} "
                f"| {statistics.median(cpu[batch, name]):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
