"""Crash safety of collection builds: a build killed (SIGKILL) before any one of its write
steps, then run again, gives the same bytes as a build that was never interrupted; until
then, the collection never reads as complete.

The write steps are the build's checkpoints (``annbatch.collection._build.checkpoint``): every
manifest write, every bucket append of pass 1, every dataset written (and between its X and
its obs), every scratch deletion. The children are real processes, forked from a server that
has annbatch imported already.
"""

from __future__ import annotations

import shutil
import signal
import warnings
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from tests import _build_child

from annbatch import DatasetCollection, Loader
from annbatch.collection import _build
from annbatch.errors import IncompleteCollectionError

from conftest import worker_context

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.slow

OPTIONS = {"dataset_size": 450, "memory_budget": "1MB", "rng": 5}


def _input(path: Path, i: int, n_obs: int) -> str:
    rng = np.random.default_rng(i)
    x = sp.random(n_obs, 200, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T", "B", f"only{i}"], n_obs)),
            "n_counts": rng.integers(0, 1000, n_obs),
            **(
                {"flag": rng.random(n_obs) < 0.5}
                if i % 2
                else {"note": [f"n{k}" for k in range(n_obs)]}
            ),
        },
        index=[f"in{i}_c{k}" for k in range(n_obs)],
    )
    var = pd.DataFrame(index=[f"g{j}" for j in range(i % 2, 200 + i % 2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ad.AnnData(X=x, obs=obs, var=var).write_h5ad(path)
    return str(path)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()
    }


def _steps(out: Path, inputs: list[str], **extra) -> list[str]:
    """The checkpoints of an uninterrupted build, in order (run in this process)."""
    steps: list[str] = []
    _build.crash_hook = steps.append
    try:
        DatasetCollection(out).add_adatas(inputs, progress=False, **OPTIONS, **extra)
    finally:
        _build.crash_hook = None
    return steps


@pytest.fixture(scope="module")
def fork():
    return worker_context("forkserver")


def _run(fork, out: Path, inputs: list[str], kill_at: int | None, **extra) -> int:
    process = fork.Process(
        target=_build_child.build, args=(str(out), inputs, {**OPTIONS, **extra}, kill_at)
    )
    process.start()
    process.join(120)
    assert process.exitcode is not None, "the build hung"
    return process.exitcode


@pytest.mark.parametrize("phase", ["first build", "append"])
def test_killed_at_every_write_step_then_resumed_equals_uninterrupted(tmp_path, fork, phase):
    inputs = [_input(tmp_path / f"in{i}.h5ad", i, n) for i, n in enumerate([700, 500, 600])]
    first, added = inputs[:2], inputs[2:]
    base = tmp_path / "base.zarr"  # the collection an append starts from
    _steps(base, first)
    reference = tmp_path / "reference.zarr"
    if phase == "first build":
        steps = _steps(reference, first)
        todo, extra = first, {}
    else:
        shutil.copytree(base, reference)
        steps = _steps(reference, added, append=True)
        todo, extra = added, {"append": True}
    expected = _files(reference)
    before = _files(base) if phase == "append" else {}
    kinds = {step.split(" ")[0].rstrip(":") for step in steps}
    assert {"manifest", "distribute", "write", "delete"} <= kinds, steps
    assert len(steps) >= 12
    for k, step in enumerate(steps, start=1):
        out = tmp_path / f"killed_{k}.zarr"
        if phase == "append":
            shutil.copytree(base, out)
        assert _run(fork, out, todo, kill_at=k, **extra) == -signal.SIGKILL, step
        untouched = _files(out) == before if out.exists() else True
        if not untouched:  # something was written: the collection must not read as complete
            collection = DatasetCollection(out)
            assert not collection.is_complete, step
            with pytest.raises(IncompleteCollectionError):
                Loader().use_collection(collection)
        assert _run(fork, out, todo, kill_at=None, **extra) == 0, step
        assert _files(out) == expected, f"killed before {step!r}"
        shutil.rmtree(out)


def _h5ad_contents(folder: Path) -> dict[str, ad.AnnData]:
    return {f.name: ad.read_h5ad(f) for f in sorted(folder.glob("*.h5ad"))}


def test_h5ad_collection_killed_then_resumed_equals_uninterrupted(tmp_path, fork):
    """An h5ad collection is built as a zarr one, then converted file by file: killed before
    any conversion step (and some build steps), it resumes to the same datasets."""
    inputs = [_input(tmp_path / f"in{i}.h5ad", i, n) for i, n in enumerate([700, 500])]
    reference = tmp_path / "reference"
    steps: list[str] = []
    _build.crash_hook = steps.append
    try:
        DatasetCollection(reference, is_collection_h5ad=True).add_adatas(
            inputs, progress=False, **OPTIONS
        )
    finally:
        _build.crash_hook = None
    expected = _h5ad_contents(reference)
    assert len(expected) == 3
    convert = [k for k, s in enumerate(steps, start=1) if "h5ad" in s]
    assert len(convert) == 5, steps  # 3 conversions, the manifest, the scratch deletion
    for k in sorted({*convert, *range(1, convert[0], 7)}):
        out = tmp_path / f"killed_{k}"
        extra = {"is_collection_h5ad": True}
        assert _run(fork, out, inputs, kill_at=k, **extra) == -signal.SIGKILL, steps[k - 1]
        collection = DatasetCollection(out, is_collection_h5ad=True)
        assert not collection.is_complete or steps[k - 1].startswith("delete"), steps[k - 1]
        assert _run(fork, out, inputs, kill_at=None, **extra) == 0, steps[k - 1]
        got = _h5ad_contents(out)
        assert list(got) == list(expected)
        for name, adata in got.items():
            want = expected[name]
            assert (adata.X != want.X).nnz == 0
            pd.testing.assert_frame_equal(adata.obs, want.obs)
        assert not (out / "_annbatch_build.zarr").exists()
        shutil.rmtree(out)


def test_h5ad_append_killed_then_resumed_equals_uninterrupted(tmp_path, fork):
    """An append to an h5ad collection: killed at a write step, the collection reads as it was
    until the new manifest is written; the same call again finishes the append."""
    inputs = [_input(tmp_path / f"in{i}.h5ad", i, n) for i, n in enumerate([700, 500, 600])]
    h5ad_options = {**OPTIONS, "is_collection_h5ad": True}
    base = tmp_path / "base"
    assert _run(fork, base, inputs[:2], kill_at=None, **h5ad_options) == 0
    before = _h5ad_contents(base)
    reference = tmp_path / "reference"
    shutil.copytree(base, reference)
    steps: list[str] = []
    _build.crash_hook = steps.append
    try:
        DatasetCollection(reference).add_adatas(inputs[2:], progress=False, append=True, **OPTIONS)
    finally:
        _build.crash_hook = None
    expected = _h5ad_contents(reference)
    assert len(expected) == len(before) + 2
    assert steps[0] == "begin h5ad append", steps
    manifest = steps.index("manifest: h5ad") + 1
    for k in sorted({1, *range(2, len(steps) + 1, 6), manifest - 2, manifest - 1, manifest}):
        out = tmp_path / f"killed_{k}"
        shutil.copytree(base, out)
        options = {**h5ad_options, "append": True}
        assert _run(fork, out, inputs[2:], kill_at=k, **options) == -signal.SIGKILL, steps[k - 1]
        collection = DatasetCollection(out)
        if k <= manifest:  # the old manifest: readers see the collection as it was
            assert collection.n_obs == 1200, steps[k - 1]
            assert len(Loader(batch_size=1200, to=None).use_collection(collection)) == 1
        assert _run(fork, out, inputs[2:], kill_at=None, **options) == 0, steps[k - 1]
        got = _h5ad_contents(out)
        assert list(got) == list(expected), steps[k - 1]
        for name, adata in got.items():
            want = expected[name]
            assert (adata.X != want.X).nnz == 0
            pd.testing.assert_frame_equal(adata.obs, want.obs)
        assert not (out / "_annbatch_build.zarr").exists()
        assert DatasetCollection(out).n_obs == 1800
        shutil.rmtree(out)
