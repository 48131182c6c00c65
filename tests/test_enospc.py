"""A full disk during a build or an append (zarr and h5ad collections).

At every write step (the build's checkpoints, see ``annbatch.collection._build.checkpoint``)
the disk runs out: by an ``OSError(ENOSPC)`` raised there, and, where a small file system can
be mounted (root), for real: a tmpfs filled at that step. Each time the error is one line
that names the path and says "disk full"; a finished collection is afterwards byte for byte
what it was (and reads so while the disk is still full); an interrupted first build, run
again once there is space, ends as an uninterrupted one.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from annbatch import DatasetCollection, Loader
from annbatch.collection import _build

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

OPTIONS = {"dataset_size": 200, "memory_budget": "1MB", "rng": 3, "progress": False}
SIZES = [300, 220, 250]  # the first two build the collection, the third is appended


def _input(path: Path, i: int, n_obs: int) -> str:
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


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("inputs")
    return [_input(folder / f"in{i}.h5ad", i, n) for i, n in enumerate(SIZES)]


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()
    }


def _rows(folder: Path) -> pd.DataFrame:
    """Every row of the collection as the Loader gives it: obs and X, in order."""
    collection = DatasetCollection(folder)
    loader = Loader(batch_size=collection.n_obs, shuffle=False, to=None, return_index=True)
    loader.use_collection(collection)
    batches = list(loader)
    assert len(batches) == 1
    x = batches[0]["X"]
    frame = batches[0]["obs"].reset_index(drop=True)
    frame["x_sum"] = np.asarray(x.sum(axis=1)).ravel()
    frame["x_nnz"] = np.diff(x.indptr)
    return frame


def _same_result(got: Path, want: Path, kind: str) -> None:
    """``got`` holds the collection ``want`` holds: the same bytes (zarr), the same manifest
    and AnnData contents (h5ad files)."""
    if kind == "zarr":
        assert _files(got) == _files(want)
        return
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    for name in sorted(p.name for p in want.glob("*.h5ad")):
        a, b = ad.read_h5ad(got / name), ad.read_h5ad(want / name)
        assert (a.X != b.X).nnz == 0, name
        pd.testing.assert_frame_equal(a.obs, b.obs)


def _run(out: Path, paths: list[str], kind: str, hook: Callable[[str], None] | None = None):
    _build.crash_hook = hook
    try:
        DatasetCollection(out, is_collection_h5ad=kind == "h5ad").add_adatas(
            paths, append=len(paths) == 1, **OPTIONS
        )
    finally:
        _build.crash_hook = None


def _steps(out: Path, paths: list[str], kind: str) -> list[str]:
    steps: list[str] = []
    _run(out, paths, kind, steps.append)
    return steps


def _write_steps(steps: list[str]) -> list[tuple[int, str]]:
    """The steps that write (1-based); deleting needs no space."""
    return [(k, s) for k, s in enumerate(steps, start=1) if not s.startswith("delete")]


def _check_error(error: BaseException, out: Path) -> None:
    from annbatch.errors import AnnbatchError

    text = str(error)
    assert "disk full" in text, text
    assert str(out) in text, text
    assert "\n" not in text, text
    assert isinstance(error, AnnbatchError) and isinstance(error, OSError), type(error)
    assert error.errno == errno.ENOSPC
    cause = error.__cause__
    assert cause is not None and "no space left on device" in str(cause).lower(), repr(cause)


def _full_at(k: int, fill: Callable[[], None] | None = None) -> Callable[[str], None]:
    """A hook that runs out of space at the ``k``-th step: ``fill`` fills the disk there (the
    step's own write then fails), or, without it, the step raises ENOSPC."""
    seen = 0

    def hook(step: str) -> None:
        nonlocal seen
        seen += 1
        if seen != k:
            return
        if fill is not None:
            fill()
            return
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return hook


def _bases(tmp_path: Path, inputs: list[str], kind: str) -> tuple[Path, Path, list[str]]:
    """The finished collection of the first two inputs, and a copy with the third appended."""
    base, appended = tmp_path / f"base_{kind}", tmp_path / f"appended_{kind}"
    _run(base, inputs[:2], kind)
    shutil.copytree(base, appended)
    return base, appended, _steps(appended, inputs[2:], kind)


@pytest.mark.parametrize("kind", ["zarr", "h5ad"])
def test_enospc_at_every_write_step_of_an_append_leaves_the_collection_as_it_was(
    tmp_path, inputs, kind
):
    base, appended, steps = _bases(tmp_path, inputs, kind)
    writes = _write_steps(steps)
    assert len(writes) >= 8, steps
    before, rows = _files(base), _rows(base)
    for k, step in writes:
        out = tmp_path / f"full_{k}"
        shutil.copytree(base, out)
        with pytest.raises(OSError) as caught:
            _run(out, inputs[2:], kind, _full_at(k))
        _check_error(caught.value, out)
        assert _files(out) == before, f"ENOSPC before {step!r}"
        pd.testing.assert_frame_equal(_rows(out), rows)
        _run(out, inputs[2:], kind)  # space is back: the append runs again
        _same_result(out, appended, kind)
        shutil.rmtree(out)


@pytest.mark.parametrize("kind", ["zarr", "h5ad"])
def test_enospc_at_every_write_step_of_a_first_build_then_resumes(tmp_path, inputs, kind):
    reference = tmp_path / "reference"
    writes = _write_steps(_steps(reference, inputs[:2], kind))
    assert len(writes) >= 8
    for k, step in writes:
        out = tmp_path / f"full_{k}"
        with pytest.raises(OSError) as caught:
            _run(out, inputs[:2], kind, _full_at(k))
        _check_error(caught.value, out)
        if out.exists() and any(out.iterdir()):
            assert not DatasetCollection(out).is_complete, step
        _run(out, inputs[:2], kind)  # space is back: the build resumes
        _same_result(out, reference, kind)
        shutil.rmtree(out)


# ------------------------------------------------------------------ a real, small file system
@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MB tmpfs (needs root: skipped elsewhere)."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _filler(disk: Path, slack: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Fill ``disk`` but ``slack`` bytes (a file grown until the device is full, then cut
    back); and give the space back."""
    ballast = disk / "ballast"

    def fill() -> None:
        block = b"\0" * 65536
        with open(ballast, "ab") as f:
            try:
                while True:
                    f.write(block)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                f.truncate(max(0, f.tell() - slack))

    def free() -> None:
        ballast.unlink(missing_ok=True)

    return fill, free


@pytest.mark.parametrize("kind", ["zarr", "h5ad"])
def test_full_small_file_system_at_every_write_step(tmp_path, small_disk, inputs, kind):
    """A tmpfs filled at a write step (to the last byte, or but a few KB: the write then
    fails part way): an append leaves the collection as it was, readable while the disk is
    still full (its rollback writes nothing); a first build resumes once space is back."""
    base, appended, append_steps = _bases(tmp_path, inputs, kind)
    reference = tmp_path / "reference"
    build_steps = _steps(reference, inputs[:2], kind)
    before, rows = _files(base), _rows(base)
    fill, free = _filler(small_disk, 0)
    for phase, steps in (("append", append_steps), ("first build", build_steps)):
        todo, want = (inputs[2:], appended) if phase == "append" else (inputs[:2], reference)
        for k, step in _write_steps(steps):
            out = small_disk / "collection"
            if phase == "append":
                shutil.copytree(base, out)
            fill, free = _filler(small_disk, slack=0 if k % 2 else 3000)
            try:
                _run(out, todo, kind, _full_at(k, fill))
            except OSError as e:
                _check_error(e, out)
                if phase == "append":  # while the disk is still full
                    assert _files(out) == before, f"{phase}: full at {step!r}"
                    pd.testing.assert_frame_equal(_rows(out), rows)
                free()
                _run(out, todo, kind)
            free()
            _same_result(out, want, kind)
            shutil.rmtree(out)
