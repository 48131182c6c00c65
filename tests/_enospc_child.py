"""Test helpers for a full disk during a build (``tests/test_enospc.py``), and the child that
runs builds on a small tmpfs it mounts in its own mount namespace (``unshare``; see
:func:`main`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from annbatch import DatasetCollection, Loader
from annbatch.collection import _build
from annbatch.errors import AnnbatchError

if TYPE_CHECKING:
    from collections.abc import Callable

OPTIONS = {"dataset_size": 200, "memory_budget": "1MB", "rng": 3, "progress": False}
SIZES = [220, 180, 250]  # the first two build the collection (2 datasets), the third is appended


def make_input(path: Path, i: int, n_obs: int) -> str:
    rng = np.random.default_rng(i)
    x = sp.random(n_obs, 60, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", f"only{i}"], n_obs)),
            "n_counts": rng.integers(0, 1000, n_obs),
            "note": [f"n{k}" for k in range(n_obs)],
        },
        index=[f"in{i}_c{k}" for k in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(60)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return str(path)


def files(folder: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()
    }


def rows(folder: Path) -> pd.DataFrame:
    """Every row of the collection as the Loader gives it (obs, and X's row sums and
    entries), in order."""
    collection = DatasetCollection(folder)
    loader = Loader(batch_size=collection.n_obs, shuffle=False, to=None)
    batches = list(loader.use_collection(collection))
    assert len(batches) == 1
    x = batches[0]["X"]
    frame = batches[0]["obs"].reset_index(drop=True)
    frame["x_sum"] = np.asarray(x.sum(axis=1)).ravel()
    frame["x_nnz"] = np.diff(x.indptr)
    return frame


def same_result(got: Path, want: Path, kind: str) -> None:
    """``got`` holds the collection ``want`` holds: the same bytes (zarr); the same files and
    AnnData contents (h5ad)."""
    if kind == "zarr":
        assert files(got) == files(want)
        return
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for name in sorted(p.name for p in want.glob("*.h5ad")):
        a, b = ad.read_h5ad(got / name), ad.read_h5ad(want / name)
        assert (a.X != b.X).nnz == 0, name
        pd.testing.assert_frame_equal(a.obs, b.obs)


def run(out: Path, paths: list[str], kind: str, hook: Callable[[str], None] | None = None) -> None:
    """Build (two inputs) or append (one) with the write-step ``hook`` set."""
    _build.crash_hook = hook
    try:
        DatasetCollection(out, is_collection_h5ad=kind == "h5ad").add_adatas(
            paths, append=len(paths) == 1, **OPTIONS
        )
    finally:
        _build.crash_hook = None


def steps(out: Path, paths: list[str], kind: str) -> list[str]:
    """The write steps of an uninterrupted build or append into ``out``."""
    seen: list[str] = []
    run(out, paths, kind, seen.append)
    return seen


def write_steps(all_steps: list[str]) -> list[tuple[int, str]]:
    """The steps that write (1-based); deleting needs no space."""
    return [(k, s) for k, s in enumerate(all_steps, start=1) if not s.startswith("delete")]


def check_error(error: BaseException, out: Path) -> None:
    """One line naming the collection's path (or a path in it) and "disk full"; an annbatch
    error and an OSError with ENOSPC, from the operating system's error."""
    text = str(error)
    assert "disk full" in text, text
    assert str(out) in text, text
    assert "\n" not in text, text
    assert isinstance(error, AnnbatchError), type(error)
    assert isinstance(error, OSError), type(error)
    assert error.errno == errno.ENOSPC, repr(error)
    cause = error.__cause__
    assert cause is not None, "the operating system's error is not chained"
    assert "no space left on device" in str(cause).lower(), repr(cause)


def full_from(k: int, fill: Callable[[], None] | None = None) -> Callable[[str], None]:
    """A hook under which the disk is full from the ``k``-th step on: ``fill`` fills a real
    one there, or, without it, every step from there raises ENOSPC."""
    seen = 0

    def hook(step: str) -> None:
        nonlocal seen
        seen += 1
        if seen < k:
            return
        if fill is not None:
            if seen == k:
                try:
                    fill()
                except OSError:  # not the build's write: never to be taken for its error
                    msg = "the test could not fill the disk"
                    raise AssertionError(msg) from None
            return
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), step)

    return hook


def bases(folder: Path, inputs: list[str], kind: str) -> tuple[Path, Path, list[str]]:
    """The finished collection of the first two inputs, a copy with the third appended, and
    the append's steps."""
    base, appended = folder / f"base_{kind}", folder / f"appended_{kind}"
    run(base, inputs[:2], kind)
    shutil.copytree(base, appended)
    return base, appended, steps(appended, inputs[2:], kind)


# ----------------------------------------------------------------- the child on a small disk
def _filler(disk: Path, slack: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Fill ``disk`` to ``slack`` bytes (a file grown until the device is full, then cut
    back); and give the space back."""
    ballast = disk / "ballast"

    def fill() -> None:
        block = b"\0" * 65536
        with open(ballast, "ab", buffering=0) as f:  # unbuffered: nothing left to flush
            try:
                while f.write(block):
                    pass
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            f.truncate(max(0, f.seek(0, os.SEEK_END) - slack))

    def free() -> None:
        ballast.unlink(missing_ok=True)

    return fill, free


def _on_small_disk(disk: Path, plan: dict) -> list[str]:
    """Each build of ``plan`` with the disk filled at each of its chosen write steps."""
    report = []
    inputs = plan["inputs"]
    for kind, phase, todo, want, every, slacks in plan["cases"]:
        want = Path(want)
        before = files(Path(plan["base"][kind]))
        before_rows = rows(Path(plan["base"][kind])) if phase == "append" else None
        chosen = write_steps(plan["steps"][kind][phase])[::every]
        failed = 0
        for n, (k, step) in enumerate(chosen):
            out = disk / "collection"
            if phase == "append":
                shutil.copytree(plan["base"][kind], out)
            slack = slacks[n % len(slacks)]
            fill, free = _filler(disk, slack)
            where = f"{kind} {phase}, disk full at {step!r} (slack {slack})"
            print(where, file=sys.stderr, flush=True)  # the last one names a crash
            try:
                run(out, [inputs[i] for i in todo], kind, full_from(k, fill))
            except OSError as e:
                failed += 1
                check_error(e, out)
                if phase == "append":  # while the disk is still full
                    assert files(out) == before, where
                    pd.testing.assert_frame_equal(rows(out), before_rows)
                else:
                    assert not DatasetCollection(out).is_complete, where
                free()
                run(out, [inputs[i] for i in todo], kind)  # space is back: run it again
            free()
            same_result(out, want, kind)
            shutil.rmtree(out)
        if 0 in slacks:  # a full disk fails the write right after the step
            assert failed >= sum(1 for n in range(len(chosen)) if slacks[n % len(slacks)] == 0)
        report.append(f"{kind} {phase}: {failed} of {len(chosen)} write steps hit a full disk")
    return report


def main() -> None:
    """Mount a tmpfs (in the mount namespace ``unshare`` made), run the plan on it."""
    plan = json.loads(Path(sys.argv[1]).read_text())
    disk = Path(plan["disk"])
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    for line in _on_small_disk(disk, plan):
        print(line)


if __name__ == "__main__":
    main()
