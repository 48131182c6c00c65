"""A process that leaves an epoch mid-way and exits: the read-ahead producer is stopped and
joined by an exit hook before the interpreter's finalization kills daemon threads (a daemon
thread killed inside a compiled decoder can abort the process; issue 24, item 9)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import atexit, threading

    def report():  # registered before annbatch's hook, so it runs after it
        alive = [t.name for t in threading.enumerate() if t.name.startswith("annbatch")]
        print("ALIVE", alive, flush=True)

    atexit.register(report)

    import anndata as ad, numpy as np, scipy.sparse as sp, zarr
    from annbatch import Loader

    X = sp.random(400, 50, density=0.3, format="csr", dtype=np.float32, random_state=0)
    ad.AnnData(X=X).write_zarr({path!r})
    g = zarr.open_group({path!r}, mode="r")
    loader = Loader(
        chunk_size=8, preload_nchunks=4, batch_size=16, shuffle=True, read_ahead={read_ahead},
        to=None, rng=np.random.default_rng(0),
    ).add_anndatas([ad.AnnData(X=ad.io.sparse_dataset(g["X"]))])
    iterator = iter(loader)
    for _ in range({stop_after}):
        next(iterator)
    print("BROKE", flush=True)  # the iterator is neither closed nor dropped: exit holds it
    """
)


@pytest.mark.parametrize("read_ahead", [1, 3])
@pytest.mark.parametrize("stop_after", [1, 5])
def test_exiting_mid_epoch_joins_the_read_ahead_thread(tmp_path, read_ahead, stop_after):
    code = _CHILD.format(
        path=str(tmp_path / "d.zarr"), read_ahead=read_ahead, stop_after=stop_after
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "BROKE" in done.stdout
    assert "ALIVE []" in done.stdout, done.stdout  # no annbatch thread left for finalization
    assert "terminate called" not in done.stderr


_WORKER_CHILD = textwrap.dedent(
    """
    import sys, torch
    from torch.utils.data import DataLoader, IterableDataset
    from annbatch._core.workers import join_queue_feeders_at_exit

    class Tensors(IterableDataset):  # batches made as fast as torch can pickle them
        def __iter__(self):
            join_queue_feeders_at_exit()  # what the Loader does in every DataLoader worker
            while True:
                yield {"X": torch.ones(256, 2000)}

    if __name__ == "__main__":
        for _ in range(int(sys.argv[1])):
            iterator = iter(DataLoader(
                Tensors(), batch_size=None, num_workers=2, multiprocessing_context="spawn",
                prefetch_factor=4,
            ))
            for step, _batch in enumerate(iterator):
                if step == 5:
                    break
            del iterator  # shuts the workers down while they are still sending batches
        print("DONE", flush=True)
    """
)


@pytest.mark.slow
def test_workers_stopped_mid_epoch_do_not_abort(tmp_path):
    """A spawn-started worker told to stop while its queue's feeder thread is still pickling a
    batch (torch copies tensors to shared memory there, in C++ with the GIL released) aborted
    at exit, "terminate called without an active exception": on this machine 3-7 of 10
    rounds without the hook, 0 of 30 with it. The hook joins the feeders before
    finalization."""
    script = tmp_path / "child.py"
    script.write_text(_WORKER_CHILD)
    done = subprocess.run(
        [sys.executable, str(script), "6"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "DONE" in done.stdout
    assert "terminate called" not in done.stderr, done.stderr
    assert "killed by signal" not in done.stderr, done.stderr
