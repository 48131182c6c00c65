"""Atlas scale (issue 27): what opening and streaming a collection costs at 20M+ cells.

Generates seeded atlas-like inputs (h5ad, ``--cells-per-input`` cells each, written one at a
time: 2,000 genes, ~8 UMI-like counts per cell in float32 CSR, an obs of 24-character unique
cell names, a ``cell_type`` categorical of 30 classes, a ``donor`` categorical of 100 and an
int ``n_counts``), builds a collection from them with
``DatasetCollection(path).add_adatas(paths)``, and measures, each in a fresh process (nothing
warm but the page cache):

1. the build: wall time and peak RSS (VmHWM of the build process; any processes it starts
   are counted by their own peak);
2. ``import torch, annbatch``: the baseline RSS of a training process;
3. ``Loader(batch_size=4096, chunk_size=256, preload_nchunks=64, shuffle=True, to="torch")
   .use_collection(DatasetCollection(path, mode="r"))``: wall time, and RSS after it minus RSS
   before it (after the imports, same process); also ``len(pickle.dumps(loader))``, what
   every DataLoader worker receives;
4. in process: time from ``iter(loader)`` to the first batch, then rows/s over the next
   ``--stream-rows`` rows, batch["X"] and batch["obs"] consumed; a collection with fewer
   rows is streamed epoch after epoch (``set_epoch``), each epoch timed from its first batch
   (no epoch restart is timed, as none is in a larger collection's single epoch); median of
   ``--runs`` processes. Then, in the same process, a second figure, "steady": rows/s over
   as many rows after ``--warmup-rows`` more, timed without a break. There, a small
   collection's epoch starts are timed (each reads its first window before its first batch,
   a window's read that the first figure leaves out every epoch: at 100k cells one in six),
   and a large collection's first windows of the process (files opened, shard indexes
   read) are not;
5. ``DataLoader(loader, batch_size=None, num_workers=2, multiprocessing_context="spawn")``:
   time to the first batch (worker start included), rows/s over at most one epoch, and the
   peak RSS (VmHWM) of each worker, polled from /proc while the workers stream.

All of it runs on a small collection (``--small-cells``) from the same generator as well, and
the table puts the two side by side with the ratio of in-process rows/s (of the medians, and
of each round). The streaming runs alternate between the two collections, round after round
(``--runs`` rounds), so that a change on the machine meanwhile (other work, page cache
reclaimed) falls on both alike, and each round's ratio is printed: run one after the other,
the ratio moved between 0.63 and 0.84 from one call to the next with the same code.

Inputs and collections are cached in ``--workdir`` (a JSON marker holds their parameters and
how long they took) and reused when the parameters match; ``--rebuild`` rebuilds the
collections (not the inputs). Disk use, measured at 1M cells: ~135 bytes per cell for the
inputs (uncompressed h5ad), ~35 for the collection (100M cells: ~17 GB together; the script
checks free space first).
Subprocesses inherit the environment, PYTHONPATH included: run it with the annbatch to measure.

Usage: python benchmarks/scale.py [--cells 20000000] [--cells-per-input 2000000]
       [--small-cells 100000] [--workdir /tmp/annbatch-scale] [--rebuild] [--skip-workers]
       [--stream-rows 2000000] [--warmup-rows 200000] [--runs 3] [--memory-budget 2GB]
       [--lock-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

N_VAR = 2_000
NNZ = 8  # genes drawn per cell (duplicates merged: ~7.9 stored)
N_CELL_TYPES = 30
N_DONORS = 100
DONORS_PER_INPUT = 12
GENERATOR = 1  # bump when the generated data change: cached inputs are then rewritten
LOADER = {
    "batch_size": 4096,
    "chunk_size": 256,
    "preload_nchunks": 64,
    "shuffle": True,
    "to": "torch",
}
# Bytes on disk per cell, measured at 1M cells. Inputs (h5ad, uncompressed): X data + indices
# (~7.9 x 8), indptr 8, the name (h5py variable-length string: 24 + ~16), codes 2, n_counts 8.
# The collection (compressed zarr): ~35; counted as 50 in the free-space check.
INPUT_BYTES_PER_CELL = 135
COLLECTION_BYTES_PER_CELL = 50


# ------------------------------------------------------------------------------- /proc helpers
def _status(key: str, pid: int | str = "self") -> float:
    """A ``/proc/<pid>/status`` field in MiB (``VmRSS``, ``VmHWM``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    msg = f"no {key} in /proc/{pid}/status"
    raise KeyError(msg)


def _spawned_children(parent: int) -> list[int]:
    """The processes that ``parent`` started with multiprocessing's spawn (DataLoader workers;
    not its resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
    return out


class WorkerPeaks:
    """Polls the peak RSS (VmHWM) of this process's spawned workers in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peaks: dict[int, float] = {}
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def poll(self) -> None:
        for pid in _spawned_children(os.getpid()):
            try:
                hwm = _status("VmHWM", pid)
            except (OSError, KeyError):
                continue
            self.peaks[pid] = max(self.peaks.get(pid, 0.0), hwm)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def stop(self) -> list[float]:
        """Stop polling; return each worker's peak in MiB (workers in order of pid)."""
        self._stop.set()
        self._thread.join()
        return [self.peaks[pid] for pid in sorted(self.peaks)]


# ----------------------------------------------------------------------------- child processes
def _quiet() -> None:
    import warnings

    warnings.simplefilter("ignore")


def child_build(args: dict[str, Any]) -> dict[str, Any]:
    """Build the collection at ``args["path"]`` from ``args["inputs"]``."""
    import resource

    _quiet()
    t_import = time.perf_counter()
    import annbatch

    imported = time.perf_counter() - t_import
    shutil.rmtree(args["path"], ignore_errors=True)
    base = _status("VmRSS")
    kwargs: dict[str, Any] = {"rng": 0, "progress": False}
    if args["memory_budget"]:
        kwargs["memory_budget"] = args["memory_budget"]
    t0 = time.perf_counter()
    c = annbatch.DatasetCollection(args["path"]).add_adatas(args["inputs"], **kwargs)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "import_s": imported,
        "n_obs": c.n_obs,
        "datasets": len(c),
        "peak_mb": _status("VmHWM"),
        "base_mb": base,
        # processes the build started, if any (their largest peak; 0 if none)
        "children_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def child_baseline(args: dict[str, Any]) -> dict[str, Any]:
    """RSS of an interpreter that imported torch and annbatch."""
    _quiet()
    t0 = time.perf_counter()
    import torch  # noqa: F401

    import annbatch  # noqa: F401

    return {"import_s": time.perf_counter() - t0, "rss_mb": _status("VmRSS")}


def _open(path: str) -> tuple[Any, dict[str, Any]]:
    """Imports, then a Loader over the collection at ``path``; its timings and RSS."""
    _quiet()
    import torch  # noqa: F401

    import annbatch

    base = _status("VmRSS")
    t0 = time.perf_counter()
    loader = annbatch.Loader(**LOADER)
    loader.use_collection(annbatch.DatasetCollection(path, mode="r"))
    seconds = time.perf_counter() - t0
    after = _status("VmRSS")
    return loader, {
        "open_s": seconds,
        "base_mb": base,
        "open_mb": after - base,
        "open_peak_mb": _status("VmHWM") - base,
        "n_obs": loader.n_obs,
    }


def child_open(args: dict[str, Any]) -> dict[str, Any]:
    """Open (see :func:`_open`) and pickle the Loader."""
    import pickle

    loader, out = _open(args["path"])
    t0 = time.perf_counter()
    out["pickle_bytes"] = len(pickle.dumps(loader))
    out["pickle_s"] = time.perf_counter() - t0
    return out


def _stream(batches: Any, limit: int, before_close: Callable[[], None] | None = None) -> dict:
    """Time to the first of ``batches``, then rows/s of the next until ``limit`` rows (all of
    them counted) or the end of the epoch; ``before_close`` is called before the iterator is
    dropped."""
    t0 = time.perf_counter()
    it = iter(batches)
    first = next(it)
    t1 = time.perf_counter()
    rows = obs_rows = 0
    dt = 0.0
    for batch in it:
        x, obs = batch["X"], batch["obs"]
        rows += x.shape[0]
        obs_rows += len(obs)
        dt = time.perf_counter() - t1  # up to the last batch used (not read-ahead dropped)
        if rows >= limit:
            break
    if before_close is not None:
        before_close()
    del it
    if obs_rows != rows:
        msg = f"obs of {obs_rows} rows came with X of {rows}"
        raise AssertionError(msg)
    return {
        "first_s": t1 - t0,
        "first_rows": first["X"].shape[0],
        "rows": rows,
        "seconds": dt,
        "rows_per_s": rows / dt if dt else float("nan"),
    }


def child_stream(args: dict[str, Any]) -> dict[str, Any]:
    """Open, then stream ``rows`` rows in this process: epoch after epoch (``set_epoch``)
    where the collection is smaller, each timed from its first batch (see :func:`_stream`),
    so that a small and a large collection are compared over as many rows, in steady state.
    The first batch's time is the first epoch's."""
    loader, out = _open(args["path"])
    epochs: list[dict[str, Any]] = []
    while sum(e["rows"] for e in epochs) < args["rows"]:
        loader.set_epoch(len(epochs))
        done = sum(e["rows"] for e in epochs)
        epochs.append(_stream(loader, args["rows"] - done))
        if epochs[-1]["rows"] == 0:  # an epoch of one batch: nothing after its first
            break
    rows = sum(e["rows"] for e in epochs)
    seconds = sum(e["seconds"] for e in epochs)
    out.update(epochs[0])
    out.update(
        rows=rows,
        seconds=seconds,
        epochs=len(epochs),
        rows_per_s=rows / seconds if seconds else float("nan"),
    )
    out["steady_rows_per_s"] = _steady(loader, args["warmup"], args["rows"], len(epochs))
    out["peak_mb"] = _status("VmHWM")
    return out


def _steady(loader: Any, warmup: int, limit: int, epoch: int) -> float:
    """Rows/s over ``limit`` rows after ``warmup`` rows, timed without a break: epoch starts
    (a new ``set_epoch``, the first window of each epoch read before its first batch) are
    timed too, as they recur every epoch of a small collection. Starts at epoch ``epoch``."""
    seen = counted = 0
    t0 = time.perf_counter()  # (no warm-up: timed from the first batch's request)
    while True:
        loader.set_epoch(epoch)
        epoch += 1
        n = 0
        for batch in loader:
            x, obs = batch["X"], batch["obs"]
            n += 1
            if len(obs) != x.shape[0]:
                msg = f"obs of {len(obs)} rows came with X of {x.shape[0]}"
                raise AssertionError(msg)
            if seen < warmup:
                seen += x.shape[0]
                if seen >= warmup:
                    t0 = time.perf_counter()
                continue
            counted += x.shape[0]
            if counted >= limit:
                return counted / (time.perf_counter() - t0)
        if n == 0:
            return float("nan")


def child_workers(args: dict[str, Any]) -> dict[str, Any]:
    """Open, then stream through a DataLoader with spawned workers, polling their peak RSS."""
    loader, out = _open(args["path"])
    import torch.utils.data

    dl = torch.utils.data.DataLoader(
        loader,
        batch_size=None,
        num_workers=args["workers"],
        multiprocessing_context="spawn",
    )
    peaks = WorkerPeaks()
    try:
        out.update(_stream(dl, args["rows"], before_close=peaks.poll))
    finally:
        out["worker_peaks_mb"] = peaks.stop()
    if len(out["worker_peaks_mb"]) != args["workers"]:
        msg = f"found {len(out['worker_peaks_mb'])} workers, not {args['workers']}"
        raise AssertionError(msg)
    out["peak_mb"] = _status("VmHWM")
    return out


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "build": child_build,
    "baseline": child_baseline,
    "open": child_open,
    "stream": child_stream,
    "workers": child_workers,
}


