"""Building a collection: shuffle the rows of many inputs across datasets, in bounded memory.

Two passes, each within the memory budget:

1. **Distribute.** Every input row is given a dataset at random (balanced, from the seed).
   Inputs are read in order, a block of rows at a time; each block's rows are aligned to the
   collection's genes and appended to their dataset's bucket: plain files in a scratch folder.
2. **Write.** Each bucket is loaded (a dataset is at most a budget's worth of rows), its rows
   are put in a random order, and it is written as one sharded zarr dataset with its obs.

So every input is read once, sequentially, and no more than one block or one dataset is in
memory at a time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from annbatch.collection._inputs import SOURCE_COLUMN, align_rows, column_map
from annbatch.collection._layout import write_dataset

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    import zarr

    from annbatch.collection._inputs import Input
    from annbatch.collection._layout import Compression

_WORKING_COPIES = 6
"""Copies of a block (or dataset) alive at once while it is aligned, reordered and written."""


@dataclass(frozen=True)
class BuildPlan:
    """What a build writes: sizes derived from the inputs and the memory budget."""

    n_obs: int
    bytes_per_row: float
    rows_per_dataset: int
    rows_per_block: int

    @property
    def n_datasets(self) -> int:
        return -(-self.n_obs // self.rows_per_dataset)


def plan_build(
    inputs: Sequence[Input], n_var: int, dataset_size: int, memory_budget: int
) -> BuildPlan:
    """Sizes of datasets and read blocks that keep the build within ``memory_budget`` bytes."""
    n_obs = sum(inp.n_obs for inp in inputs)
    itemsize = inputs[0].dtype.itemsize
    if inputs[0].sparse:
        nnz = sum(_nnz(inp) for inp in inputs)
        bytes_per_row = nnz / max(1, n_obs) * (itemsize + 8) + 16
    else:
        bytes_per_row = float(n_var * itemsize + 8)
    fits = max(1, int(memory_budget / (_WORKING_COPIES * bytes_per_row)))
    return BuildPlan(
        n_obs=n_obs,
        bytes_per_row=bytes_per_row,
        rows_per_dataset=max(1, min(dataset_size, fits)),
        rows_per_block=fits,
    )


def _nnz(inp: Input) -> int:
    x = inp.x
    if hasattr(x, "nnz"):
        return int(x.nnz)
    return int(x.group["indptr"][-1])  # anndata CSRDataset: the last indptr entry


def assign_datasets(n_obs: int, rows_per_dataset: int, rng: np.random.Generator) -> np.ndarray:
    """A random, balanced dataset number for every row (first ``rows_per_dataset`` each)."""
    n_datasets = -(-n_obs // rows_per_dataset)
    dtype = np.uint16 if n_datasets < 2**16 else np.uint32
    sizes = np.full(n_datasets, rows_per_dataset)
    sizes[-1] = n_obs - rows_per_dataset * (n_datasets - 1)
    ids = np.repeat(np.arange(n_datasets, dtype=dtype), sizes)
    rng.shuffle(ids)
    return ids


class _Bucket:
    """The rows of one dataset-to-be, appended to plain files as blocks are read."""

    def __init__(self, folder: Path, *, sparse: bool) -> None:
        self.folder = folder
        self.sparse = sparse
        folder.mkdir(parents=True, exist_ok=True)

    def append(self, rows: Any, ids: np.ndarray) -> None:
        with open(self.folder / "ids", "ab") as f:
            ids.astype(np.int64).tofile(f)
        if self.sparse:
            with open(self.folder / "nnz", "ab") as f:
                np.diff(rows.indptr).astype(np.int64).tofile(f)
            with open(self.folder / "data", "ab") as f:
                rows.data.tofile(f)
            with open(self.folder / "indices", "ab") as f:
                rows.indices.astype(np.int32).tofile(f)
        else:
            with open(self.folder / "x", "ab") as f:
                np.ascontiguousarray(rows).tofile(f)

    def load(self, dtype: np.dtype, n_var: int) -> tuple[Any, np.ndarray]:
        ids = np.fromfile(self.folder / "ids", dtype=np.int64)
        if self.sparse:
            nnz = np.fromfile(self.folder / "nnz", dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(nnz)])
            data = np.fromfile(self.folder / "data", dtype=dtype)
            indices = np.fromfile(self.folder / "indices", dtype=np.int32)
            return sp.csr_matrix((data, indices, indptr), shape=(ids.size, n_var)), ids
        x = np.fromfile(self.folder / "x", dtype=dtype).reshape(ids.size, n_var)
        return x, ids


def union_obs(inputs: Sequence[Input]) -> pd.DataFrame:
    """All inputs' obs, one after another: union of columns (NA where missing), plus the
    ``source_file`` column."""
    frames = []
    categorical: set[str] = set()
    for inp in inputs:
        obs = inp.obs.copy()
        categorical.update(c for c in obs.columns if isinstance(obs[c].dtype, pd.CategoricalDtype))
        obs[SOURCE_COLUMN] = inp.name
        frames.append(obs)
    obs = pd.concat(frames, axis=0, join="outer") if len(frames) > 1 else frames[0]
    for column in [*categorical, SOURCE_COLUMN]:
        obs[column] = obs[column].astype("category")
    obs.index = obs.index.astype(str)
    return obs


def distribute(
    inputs: Sequence[Input],
    var_names: pd.Index,
    plan: BuildPlan,
    assignment: np.ndarray,
    scratch: Path,
    progress: Callable[[int], None],
) -> None:
    """Pass 1: read every input once, in blocks, and append each row to its dataset's bucket."""
    buckets = [
        _Bucket(scratch / f"{k:06d}", sparse=inputs[0].sparse) for k in range(plan.n_datasets)
    ]
    first_row = 0
    for inp in inputs:
        mapping = column_map(inp, var_names)
        for lo in range(0, inp.n_obs, plan.rows_per_block):
            hi = min(inp.n_obs, lo + plan.rows_per_block)
            rows = align_rows(inp.x[lo:hi], mapping, len(var_names))
            ids = np.arange(first_row + lo, first_row + hi, dtype=np.int64)
            owner = assignment[first_row + lo : first_row + hi]
            order = np.argsort(owner, kind="stable")
            bounds = np.flatnonzero(np.diff(owner[order])) + 1
            for part in np.split(order, bounds):
                buckets[int(owner[part[0]])].append(rows[part], ids[part])
            progress(hi - lo)
        first_row += inp.n_obs


