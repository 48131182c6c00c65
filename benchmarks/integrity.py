"""What the read path's integrity checks cost.

1. The ``indptr`` check when a CSR dataset is added (:func:`annbatch._core.validate.
   check_indptr`), at --indptr-rows rows (default 10M): ms, and ms per million rows.
2. The column-index range check of a window (:func:`annbatch._core.validate.check_indices`),
   against the time of reading that window with the Loader's chunk reader, on a sparse store
   (bench.py's, or one written here) at chunk 256 / preload 64 and chunk 32 / preload 512.
3. ``verify_checksums=True`` against the default on our uncompressed collection
   (collection_vs_reference.py's, built from its inputs if missing): rows/s of whole shuffled
   epochs at chunk 256 / 64 and 32 / 512, alternating, a fresh process per run.

Usage: python benchmarks/integrity.py [--runs 5] [--sparse PATH] [--collection PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import BATCH, run_child

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, annbatch
args = json.loads(sys.argv[1])
loader = annbatch.Loader(batch_size=args["batch"], chunk_size=args["chunk"], preload_nchunks=args["preload"],
                         shuffle=True, rng=np.random.default_rng(0), to=None,
                         verify_checksums=args["verify"])
loader.use_collection(annbatch.DatasetCollection(args["path"]))
base = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]
t0 = time.perf_counter(); first = None; rows = 0
for batch in loader:
    if first is None:
        first = time.perf_counter() - t0
    rows += batch["X"].shape[0]
dt = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"rows": rows, "seconds": dt, "first_s": first, "rss_mb": int(hwm) / 1024,
                  "base_mb": int(base) / 1024}))
"""


def indptr_cost(n_rows: int) -> None:
    from annbatch._core.validate import check_indptr

    rng = np.random.default_rng(0)
    indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 3000, n_rows))]).astype(np.int64)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        check_indptr(indptr, n_obs=n_rows, nnz=int(indptr[-1]), exact=True, where="bench")
        times.append(time.perf_counter() - t0)
    ms = 1000 * statistics.median(times)
    print(
        f"| indptr check, {n_rows:,} rows | {ms:.1f} ms | {ms / (n_rows / 1e6):.2f} ms per million rows |"
    )


def window_check_cost(path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import anndata as ad
    import zarr

    from annbatch import ChunkSampler
    from annbatch._core.epoch import read_threads
    from annbatch._core.planner import dataset_offsets, plan_reads
    from annbatch._core.reader import read_plan
    from annbatch._core.sources import as_row_source
    from annbatch._core.validate import check_indices

    source = as_row_source(
        ad.io.sparse_dataset(zarr.open_group(path, mode="r")["X"]), where="bench"
    )
    offsets = dataset_offsets([source.shape[0]])
    threads = read_threads()
    for chunk, preload in ((256, 64), (32, 512)):
        sampler = ChunkSampler(chunk, preload, BATCH, shuffle=True, rng=np.random.default_rng(0))
        reads, checks = [], []
        with ThreadPoolExecutor(threads) as executor:
            for i, request in enumerate(sampler.sample(source.shape[0])):
                if i == 3:
                    break
                plan = plan_reads(request["requests"], offsets, [None])
                t0 = time.perf_counter()
                (block,) = read_plan(plan, [source], executor, threads)
                reads.append(time.perf_counter() - t0)  # includes one check of the indices
                t0 = time.perf_counter()
                check_indices(block.indices, n_var=source.shape[1], where="bench")
                checks.append(time.perf_counter() - t0)
        read, check = statistics.median(reads), statistics.median(checks)
        print(
            f"| index check of a window, chunk {chunk} / {preload} ({block.nnz:,} entries) "
            f"| {1000 * check:.1f} ms | {100 * check / read:.1f}% of reading the window ({1000 * read:.0f} ms) |"
        )


def verify_cost(path: Path, runs: int) -> None:
    print("\n| chunk / preload | verify_checksums | rows/s median (min-max) | first batch s |")
    print("|---|---|---|---|")
    for chunk, preload in ((256, 64), (32, 512)):
        results: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(runs):
            for verify in (False, True):
                args = {
                    "path": str(path),
                    "batch": BATCH,
                    "chunk": chunk,
                    "preload": preload,
                    "verify": verify,
                }
                results[verify].append(run_child(sys.executable, args, child=CHILD))
        base = statistics.median(r["rows"] / r["seconds"] for r in results[False])
        for verify, rs in results.items():
            speeds = sorted(r["rows"] / r["seconds"] for r in rs)
            med = statistics.median(speeds)
            print(
                f"| {chunk} / {preload} | {verify} | {med:,.0f} ({speeds[0]:,.0f}-{speeds[-1]:,.0f}) ({med / base:.2f}x) "
                f"| {statistics.median(r['first_s'] for r in rs):.2f} |",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--indptr-rows", type=int, default=10_000_000)
    p.add_argument("--sparse", type=Path, default=Path("data/bench/sparse_200000x20000_1500.zarr"))
    p.add_argument(
        "--collection", type=Path, default=Path("data/collections/ours_4x50000_5000_400_none.zarr")
    )
    a = p.parse_args()
    print("| check | time | relative |")
    print("|---|---|---|")
    indptr_cost(a.indptr_rows)
    if a.sparse.exists():
        window_check_cost(a.sparse)
    else:
        print(f"(no sparse store at {a.sparse}: run benchmarks/bench.py first)")
    if a.collection.exists():
        verify_cost(a.collection, a.runs)
    else:
        print(f"(no collection at {a.collection}: run benchmarks/collection_vs_reference.py first)")


if __name__ == "__main__":
    main()
