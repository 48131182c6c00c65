"""Rows/s of one in-process stream over a collection, for A/B comparisons of two checkouts.

Opens ``PATH`` with the Loader settings of ``scale.py`` (batch 4,096, chunk 256, preload 64,
shuffled, ``to="torch"``), streams ``--warmup-rows`` rows, then times ``--rows`` more: each
pass calls ``set_epoch`` (a new epoch) and iterates until the rows are reached, so the timed
span starts with an epoch start and, on a collection smaller than ``--rows``, holds the
later epochs' starts too. Prints rows/s and the process's CPU time (all threads) per 1M
rows, in all and split into user and system (kernel) time; ``--profile`` prints cProfile's
top functions for the timed span (slower).

Compare two checkouts by running it alternately, in fresh processes, with
``PYTHONPATH=<other checkout>/src`` for one of them, and take medians; lock both
collections in memory first (``pin_cache.py``) when their sizes differ.

Usage: python benchmarks/stream.py PATH [--rows 2000000] [--warmup-rows 200000]
       [--read-ahead 1] [--profile] [--sort tottime] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--warmup-rows", type=int, default=200_000)
    p.add_argument("--read-ahead", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sort", default="tottime")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()

    import torch  # noqa: F401  (imported as a training process would)

    import annbatch

    loader = annbatch.Loader(
        batch_size=4096,
        chunk_size=256,
        preload_nchunks=64,
        shuffle=True,
        to="torch",
        read_ahead=a.read_ahead,
    )
    loader.use_collection(annbatch.DatasetCollection(a.path, mode="r"))

    def run(limit: int, epoch: int) -> int:
        n = 0
        while n < limit:
            loader.set_epoch(epoch)
            epoch += 1
            for batch in loader:
                n += batch["X"].shape[0]
                if n >= limit:
                    break
        return n

    if a.warmup_rows:
        run(a.warmup_rows, 100)
    profile = cProfile.Profile() if a.profile else None
    if profile is not None:
        profile.enable()
    t, before = time.perf_counter(), os.times()
    n = run(a.rows, 0)
    seconds, after = time.perf_counter() - t, os.times()
    user, system = after.user - before.user, after.system - before.system
    if profile is not None:
        profile.disable()
        pstats.Stats(profile).sort_stats(a.sort).print_stats(a.top)
    name = a.path.rstrip("/").split("/")[-1]
    per_m = 1e6 / n
    print(
        f"{name} rows/s {n / seconds:,.0f} cpu_s_per_M {(user + system) * per_m:.3f} "
        f"user {user * per_m:.3f} sys {system * per_m:.3f}"
    )


if __name__ == "__main__":
    main()