def write_datasets(
    root: zarr.Group,
    names: Sequence[str],
    obs: pd.DataFrame,
    var_names: pd.Index,
    dtype: np.dtype,
    scratch: Path,
    rng: np.random.Generator,
    on_written: Callable[[str, int], None],
    *,
    sparse: bool,
    skip: set[str],
    compression: Compression,
) -> None:
    """Pass 2: shuffle each bucket's rows and write it as a dataset, then delete the bucket."""
    for k, name in enumerate(names):
        order_rng = np.random.default_rng(rng.integers(2**63))  # same stream on resume
        if name in skip:
            continue
        bucket = _Bucket(scratch / f"{k:06d}", sparse=sparse)
        x, ids = bucket.load(dtype, len(var_names))
        order = order_rng.permutation(ids.size)
        x, ids = x[order], ids[order]
        if name in root:
            del root[name]  # a dataset left half-written by an interrupted build
        write_dataset(root.create_group(name), x, obs.iloc[ids], var_names, compression)
        shutil.rmtree(bucket.folder)
        on_written(name, int(ids.size))


def progress_bar(total: int, desc: str, *, show: bool) -> tqdm:
    """A tqdm bar counting rows (with rows/s), or a silent one when not ``show``."""
    return tqdm(
        total=total, desc=desc, unit=" rows", unit_scale=True, smoothing=0.1, disable=not show
    )
