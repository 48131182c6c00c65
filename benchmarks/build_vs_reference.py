"""Collection build speed and memory: ours against the reference library's ``add_adatas``.

Writes seeded sparse h5ad inputs (``build_memory.py``'s generator; default 20 files x 100,000
rows x 20,000 genes), then builds a collection from all of them with each contender in a fresh
process, alternating the order every round: the reference (annbatch 0.3.1 in its own
interpreter, its default layout, ``dataset_size`` = the budget) and ours (``memory_budget`` =
the budget) in our default layout and in LZ4. Prints rows/s, input MB/s (h5ad bytes read per
second) and the peak RSS of the building process.

Usage: python benchmarks/build_vs_reference.py --reference-python /path/to/venv/bin/python
       [--files 20] [--rows-per-file 100000] [--n-var 20000] [--nnz 200] [--budget 2GB]
       [--rounds 2] [--only ours-none,ours-lz4,reference] [--baseline-src PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from build_memory import write_inputs

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import numpy as np, annbatch
kind, out, budget, options, inputs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5:]
status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) / 1024
base = status("VmRSS")
t0 = time.perf_counter()
if kind == "reference":
    annbatch.DatasetCollection(out).add_adatas(inputs, dataset_size=budget, rng=np.random.default_rng(0), **options)
else:
    annbatch.DatasetCollection(out).add_adatas(inputs, memory_budget=budget, rng=0, progress=False, **options)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mb": status("VmHWM"), "base_mb": base}))
"""


def run(
    python: str,
    kind: str,
    out: Path,
    budget: str,
    options: dict,
    inputs: list[Path],
    pythonpath: str | None,
) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    command = [python, "-c", CHILD, kind, str(out), budget, json.dumps(options), *map(str, inputs)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} build failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-python", required=True)
    p.add_argument("--dir", type=Path, default=Path("data/build_vs_reference"))
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--n-var", type=int, default=20_000)
    p.add_argument("--nnz", type=int, default=200)
    p.add_argument("--budget", default="2GB")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", default="ours-none,ours-lz4,reference")
    p.add_argument("--baseline-src", help="also build with annbatch from this source tree")
    a = p.parse_args()
    inputs = write_inputs(a.dir / "inputs", a.files, a.rows_per_file, a.n_var, a.nnz)
    input_mb = sum(f.stat().st_size for f in inputs) / 2**20
    n_obs = a.files * a.rows_per_file
    contenders = {
        "ours-none": (sys.executable, "ours", {"compression": "none"}, None),
        "ours-lz4": (sys.executable, "ours", {"compression": "lz4"}, None),
        "reference": (a.reference_python, "reference", {}, None),
    }
    contenders = {k: v for k, v in contenders.items() if k in a.only.split(",")}
    if a.baseline_src:
        contenders["baseline-none"] = (
            sys.executable,
            "ours",
            {"compression": "none"},
            a.baseline_src,
        )
    results: dict[str, list[dict]] = {k: [] for k in contenders}
    for r in range(a.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            python, kind, options, pythonpath = contenders[name]
            out = a.dir / f"out_{name}.zarr"
            res = run(python, kind, out, a.budget, options, inputs, pythonpath)
            results[name].append(res)
            print(
                f"round {r}: {name}: {res['seconds']:.1f} s, peak {res['peak_mb']:,.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    print(
        f"\n{a.files} h5ad files x {a.rows_per_file:,} rows x {a.n_var:,} genes, ~{a.nnz} nonzeros per row "
        f"({n_obs:,} rows, {input_mb:,.0f} MB of h5ad); budget {a.budget}; median of {a.rounds} rounds\n"
    )
    print("| build | seconds | rows/s | input MB/s | peak RSS MB | output MB |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_mb"] for r in runs)
        print(
            f"| {name} | {seconds:,.1f} | {n_obs / seconds:,.0f} | {input_mb / seconds:,.0f} | {peak:,.0f} "
            f"| {runs[0]['bytes'] / 2**20:,.0f} |"
        )


if __name__ == "__main__":
    main()
