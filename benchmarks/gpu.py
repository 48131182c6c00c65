"""GPU benchmark: rows/s delivered to the GPU as dense torch tensors.

For each setting and each mode, a fresh process iterates one shuffled epoch (or --max-rows)
and ends every batch as a dense CUDA tensor (sparse batches are densified on the GPU):

``ours-gpu``
    our Loader with ``preload_to_gpu=True, to="torch"``: windows are copied to the GPU
    once and batches are cut there.
``ours-cpu``
    our Loader on the CPU (``to="torch"``), each batch then copied to the GPU.
``ref-gpu`` / ``ref-cpu``
    the same with the reference loader (annbatch 0.3.1 with the zarrs codec pipeline), when
    ``--reference-path`` names a folder where it is installed (it is put first on PYTHONPATH
    of those runs instead of our ``src``).

Runs alternate between modes; the table gives the median and spread of --runs runs, time to
the first batch on the GPU, and peak GPU memory of torch's allocator plus CuPy's pool.
Stores are generated as in ``bench.py`` (seeded, sizes configurable).

Usage: python benchmarks/gpu.py [--n-obs 100000] [--runs 3] [--reference-path DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import make_stores, run_child

SETTINGS = [("sparse", 256, 64), ("sparse", 32, 512), ("dense", 256, 64)]
BATCH = 4096
SRC = Path(__file__).resolve().parent.parent / "src"

CHILD = r"""
import json, sys, time, warnings, inspect
warnings.simplefilter("ignore")
args = json.loads(sys.argv[1])
import numpy as np, zarr, anndata as ad, torch
if args["zarrs"]:
    import zarrs  # noqa: F401
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
import annbatch
params = inspect.signature(annbatch.Loader).parameters
out = {"to": "torch"} if "to" in params else {"to_torch": True}
loader = annbatch.Loader(batch_size=args["batch"], chunk_size=args["chunk"], preload_nchunks=args["preload"],
                         shuffle=True, rng=np.random.default_rng(0), preload_to_gpu=args["gpu"], **out)
x = zarr.open_group(args["path"], mode="r")["X"]
loader.add_dataset(ad.io.sparse_dataset(x) if isinstance(x, zarr.Group) else x)
device = torch.device(args["device"])
if device.type == "cuda":
    import cupy
    sync = torch.cuda.synchronize
    pool = cupy.get_default_memory_pool()
else:
    sync = lambda: None
    pool = None
sync()
t0 = time.perf_counter(); first = None; rows = 0; peak_pool = 0
batches = (batch for _ in range(args["epochs"]) for batch in loader)
for batch in batches:
    X = batch["X"]
    if X.device != device:
        X = X.to(device, non_blocking=True)
    if X.layout == torch.sparse_csr:
        X = X.to_dense()
    rows += X.shape[0]
    if first is None:
        sync(); first = time.perf_counter() - t0
    if pool is not None:
        peak_pool = max(peak_pool, pool.total_bytes())
    if rows >= args["max_rows"]:
        break
sync(); dt = time.perf_counter() - t0
torch_peak = torch.cuda.max_memory_reserved() if device.type == "cuda" else 0
print(json.dumps({"rows": rows, "seconds": dt, "first_s": first, "gpu_mb": (torch_peak + peak_pool) / 2**20}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/bench"))
    p.add_argument("--n-obs", type=int, default=100_000)
    p.add_argument("--n-var", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=1_500)
    p.add_argument("--dense-var", type=int, default=2_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-rows", type=int, default=10**9)
    p.add_argument(
        "--epochs", type=int, default=1, help="epochs per process (rows/s over all of them)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="ours-gpu,ours-cpu,ref-gpu,ref-cpu")
    p.add_argument(
        "--reference-path", help="a folder holding annbatch==0.3.1 (and zarrs) to put on PYTHONPATH"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    a.dir.mkdir(parents=True, exist_ok=True)
    paths = make_stores(a.dir, a.n_obs, a.n_var, a.nnz, a.dense_var, a.seed)
    base = [
        x
        for x in os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if x and Path(x).resolve() != SRC
    ]
    modes = [m for m in a.modes.split(",") if a.reference_path or not m.startswith("ref")]
    paths_of = {
        "ours": os.pathsep.join([str(SRC), *base]),
        "ref": os.pathsep.join([a.reference_path or "", *base]),
    }
    print(
        f"machine: {os.cpu_count()} CPUs, device {a.device}; batch {BATCH}; shuffled; rows/s to dense tensors on the device"
    )
    print(
        "| store | chunk / preload | mode | rows/s median | spread | first batch s | peak GPU MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for store, chunk, preload in SETTINGS:
        results: dict[str, list[dict]] = {m: [] for m in modes}
        errors: dict[str, str] = {}
        for _ in range(a.runs):
            for mode in modes:
                if mode in errors:
                    continue
                who, where = mode.split("-")
                args = {
                    "path": str(paths[store]),
                    "batch": BATCH,
                    "chunk": chunk,
                    "preload": preload,
                    "gpu": where == "gpu",
                    "zarrs": who == "ref",
                    "device": a.device,
                    "max_rows": a.max_rows,
                    "epochs": a.epochs,
                }
                try:
                    results[mode].append(
                        run_child(sys.executable, args, child=CHILD, pythonpath=paths_of[who])
                    )
                except RuntimeError as e:
                    errors[mode] = str(e).strip().splitlines()[-1]
        for mode in modes:
            if mode in errors:
                print(f"| {store} | {chunk} / {preload} | {mode} | failed: {errors[mode]} | | | |")
                continue
            rates = [r["rows"] / r["seconds"] for r in results[mode]]
            print(
                f"| {store} | {chunk} / {preload} | {mode} | {statistics.median(rates):,.0f} | "
                f"{min(rates):,.0f}-{max(rates):,.0f} | {statistics.median(r['first_s'] for r in results[mode]):.2f} | "
                f"{max(r['gpu_mb'] for r in results[mode]):,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
