"""Which on-disk layout makes the Loader fastest: codec and inner chunk size, measured.

Rewrites the X of the read-engine benchmark's stores (``bench.py`` writes them) in several
layouts, then times our Loader on each (fresh process per run, median of --runs), at the
chunk / preload settings of the read-engine issue. Prints one table with size on disk.

Usage: python benchmarks/layout.py [--n-obs 100000 --n-var 5000 --nnz 400] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import BATCH, make_stores, run_child, size_mb

# (name, codec, inner chunk: elements for sparse data/indices, rows for dense)
SPARSE_LAYOUTS = [
    ("zstd, 131072", "zstd", 131_072),
    ("zstd, 32768", "zstd", 32_768),
    ("blosc-lz4, 131072", "lz4", 131_072),
    ("blosc-lz4, 32768", "lz4", 32_768),
    ("blosc-lz4, 8192", "lz4", 8_192),
    ("none, 32768", "none", 32_768),
    ("none, 131072", "none", 131_072),
    ("none, 524288", "none", 524_288),
]
DENSE_LAYOUTS = [
    ("zstd, 256 rows", "zstd", 256),
    ("blosc-lz4, 256 rows", "lz4", 256),
    ("blosc-lz4, 128 rows", "lz4", 128),
    ("blosc-lz4, 32 rows", "lz4", 32),
    ("none, 128 rows", "none", 128),
    ("none, 32 rows", "none", 32),
    ("none, 512 rows", "none", 512),
]
SETTINGS = [(256, 64), (32, 512), (1, 16384)]


def _codec(name: str) -> object:
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none":
        return None
    return (
        ZstdCodec(level=0)
        if name == "zstd"
        else BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    )


def rewrite(source: Path, target: Path, codec: str, inner: int) -> None:
    """X of ``source`` written again to ``target`` with another codec and inner chunk."""
    import anndata as ad
    import zarr

    if target.exists():
        return
    g = zarr.open_group(source, mode="r")
    out = zarr.open_group(target, mode="w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(g["X"], zarr.Group):
            x = ad.io.read_elem(g["X"])
            shard = inner * max(1, 4_194_304 // inner)
            kwargs = {"chunks": (inner,), "shards": (shard,), "compressors": _codec(codec)}
        else:
            x = g["X"][...]
            kwargs = {
                "chunks": (inner, x.shape[1]),
                "shards": (inner * max(1, 8192 // inner), x.shape[1]),
                "compressors": _codec(codec),
            }
        ad.io.write_elem(out, "X", x, dataset_kwargs=kwargs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/bench"))
    p.add_argument("--n-obs", type=int, default=100_000)
    p.add_argument("--n-var", type=int, default=5_000)
    p.add_argument("--nnz", type=int, default=400)
    p.add_argument("--dense-var", type=int, default=2_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-rows", type=int, default=49_152)
    p.add_argument("--codecs", default="zstd,lz4,none", help="comma-separated codecs to measure")
    a = p.parse_args()
    codecs = a.codecs.split(",")
    stores = make_stores(a.dir, a.n_obs, a.n_var, a.nnz, a.dense_var, seed=0)
    print(
        f"Loader rows/s (median of {a.runs}), batch {BATCH}, shuffled; sparse {a.n_obs:,} x {a.n_var:,} "
        f"({a.nnz} nnz/row), dense {a.n_obs:,} x {a.dense_var:,}\n"
    )
    header = " | ".join(f"chunk {c} / {pl}" for c, pl in SETTINGS)
    print(f"| store | layout | MB on disk | {header} |")
    print("|---|---|---|" + "---|" * len(SETTINGS))
    for kind, layouts in (("sparse", SPARSE_LAYOUTS), ("dense", DENSE_LAYOUTS)):
        for name, codec, inner in layouts:
            if codec not in codecs:
                continue
            target = a.dir / "layouts" / f"{stores[kind].stem}_{codec}_{inner}.zarr"
            rewrite(stores[kind], target, codec, inner)
            cells = []
            for chunk, preload in SETTINGS:
                speeds = []
                for _ in range(a.runs):
                    args = {
                        "path": str(target),
                        "batch": BATCH,
                        "chunk": chunk,
                        "preload": preload,
                        "shuffle": True,
                        "hold_s": 0,
                        "max_rows": a.max_rows,
                        "checksum": False,
                        "zarrs": False,
                    }
                    r = run_child(sys.executable, args)
                    speeds.append(r["rows"] / r["seconds"])
                cells.append(f"{statistics.median(speeds):,.0f}")
            print(f"| {kind} | {name} | {size_mb(target):,.0f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