def run_child(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """Run measurement ``name`` in a fresh interpreter (this script with ``--child``; the
    environment, PYTHONPATH included, is inherited); return the JSON it printed last."""
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, json.dumps(args)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if out.returncode:
        msg = f"measurement {name!r} failed (exit {out.returncode}); its stderr is above"
        raise RuntimeError(msg)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- the data
def _cell_names(start: int, n: int, sample: int) -> Any:
    """24-character unique names: a 16-base barcode (a bijection of the cell's global number),
    ``-1_`` and the sample, e.g. ``GATCAGTTCCAAGTCA-1_s0003``."""
    import numpy as np

    idx = np.arange(start, start + n, dtype=np.uint64)
    code = (idx * np.uint64(2_654_435_761)) & np.uint64(0xFFFF_FFFF)  # odd: bijective mod 2^32
    shifts = np.arange(30, -1, -2, dtype=np.uint64)
    digits = ((code[:, None] >> shifts) & np.uint64(3)).astype(np.uint8)
    barcodes = np.frombuffer(b"ACGT", np.uint8)[digits].view("S16").ravel().astype("U16")
    return np.char.add(barcodes, f"-1_s{sample:04d}").astype(object)


def make_input(path: Path, i: int, start: int, n: int, seed: int) -> None:
    """Write input ``i`` (``n`` cells numbered from ``start``) to ``path``."""
    import warnings

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    genes = np.random.default_rng(seed)  # the same gene and class frequencies in every input
    gene_p = genes.lognormal(0.0, 1.5, N_VAR)
    gene_p /= gene_p.sum()
    type_p = 1 / np.arange(1, N_CELL_TYPES + 1)
    type_p /= type_p.sum()
    rng = np.random.default_rng([seed, i])
    indices = rng.choice(N_VAR, size=(n, NNZ), p=gene_p).astype(np.int32)
    indices.sort(axis=1)
    data = rng.geometric(0.6, size=n * NNZ).astype(np.float32)  # 1, 2, 3... mostly 1
    x = sp.csr_matrix(
        (data, indices.ravel(), np.arange(n + 1, dtype=np.int64) * NNZ), shape=(n, N_VAR)
    )
    del indices, data
    x.sum_duplicates()
    first = rng.integers(0, N_DONORS - DONORS_PER_INPUT + 1)
    donors = np.array([f"donor_{d:03d}" for d in range(N_DONORS)])
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(
                rng.choice(N_CELL_TYPES, n, p=type_p),
                [f"cell_type_{k:02d}" for k in range(N_CELL_TYPES)],
            ),
            "donor": pd.Categorical(donors[first + rng.integers(0, DONORS_PER_INPUT, n)]),
            "n_counts": np.asarray(x.sum(axis=1)).ravel().astype(np.int64),
        },
        index=pd.Index(_cell_names(start, n, i), name="cell"),
    )
    var = pd.DataFrame(index=[f"gene_{g:04d}" for g in range(N_VAR)])
    tmp = path.with_suffix(".tmp.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(tmp)
    tmp.rename(path)  # a file under its final name is complete


def _gb(nbytes: float) -> str:
    """Bytes in GB, or MB under 1 GB."""
    return f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:,.0f} MB"


