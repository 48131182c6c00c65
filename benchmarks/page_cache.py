"""What one chunk read from the page cache costs, by how much data the reads are spread over.

Issue 27 compares streaming a 100M-cell collection with a 100k-cell one. The whole 100k
collection (~7 MB) fits in this machine's 32 MB L3 cache; a 100M one spreads its reads over
~4 GB of page cache. This script times what the Loader does per chunk of an obs column, with
nothing of annbatch involved: ``os.pread`` of one whole chunk (as stored, with its CRC32C) at a
random chunk boundary of the column's shard files, every file already in memory (run
``pin_cache.py`` on the collection first, or read it once). The reads are spread over a
growing share of the files' bytes (the footprint), the number of reads staying the same.

Usage: python benchmarks/page_cache.py COLLECTION [--column n_counts] [--reads 200000]
       [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np


def chunk_bytes(array: Path) -> int:
    """Bytes of one stored chunk of a sharded 1-D zarr array (values and a CRC32C)."""
    meta = json.loads((array / "zarr.json").read_text())
    (shard,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    config = shard["configuration"]
    itemsize = np.dtype(meta["data_type"]).itemsize
    crc = any(c["name"] == "crc32c" for c in config["codecs"])
    return config["chunk_shape"][0] * itemsize + (4 if crc else 0)


def time_reads(reads: list[tuple[int, int]], nbytes: int) -> float:
    """Microseconds per ``os.pread`` of ``nbytes`` at each ``(fd, offset)``."""
    t = time.perf_counter()
    for fd, offset in reads:
        os.pread(fd, nbytes, offset)
    return (time.perf_counter() - t) / len(reads) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("collection", type=Path)
    p.add_argument("--column", default="n_counts")
    p.add_argument("--reads", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    arrays = sorted(a.collection.glob(f"dataset_*/obs/{a.column}"))
    if not arrays:
        raise SystemExit(f"no obs column {a.column!r} in {a.collection}")
    stored = chunk_bytes(arrays[0])
    files = sorted(f for array in arrays for f in (array / "c").rglob("*") if f.is_file())
    fds = [os.open(f, os.O_RDONLY) for f in files]
    chunks = [os.fstat(fd).st_size // stored - 1 for fd in fds]  # whole chunks before the index
    total = sum(chunks) * stored
    print(
        f"{len(files)} shard files of {a.column!r}, {total / 2**20:,.0f} MB; chunks of {stored} B"
    )
    shares = [s for s in (1 / 512, 1 / 64, 1 / 8, 1.0) if s * total >= 4 * stored * len(files)]
    rng = random.Random(0)
    results: dict[float, list[float]] = {s: [] for s in shares}
    for _ in range(a.rounds):
        for share in shares:  # each file's first `share` of its chunks
            reads = []
            for _ in range(a.reads):
                k = rng.randrange(len(fds))
                reads.append((fds[k], rng.randrange(max(1, int(chunks[k] * share))) * stored))
            results[share].append(time_reads(reads, stored))
    print("| footprint (MB) | us per read (median) | rounds |")
    print("|---|---|---|")
    for share, times in results.items():
        rounds = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {share * total / 2**20:,.1f} | {statistics.median(times):.2f} | {rounds} |")
    for fd in fds:
        os.close(fd)


if __name__ == "__main__":
    main()
