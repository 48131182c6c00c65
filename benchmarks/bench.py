"""Read-engine benchmark: rows/s of the Loader against the decode bound (and the reference).

Generates seeded stores like the read-engine issue describes (sizes configurable), then for
each setting prints one table row: rows/s (median and spread of --runs runs, each in a fresh
process), time to first batch, peak RSS, and the physical bound of that setting:
(rows yielded / rows decoded, from the store's chunk grid) x (rate of decoding all of X in
order). With --reference-python (an interpreter that has annbatch==0.3.1 and zarrs), the
reference loader runs on the same store in the same run, alternating with ours.

The decode limit is measured with every in-order decoder available in this interpreter
(zarr-python, zarrs if installed: `pip install --group bench`, and annbatch's direct chunk
reader), and the bound uses the fastest.

Usage: python benchmarks/bench.py [--n-obs 200000] [--n-var 20000] [--nnz 1500] [--runs 3]
       [--reference-python /path/to/venv/bin/python] [--hold-ms 20] [--max-rows 49152]
       [--baseline-src /path/to/other/checkout/src]

With --baseline-src, annbatch from that source tree (an earlier commit, e.g. a `git worktree`)
runs too, alternating with ours: a before/after measurement in one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

SETTINGS = [  # (store, chunk_size, preload_nchunks)
    ("sparse", 256, 64),
    ("sparse", 32, 512),
    ("sparse", 1, 16384),
    ("dense", 256, 64),
    ("dense", 32, 512),
]
BATCH = 4096

# Run in a child process, so that peak RSS belongs to one measurement. Works for both our
# Loader and the reference (annbatch 0.3.1), which share the documented API.
CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, zarr, anndata as ad
args = json.loads(sys.argv[1])
if args.get("zarrs"):
    import zarrs  # noqa: F401
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
import annbatch
import inspect
# numpy/scipy output: to=None (0.3.1 and ours now); our releases before to= meant "unset"
# by None spelled it to_torch=False.
params = inspect.signature(annbatch.Loader).parameters
if "to" in params and params["to"].default is not None:
    out = {"to": None}
else:
    out = {"to_torch": False} if "to_torch" in params else {}
sampler = args.get("sampler")
if sampler:  # one of our samplers, built explicitly (same engine; speed should not depend on it)
    import pandas as pd
    from annbatch import samplers as S
    x = zarr.open_group(args["path"], mode="r")["X"]
    n = x.attrs["shape"][0] if isinstance(x, zarr.Group) else x.shape[0]
    c, p, b, r = args["chunk"], args["preload"], args["batch"], np.random.default_rng(0)
    classes = pd.Categorical(np.arange(n) * 4 // n)  # four classes in long runs, as with groupby
    s = {
        "chunk": lambda: S.ChunkSampler(c, p, b, shuffle=True, rng=r),
        "random": lambda: S.RandomSampler(c, p, b, rng=r),
        "distributed": lambda: S.DistributedSampler(S.RandomSampler(c, p, b, rng=r), dist_info=lambda: (0, 1)),
        "class": lambda: S.ClassSampler(c, p, b, classes=classes, num_samples=n, rng=r),
        "weighted-class": lambda: S.WeightedClassSampler(c, p, b, classes=classes, num_samples=n, rng=r),
    }[sampler]()
    loader = annbatch.Loader(batch_sampler=s, **out)
else:
    loader = annbatch.Loader(batch_size=args["batch"], chunk_size=args["chunk"], preload_nchunks=args["preload"],
                             shuffle=args["shuffle"], rng=np.random.default_rng(0), **out)
if args.get("collection"):  # a DatasetCollection (ours, or the reference's own)
    try:
        collection = annbatch.DatasetCollection(args["path"], mode="r")
    except TypeError:
        collection = annbatch.DatasetCollection(args["path"])
    loader.use_collection(collection)
else:
    g = zarr.open_group(args["path"], mode="r")
    x = g["X"]
    loader.add_dataset(ad.io.sparse_dataset(x) if isinstance(x, zarr.Group) else x)
hold = args["hold_s"]
base = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]
t0 = time.perf_counter(); first = None; rows = 0; check = 0.0
for batch in loader:
    X = batch["X"]
    if first is None:
        first = time.perf_counter() - t0
    rows += X.shape[0]
    if args["checksum"]:
        check += float(X.sum())
    if hold:
        time.sleep(hold)  # a training step that releases the GIL
    dt = time.perf_counter() - t0  # up to the last batch used: stopping early (below) makes a
    if rows >= args["max_rows"]:  # loader drop read-ahead work, which is not throughput
        break
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"rows": rows, "seconds": dt, "first_s": first, "checksum": check, "rss_mb": int(hwm) / 1024,
                  "base_mb": int(base) / 1024}))
"""