def size_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (or of the file ``path``)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def make_inputs(workdir: Path, cells: int, per_input: int, seed: int) -> tuple[list[Path], dict]:
    """The inputs of ``cells`` cells (cached); with the marker's record of their generation."""
    params = {
        "cells": cells,
        "cells_per_input": per_input,
        "n_var": N_VAR,
        "nnz": NNZ,
        "seed": seed,
        "generator": GENERATOR,
    }
    folder = workdir / f"inputs_{cells}_{per_input}_s{seed}"
    marker = folder / "inputs.json"
    sizes = [min(per_input, cells - lo) for lo in range(0, cells, per_input)]
    paths = [folder / f"input_{i:04d}.h5ad" for i in range(len(sizes))]
    if marker.exists():
        record = json.loads(marker.read_text())
        if record["params"] == params and all(p.exists() for p in paths):
            print(
                f"inputs: {len(paths)} x h5ad in {folder} (cached; generated in "
                f"{record['seconds']:,.0f} s, {_gb(record['bytes'])})",
                flush=True,
            )
            return paths, record
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    need = cells * INPUT_BYTES_PER_CELL
    total = need + cells * COLLECTION_BYTES_PER_CELL
    print(
        f"inputs: writing {len(paths)} x h5ad ({cells:,} cells) to {folder}: ~{_gb(need)}, "
        f"~{_gb(total)} with the collection; {_gb(free)} free",
        flush=True,
    )
    if total > free:
        msg = f"not enough disk under {folder}: ~{_gb(total)} needed, {_gb(free)} free"
        raise SystemExit(msg)
    t0 = time.perf_counter()
    for i, (path, n) in enumerate(zip(paths, sizes, strict=True)):
        if not path.exists():
            make_input(path, i, i * per_input, n, seed)
        done = i + 1
        written = sum(size_bytes(p) for p in paths[:done])
        projected = written / sum(sizes[:done]) * cells
        print(
            f"  {done}/{len(paths)} after {time.perf_counter() - t0:,.0f} s; "
            f"{written / sum(sizes[:done]):.0f} bytes/cell, projected {_gb(projected)}",
            flush=True,
        )
    record = {
        "params": params,
        "seconds": time.perf_counter() - t0,
        "bytes": sum(size_bytes(p) for p in paths),
    }
    marker.write_text(json.dumps(record))
    print(f"inputs generated in {record['seconds']:,.1f} s ({_gb(record['bytes'])})", flush=True)
    return paths, record


