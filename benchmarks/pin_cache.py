"""Hold stores in the page cache while benchmarks run: map every file under the given paths
and lock the mappings in memory (``mlockall``), until interrupted.

On this project's benchmark machine, a VM whose kernel reclaims page cache it considers cold,
a collection of 100 million cells (~3.5 GB read per epoch) read back "warm" still missed the
cache on 3-4% of random 1 KB reads (~300 us each: a mean of 10-15 us against 1.9 us with the
files locked), and the atlas then measured the disk, not the loader. Run this beside a
benchmark that compares collections of different sizes, so that all are equally warm.
The files of ``obs/_index`` (cell names, never read while streaming) are left out.

Usage: python benchmarks/pin_cache.py PATH [PATH ...] &   (needs RLIMIT_MEMLOCK, e.g. root)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys


def main(paths: list[str]) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    maps, total = [], 0
    for root in paths:
        for folder, _, names in os.walk(root):
            if "_index" in folder.split(os.sep):
                continue
            for name in names:
                path = os.path.join(folder, name)
                size = os.path.getsize(path)
                if size == 0:
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    maps.append(mmap.mmap(fd, size, prot=mmap.PROT_READ))
                finally:
                    os.close(fd)
                total += size
    if libc.mlockall(1) != 0:  # MCL_CURRENT: fault in and lock every mapping made above
        sys.exit(f"mlockall failed: {os.strerror(ctypes.get_errno())}")
    print(f"locked {total / 1e9:.2f} GB in {len(maps)} files", flush=True)
    signal.pause()


if __name__ == "__main__":
    main(sys.argv[1:])