def make_stores(
    root: Path, n_obs: int, n_var: int, nnz: int, dense_var: int, seed: int, writer: str = "anndata"
) -> dict[str, Path]:
    import anndata as ad
    import scipy.sparse as sp
    import zarr

    ad.settings.zarr_write_format = 3
    tag = "" if writer == "anndata" else "_write_sharded"
    paths = {
        "sparse": root / f"sparse_{n_obs}x{n_var}_{nnz}{tag}.zarr",
        "dense": root / f"dense_{n_obs}x{dense_var}{tag}.zarr",
    }
    rng = np.random.default_rng(seed)
    if not paths["sparse"].exists():
        print(f"writing {paths['sparse']} ...", file=sys.stderr)
        group = zarr.open_group(paths["sparse"], mode="w")
        indptr = np.arange(n_obs + 1, dtype=np.int64) * nnz
        indices = np.sort(rng.integers(0, n_var, size=(n_obs, nnz), dtype=np.int32), axis=1).ravel()
        data = rng.poisson(2.0, size=n_obs * nnz).astype(np.float32) + 1
        x = sp.csr_matrix((data, indices, indptr), shape=(n_obs, n_var))
        x.sum_duplicates()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if writer == "write_sharded":  # with the reference's defaults: 64 rows per chunk, LZ4
                from annbatch import write_sharded

                write_sharded(group, ad.AnnData(X=x))
            else:
                ad.io.write_elem(
                    group, "X", x, dataset_kwargs={"chunks": (131_072,), "shards": (4_194_304,)}
                )
    if not paths["dense"].exists():
        print(f"writing {paths['dense']} ...", file=sys.stderr)
        group = zarr.open_group(paths["dense"], mode="w")
        x = rng.poisson(0.5, size=(n_obs, dense_var)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if writer == "write_sharded":
                from annbatch import write_sharded

                write_sharded(group, ad.AnnData(X=x))
            else:
                ad.io.write_elem(
                    group,
                    "X",
                    x,
                    dataset_kwargs={"chunks": (256, dense_var), "shards": (8192, dense_var)},
                )
    return paths


DECODE = r"""
import json, sys, time
import numpy as np, zarr
path, how = sys.argv[1], sys.argv[2]
if how == "zarrs":
    import zarrs  # noqa: F401
    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
g = zarr.open_group(path, mode="r")
names = ["X/data", "X/indices"] if isinstance(g["X"], zarr.Group) else ["X"]
n_obs = g["X/indptr"].shape[0] - 1 if len(names) == 2 else g["X"].shape[0]
best = 0.0
for _ in range(2):
    t0 = time.perf_counter()
    for name in names:
        a = g[name]
        if how == "direct":  # annbatch's own chunk reader, the whole array as one range
            from concurrent.futures import ThreadPoolExecutor
            from annbatch._core.chunks import direct_array
            from annbatch._core.reader import TASKS_PER_THREAD
            from annbatch._loader import read_threads
            d = direct_array(a)
            out = np.empty(a.shape, a.dtype)
            with ThreadPoolExecutor(read_threads()) as ex:
                tasks = d.tasks(np.array([0]), np.array([a.shape[0]]), out, TASKS_PER_THREAD * read_threads())
                [f.result() for f in [ex.submit(t) for t in tasks]]
        else:
            a[:]
    best = max(best, n_obs / (time.perf_counter() - t0))
print(json.dumps(best))
"""


def decode_rates(path: Path) -> dict[str, float]:
    """Rows/s of decoding all of X in order, whole arrays, by each decoder available here:
    zarr-python's codec pipeline, zarrs' (if installed), and annbatch's direct chunk reader."""
    rates = {}
    for how in ("zarr-python", "zarrs", "direct"):
        if how == "zarrs" and importlib.util.find_spec("zarrs") is None:
            continue
        out = subprocess.run(
            [sys.executable, "-c", DECODE, str(path), how],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            raise RuntimeError(f"decoding {path} with {how} failed:\n{out.stderr[-3000:]}")
        rates[how] = json.loads(out.stdout)
    return rates


def decoded_fraction(path: Path, chunk: int, preload: int) -> float:
    """Rows yielded / rows decoded for one shuffled epoch, from the store's chunk grid."""
    import zarr

    from annbatch import ChunkSampler

    g = zarr.open_group(path, mode="r")
    sparse = isinstance(g["X"], zarr.Group)
    if sparse:
        indptr = g["X/indptr"][:]
        n_obs, elems = indptr.size - 1, g["X/data"].chunks[0]
        total = int(indptr[-1])
    else:
        n_obs, rows = g["X"].shape[0], g["X"].chunks[0]
    sampler = ChunkSampler(chunk, preload, BATCH, shuffle=True, rng=np.random.default_rng(0))
    decoded = 0
    for request in sampler.sample(n_obs):
        touched: set[int] = set()
        for c in request["requests"]:
            if sparse:
                lo, hi = int(indptr[c.start]), int(indptr[c.stop])
                if hi > lo:
                    touched.update(range(lo // elems, (hi - 1) // elems + 1))
            else:
                touched.update(range(c.start // rows, (c.stop - 1) // rows + 1))
        if sparse:
            decoded += sum(min(elems, total - t * elems) for t in touched) / total * n_obs
        else:
            decoded += sum(min(rows, n_obs - t * rows) for t in touched)
    return n_obs / decoded


def run_child(
    python: str, args: dict, *, child: str = CHILD, pythonpath: str | None = None
) -> dict:
    """Run ``child`` with ``args`` (as JSON) in a fresh ``python``; return the JSON it printed last.

    ``pythonpath`` replaces PYTHONPATH; without it, another interpreter gets none, so that it
    never imports our annbatch.
    """
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    elif python != sys.executable:
        env.pop("PYTHONPATH", None)
    out = subprocess.run(
        [python, "-c", child, json.dumps(args)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if out.returncode:
        raise RuntimeError(f"{python} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def size_mb(path: Path) -> float:
    """Size on disk of every file under ``path``, in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/bench"))
    p.add_argument("--n-obs", type=int, default=200_000)
    p.add_argument("--n-var", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=1_500, help="nonzeros per row of the sparse store")
    p.add_argument("--dense-var", type=int, default=2_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-rows", type=int, default=10**9, help="stop each run after this many rows")
    p.add_argument(
        "--hold-ms",
        type=float,
        default=0.0,
        help="consumer holds each batch this long (GIL released)",
    )
    p.add_argument(
        "--reference-python", help="interpreter with annbatch==0.3.1 and zarrs installed"
    )
    p.add_argument(
        "--settings", default="all", help="comma-separated indices into SETTINGS, or 'all'"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-checksum", action="store_true", help="skip the same-rows check (shuffle=False)"
    )
    p.add_argument(
        "--baseline-src", help="src folder of another annbatch checkout, run as a third loader"
    )
    p.add_argument(
        "--writer",
        choices=["anndata", "write_sharded"],
        default="anndata",
        help="write the stores with anndata (our chunking) or annbatch.write_sharded (reference defaults)",
    )
    p.add_argument(
        "--samplers",
        default="",
        help="comma-separated: also run ours with these samplers "
        "(chunk, random, distributed, class, weighted-class), alternating with the others",
    )
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    paths = make_stores(a.dir, a.n_obs, a.n_var, a.nnz, a.dense_var, a.seed, a.writer)
    all_rates = {kind: decode_rates(path) for kind, path in paths.items()}
    rates = {kind: max(r.values()) for kind, r in all_rates.items()}
    chosen = SETTINGS if a.settings == "all" else [SETTINGS[int(i)] for i in a.settings.split(",")]
    # name -> (interpreter, zarrs pipeline, PYTHONPATH)
    loaders: dict[str, tuple[str, bool, str | None, str | None]] = {
        "annbatch (ours)": (sys.executable, False, None, None)
    }
    for sampler in filter(None, a.samplers.split(",")):
        loaders[f"annbatch, {sampler} sampler"] = (sys.executable, False, None, sampler)
    if a.baseline_src:
        loaders["annbatch (baseline)"] = (sys.executable, False, a.baseline_src, None)
    if a.reference_python:
        loaders["reference 0.3.1 + zarrs"] = (a.reference_python, True, None, None)
    print(
        f"stores: sparse {a.n_obs:,} x {a.n_var:,} ({a.nnz} nnz/row), dense {a.n_obs:,} x {a.dense_var:,}; "
        f"batch {BATCH}, shuffled, {a.runs} runs, hold {a.hold_ms} ms/batch"
    )
    for kind, r in all_rates.items():
        listed = ", ".join(f"{how} {rate:,.0f}" for how, rate in r.items())
        print(f"decode all X in order, {kind} (rows/s): {listed}; bound uses the fastest")
    print(
        "\n| store | chunk / preload | loader | rows/s median (min-max) | % of bound | bound "
        "| first batch s | peak RSS MB (above start) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, chunk, preload in chosen:
        bound = rates[kind] * decoded_fraction(paths[kind], chunk, preload)
        results: dict[str, list[dict]] = {name: [] for name in loaders}
        for _ in range(a.runs):  # alternate loaders within each run
            for name, (python, zarrs, pythonpath, sampler) in loaders.items():
                args = {
                    "path": str(paths[kind]),
                    "batch": BATCH,
                    "chunk": chunk,
                    "preload": preload,
                    "shuffle": True,
                    "hold_s": a.hold_ms / 1000,
                    "max_rows": a.max_rows,
                    "checksum": False,
                    "zarrs": zarrs,
                    "sampler": sampler,
                }
                results[name].append(run_child(python, args, pythonpath=pythonpath))
        for name, runs in results.items():
            speeds = sorted(r["rows"] / r["seconds"] for r in runs)
            med = statistics.median(speeds)
            first = statistics.median(r["first_s"] for r in runs)
            rss = max(r["rss_mb"] for r in runs)
            above = max(r["rss_mb"] - r["base_mb"] for r in runs)
            print(
                f"| {kind} | {chunk} / {preload} | {name} | {med:,.0f} ({speeds[0]:,.0f}-{speeds[-1]:,.0f}) "
                f"| {100 * med / bound:.0f}% | {bound:,.0f} | {first:.2f} | {rss:,.0f} ({above:,.0f}) |",
                flush=True,
            )
    if a.reference_python and not a.no_checksum:  # same rows out of both loaders, unshuffled
        for kind, path in paths.items():
            sums = {}
            for name, (python, zarrs, pythonpath, sampler) in loaders.items():
                if sampler:
                    continue
                args = {
                    "path": str(path),
                    "batch": BATCH,
                    "chunk": 256,
                    "preload": 64,
                    "shuffle": False,
                    "hold_s": 0,
                    "max_rows": 10**9,
                    "checksum": True,
                    "zarrs": zarrs,
                }
                sums[name] = run_child(python, args, pythonpath=pythonpath)["checksum"]
            print(f"\nchecksum ({kind}, shuffle=False): {sums}")


if __name__ == "__main__":
    main()