def build(
    workdir: Path, inputs: list[Path], inputs_record: dict, memory_budget: str | None, rebuild: bool
) -> tuple[Path, dict]:
    """The collection of ``inputs`` (cached unless ``rebuild``); with its build record."""
    folder = inputs[0].parent
    path = workdir / f"collection_{folder.name.removeprefix('inputs_')}.zarr"
    marker = path.with_suffix(".json")
    params = {"inputs": inputs_record["params"], "memory_budget": memory_budget}
    if marker.exists() and not rebuild:
        record = json.loads(marker.read_text())
        if record["params"] == params and path.exists():
            record["cached"] = True
            return path, record
    marker.unlink(missing_ok=True)
    print(f"building {path} ...", flush=True)
    r = run_child(
        "build",
        {"path": str(path), "inputs": list(map(str, inputs)), "memory_budget": memory_budget},
    )
    record = {"params": params, **r, "bytes": size_bytes(path)}
    marker.write_text(json.dumps(record))
    record["cached"] = False
    print(
        f"built in {r['seconds']:,.1f} s: {r['datasets']} datasets, {r['n_obs']:,} rows, "
        f"peak RSS {r['peak_mb']:,.0f} MB, {_gb(record['bytes'])} on disk",
        flush=True,
    )
    return path, record


