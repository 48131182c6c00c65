"""A full disk during a build or an append (zarr and h5ad collections).

At every write step (the build's checkpoints, see ``annbatch.collection._build.checkpoint``)
the disk runs out: by an ``OSError(ENOSPC)`` raised there and at every later step, and, where
``unshare`` can make a mount namespace, for real: a 4 MB tmpfs filled at that step. Each time
the error is one line that names the path and says "disk full"; a finished collection is
afterwards byte for byte what it was (and reads so while the disk is still full); an
interrupted first build, run again once there is space, ends as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tests._enospc_child import (
    SIZES,
    bases,
    check_error,
    files,
    full_from,
    make_input,
    rows,
    run,
    same_result,
    steps,
    write_steps,
)

from annbatch import DatasetCollection

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("inputs")
    return [make_input(folder / f"in{i}.h5ad", i, n) for i, n in enumerate(SIZES)]


@pytest.mark.parametrize("kind", ["zarr", "h5ad"])
def test_enospc_at_every_write_step_of_an_append_leaves_the_collection_as_it_was(
    tmp_path, inputs, kind
):
    base, appended, append_steps = bases(tmp_path, inputs, kind)
    writes = write_steps(append_steps)
    assert len(writes) >= 8, append_steps
    before, before_rows = files(base), rows(base)
    for n, (k, step) in enumerate(writes):
        out = tmp_path / f"full_{k}"
        shutil.copytree(base, out)
        with pytest.raises(OSError, match="disk full") as caught:
            run(out, inputs[2:], kind, full_from(k))
        check_error(caught.value, out)
        assert files(out) == before, f"ENOSPC from {step!r} on"
        if n % 3 == 0:  # (reading and appending again take time: some of the steps)
            pd.testing.assert_frame_equal(rows(out), before_rows)
            run(out, inputs[2:], kind)  # space is back: the append runs again
            same_result(out, appended, kind)
        shutil.rmtree(out)


@pytest.mark.parametrize("kind", ["zarr", "h5ad"])
def test_enospc_at_every_write_step_of_a_first_build_then_resumes(tmp_path, inputs, kind):
    reference = tmp_path / "reference"
    writes = write_steps(steps(reference, inputs[:2], kind))
    assert len(writes) >= 8
    for k, step in writes:
        out = tmp_path / f"full_{k}"
        with pytest.raises(OSError, match="disk full") as caught:
            run(out, inputs[:2], kind, full_from(k))
        check_error(caught.value, out)
        if out.exists() and any(out.iterdir()):
            assert not DatasetCollection(out).is_complete, step
        run(out, inputs[:2], kind)  # space is back: the build resumes
        same_result(out, reference, kind)
        shutil.rmtree(out)


def _namespace() -> list[str]:
    """The command prefix that runs a process in a mount namespace of its own (where it may
    mount a tmpfs); skips the test where there is none."""
    unshare = shutil.which("unshare")
    if sys.platform != "linux" or unshare is None:
        pytest.skip("needs Linux's unshare")
    prefix = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")  # an unprivileged user namespace
    probe = subprocess.run(
        [*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/tmp"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode().strip()}")
    return prefix


def test_full_small_file_system_at_write_steps(tmp_path, inputs):
    """On a real 4 MB tmpfs, filled at a write step (to the last byte, or to a few KB: the
    write then fails part way), in a child process: an append leaves the collection as it
    was, readable while the disk is still full (its rollback needs no space), at every write
    step; a first build resumes once space is back (every other step)."""
    prefix = _namespace()
    plan: dict = {"disk": str(tmp_path / "disk"), "inputs": inputs, "base": {}, "steps": {}}
    plan["cases"] = []
    for kind in ("zarr", "h5ad"):
        base, appended, append_steps = bases(tmp_path, inputs, kind)
        reference = tmp_path / f"reference_{kind}"
        plan["base"][kind] = str(base)
        plan["steps"][kind] = {
            "append": append_steps,
            "first build": steps(reference, inputs[:2], kind),
        }
        plan["cases"] += [
            (kind, "append", [2], str(appended), 1, [0, 0, 3000]),
            (kind, "first build", [0, 1], str(reference), 2, [0, 5000]),
        ]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    child = subprocess.run(
        [*prefix, sys.executable, "-m", "tests._enospc_child", str(tmp_path / "plan.json")],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stdout + child.stderr[-6000:]
    print(child.stdout)