# ----------------------------------------------------------------------------- the measurements
def measure(paths: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every measurement on the collections at ``paths``, each in fresh processes. The
    streaming runs alternate between the collections, round after round, so that whatever
    else changes on the machine meanwhile falls on all of them alike."""
    outs: list[dict[str, Any]] = []
    for path in paths:
        print(f"  opening {path.name} ...", flush=True)
        outs.append(
            {"baseline": run_child("baseline", {}), "open": run_child("open", {"path": str(path)})}
        )
    for key, child, wanted in (
        ("stream", "stream", True),
        ("workers", "workers", not args.skip_workers),
    ):
        if not wanted:
            continue
        for k in range(args.runs):
            print(f"  {key}: round {k + 1} of {args.runs} ...", flush=True)
            # Alternately small first and large first: a run's place in the round (what ran
            # just before it) falls on both collections alike.
            pairs = list(zip(paths, outs, strict=True))
            for path, out in pairs if k % 2 == 0 else pairs[::-1]:
                params = {
                    "path": str(path),
                    "rows": args.stream_rows,
                    "workers": 2,
                    "warmup": args.warmup_rows,
                }
                out.setdefault(key, []).append(run_child(child, params))
    return outs


def label(n: int) -> str:
    """100000 -> 100k, 20000000 -> 20M."""
    for unit, div in (("M", 1_000_000), ("k", 1_000)):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{unit}"
    return f"{n:,}"


def table(columns: list[tuple[int, dict, dict]], workers: bool) -> list[str]:
    """The markdown table: one column per (cells, build record, measurements)."""

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    rows: list[tuple[str, Callable[[dict, dict], str]]] = [
        (
            "build (s, peak RSS MB)",
            lambda b, m: (
                f"{b['seconds']:,.1f} s, {b['peak_mb']:,.0f} MB"
                + (" (cached)" if b["cached"] else "")
            ),
        ),
        ("collection on disk", lambda b, m: _gb(b["bytes"])),
        (
            "baseline: import torch, annbatch (s, RSS MB)",
            lambda b, m: f"{m['baseline']['import_s']:,.2f} s, {m['baseline']['rss_mb']:,.0f} MB",
        ),
        (
            "open: use_collection (s, +RSS MB)",
            lambda b, m: (
                f"{m['open']['open_s']:,.2f} s, +{m['open']['open_mb']:,.0f} MB "
                f"(peak +{m['open']['open_peak_mb']:,.0f})"
            ),
        ),
        ("first batch in process (s)", lambda b, m: f"{med(m['stream'], 'first_s'):,.2f}"),
        (
            "rows/s in process, steady (after warm-up; epoch starts timed)",
            lambda b, m: (
                f"{med(m['stream'], 'steady_rows_per_s'):,.0f} "
                f"({min(r['steady_rows_per_s'] for r in m['stream']):,.0f}-"
                f"{max(r['steady_rows_per_s'] for r in m['stream']):,.0f})"
            ),
        ),
        (
            f"rows/s in process (chunk {LOADER['chunk_size']}, batch {LOADER['batch_size']})",
            lambda b, m: (
                f"{med(m['stream'], 'rows_per_s'):,.0f} "
                f"({min(r['rows_per_s'] for r in m['stream']):,.0f}-"
                f"{max(r['rows_per_s'] for r in m['stream']):,.0f}; "
                f"{m['stream'][0]['rows']:,} rows in {m['stream'][0]['epochs']} epochs)"
            ),
        ),
        (
            "peak RSS in process while streaming (MB)",
            lambda b, m: f"{max(r['peak_mb'] for r in m['stream']):,.0f}",
        ),
    ]
    if workers:
        rows += [
            (
                "first batch, 2 spawn workers (s)",
                lambda b, m: f"{med(m['workers'], 'first_s'):,.2f}",
            ),
            ("rows/s, 2 spawn workers", lambda b, m: f"{med(m['workers'], 'rows_per_s'):,.0f}"),
            (
                "peak RSS per worker (MB)",
                lambda b, m: " / ".join(
                    f"{max(r['worker_peaks_mb'][k] for r in m['workers']):,.0f}"
                    for k in range(len(m["workers"][0]["worker_peaks_mb"]))
                ),
            ),
        ]
    rows.append(("pickled Loader (KB)", lambda b, m: f"{m['open']['pickle_bytes'] / 1024:,.0f}"))
    head = "| step | " + " | ".join(f"{label(c)} cells" for c, _, _ in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(b, m) for _, b, m in columns) + " |")
    return lines


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        msg = f"expected a count of rows (0 or more), got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        result = CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(result), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=20_000_000)
    p.add_argument("--cells-per-input", type=int, default=2_000_000)
    p.add_argument("--small-cells", type=int, default=100_000, help="the reference column")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/annbatch-scale"))
    p.add_argument("--rebuild", action="store_true", help="rebuild the collections")
    p.add_argument("--skip-workers", action="store_true", help="no DataLoader worker runs")
    p.add_argument(
        "--lock-cache",
        action="store_true",
        help="lock both collections' files in memory while they are measured (pin_cache.py): on "
        "a machine that reclaims page cache, a large collection is otherwise partly read from disk",
    )
    p.add_argument(
        "--stream-rows",
        type=int,
        default=2_000_000,
        help="rows timed per run (in process: over as many epochs as that takes)",
    )
    p.add_argument("--runs", type=int, default=3, help="streaming runs (fresh processes)")
    p.add_argument(
        "--warmup-rows",
        type=_non_negative,
        default=200_000,
        help="rows streamed before the steady-state timing (the second in-process figure)",
    )
    p.add_argument("--memory-budget", help="the build's memory_budget (default: annbatch's)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"python {sys.executable}; PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}; "
        f"{os.cpu_count()} CPUs; Loader({', '.join(f'{k}={v!r}' for k, v in LOADER.items())})",
        flush=True,
    )
    sizes = (a.small_cells, a.cells)
    built: list[tuple[Path, dict]] = []
    for cells in sizes:
        inputs, record = make_inputs(a.workdir, cells, min(a.cells_per_input, cells), a.seed)
        built.append(build(a.workdir, inputs, record, a.memory_budget, a.rebuild))
    paths = [path for path, _ in built]
    print(
        f"measuring {', '.join(f'{label(c)} ({p})' for c, p in zip(sizes, paths, strict=True))} ...",
        flush=True,
    )
    pin = None
    if a.lock_cache:  # every collection equally warm (see benchmarks/pin_cache.py)
        pin = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("pin_cache.py")), *map(str, paths)],
            stdout=subprocess.PIPE,
            text=True,
        )
        locked = pin.stdout.readline().strip()  # type: ignore[union-attr]
        if not locked:
            sys.exit(f"--lock-cache: pin_cache.py could not lock {paths} (see above)")
        print(f"  {locked}", flush=True)
    try:
        measured = measure(paths, a)
    finally:
        if pin is not None:
            pin.terminate()
            pin.wait()
    columns = [
        (cells, record, m) for cells, (_, record), m in zip(sizes, built, measured, strict=True)
    ]
    print()
    print("\n".join(table(columns, not a.skip_workers)))
    (_, _, small), (_, _, big) = columns
    ratio = statistics.median(r["rows_per_s"] for r in big["stream"]) / statistics.median(
        r["rows_per_s"] for r in small["stream"]
    )
    rounds = [
        b["rows_per_s"] / s["rows_per_s"]
        for s, b in zip(small["stream"], big["stream"], strict=True)
    ]
    print(
        f"\nrows/s in process, {label(a.cells)} / {label(a.small_cells)}: {ratio:.2f} "
        f"(each round: {', '.join(f'{r:.2f}' for r in rounds)})"
    )
    steady = [
        b["steady_rows_per_s"] / s["steady_rows_per_s"]
        for s, b in zip(small["stream"], big["stream"], strict=True)
    ]
    ratio = statistics.median(r["steady_rows_per_s"] for r in big["stream"]) / statistics.median(
        r["steady_rows_per_s"] for r in small["stream"]
    )
    print(
        f"rows/s in process, steady, {label(a.cells)} / {label(a.small_cells)}: {ratio:.2f} "
        f"(each round: {', '.join(f'{r:.2f}' for r in steady)})"
    )
    if not a.skip_workers:
        print(
            "workers: "
            + "; ".join(
                f"{label(c)}: rows/s {statistics.median(r['rows_per_s'] for r in m['workers']):,.0f}"
                for c, _, m in columns
            )
        )


if __name__ == "__main__":
    main()
