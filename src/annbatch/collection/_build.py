"""Building a collection: shuffle the rows of many inputs across datasets, in bounded memory.

Two passes, each within the memory budget:

1. **Distribute.** Every input row is given a dataset at random (balanced, from the seed).
   Inputs are read in order: obs one column at a time, X a block of rows at a time; each
   block's rows are aligned to the collection's genes, each column converted to the
   collection's type, and appended to their dataset's bucket: plain files in a scratch folder.
2. **Write.** Each bucket is loaded (a dataset is at most a budget's worth of rows), its rows
   are put in a random order, and it is written as one sharded zarr dataset with its obs.

So every input is read once, sequentially, and no more than one block, one obs column or one
dataset is in memory at a time. Pass 1 also hashes what it reads: each input's content
fingerprint (:mod:`annbatch.collection._fingerprint`) costs no read of its own.

Every write step (a bucket append, a dataset, a scratch deletion; the caller's manifest writes)
is preceded by :func:`checkpoint`, where the crash-safety tests kill the build. The order of the
steps makes any prefix of them resumable: a dataset is recorded before its bucket is deleted,
and an unrecorded dataset is rewritten from its bucket.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from annbatch._args import parse_size
from annbatch.collection._disk import naming
from annbatch.collection._fingerprint import ContentDigest, X
from annbatch.collection._inputs import SOURCE_COLUMN, align_rows, column_map
from annbatch.collection._layout import write_dataset
from annbatch.collection._obs import (
    STRING,
    ColumnType,
    decode,
    encode,
    encode_missing,
    encode_strings,
    part_dtypes,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import zarr

    from annbatch.collection._inputs import ElementSpec, Input
    from annbatch.collection._layout import Compression, XLayout
    from annbatch.collection._obs import ObsSchema

crash_hook: Callable[[str], None] | None = None
"""Called by :func:`checkpoint` when set: the crash-safety tests kill the process from it."""


def checkpoint(step: str) -> None:
    """Mark the point before a write step of a build (see the module docstring)."""
    if crash_hook is not None:
        crash_hook(step)


_WORKING_COPIES = 6
"""Copies of a block (or dataset) of X alive at once while it is aligned, reordered and written."""
_OBS_COPIES = 3
"""Copies of a dataset's obs alive at once: decoded, reordered, converted by anndata to write."""


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
    inputs: Sequence[Input],
    n_var: int,
    dataset_size: int | str,
    memory_budget: int,
    obs_bytes: float = 0.0,
    elements: Sequence[ElementSpec] = (),
) -> BuildPlan:
    """Sizes of datasets and read blocks that keep the build within ``memory_budget`` bytes
    (``obs_bytes``: an estimate of a row's obs in memory, see
    :func:`~annbatch.collection._obs.obs_bytes_per_row`)."""
    n_obs = sum(inp.n_obs for inp in inputs)
    x_dtype = inputs[0].dtype
    if x_dtype is None:  # no X: the row ids, then the carried elements
        bytes_per_row = 8.0
    elif inputs[0].sparse:
        nnz = sum(_nnz(inp) for inp in inputs)
        bytes_per_row = nnz / max(1, n_obs) * (x_dtype.itemsize + 8) + 16
    else:
        bytes_per_row = float(n_var * x_dtype.itemsize + 8)
    for spec in elements:  # layers and obsm travel with their rows
        size = spec.dtype.itemsize
        if spec.sparse:  # about X's density (layers); obsm CSR is rare
            per_row = (_nnz_all(inputs) / max(1, n_obs)) if inputs[0].sparse else n_var
            bytes_per_row += per_row * (size + 8) + 8
        else:
            width = n_var if spec.is_layer else int(np.prod(spec.tail, dtype=np.int64))
            bytes_per_row += float(width * size)
    fits = max(1, int(memory_budget / (_WORKING_COPIES * bytes_per_row + _OBS_COPIES * obs_bytes)))
    if isinstance(dataset_size, str):  # a size of X: rows from the mean row's bytes
        dataset_size = max(1, int(parse_size(dataset_size, "dataset_size") / bytes_per_row))
    return BuildPlan(
        n_obs=n_obs,
        bytes_per_row=bytes_per_row,
        rows_per_dataset=max(1, min(dataset_size, fits)),
        rows_per_block=fits,
    )


def _nnz_all(inputs: Sequence[Input]) -> int:
    return sum(_nnz(inp) for inp in inputs)


def _nnz(inp: Input) -> int:
    x = inp.x
    if hasattr(x, "nnz"):
        return int(x.nnz)
    return int(x.group["indptr"][-1])  # anndata CSRDataset: the last indptr entry


def assign_datasets(
    n_obs: int,
    rows_per_dataset: int,
    rng: np.random.Generator,
    *,
    shuffle: bool = True,
    block: int = 1,
) -> np.ndarray:
    """A dataset number for every row: random and balanced (``rows_per_dataset`` each, the
    last fewer), runs of ``block`` consecutive rows going to one dataset together; or, without
    ``shuffle``, the rows in order."""
    n_datasets = -(-n_obs // rows_per_dataset)
    dtype = np.uint16 if n_datasets < 2**16 else np.uint32
    sizes = np.full(n_datasets, rows_per_dataset)
    sizes[-1] = n_obs - rows_per_dataset * (n_datasets - 1)
    ids = np.repeat(np.arange(n_datasets, dtype=dtype), sizes)
    if not shuffle:
        return ids
    if block == 1:
        rng.shuffle(ids)
        return ids
    # Whole blocks in a random order, one after another, fill the datasets (a block at a
    # dataset's end continues in the next one): every dataset gets exactly its rows.
    n_blocks = -(-n_obs // block)
    order = rng.permutation(n_blocks)
    lengths = np.full(n_blocks, block, dtype=np.int64)
    lengths[-1] = n_obs - block * (n_blocks - 1)
    begins = np.empty(n_blocks, dtype=np.int64)  # where each block lands in the sequence
    begins[order] = np.cumsum(lengths[order]) - lengths[order]
    out = np.empty(n_obs, dtype=dtype)
    step = 1 << 22  # rows at a time: bounded memory for any number of rows
    for lo in range(0, n_obs, step):
        rows = np.arange(lo, min(n_obs, lo + step), dtype=np.int64)
        b = rows // block
        out[lo : lo + rows.size] = (begins[b] + rows - b * block) // rows_per_dataset
    return out


@dataclass(frozen=True)
class RowOrder:
    """How the rows of one dataset are ordered when it is written."""

    shuffle: bool = True
    """A random order (else the inputs' order)."""
    block: int = 1
    """Runs of this many consecutive input rows stay together when shuffled."""
    groupby: list[str] = field(default_factory=list)
    """obs columns the rows are then sorted by (stably)."""

    def order(self, ids: np.ndarray, obs: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
        """Positions of the dataset's rows (global row ``ids``, their ``obs``) in write order."""
        if not self.shuffle:
            order = np.argsort(ids, kind="stable")
        elif self.block == 1:
            order = rng.permutation(ids.size)
        else:
            blocks, inverse = np.unique(ids // self.block, return_inverse=True)
            rank = rng.permutation(blocks.size)[inverse]
            order = np.lexsort((ids, rank))
        if self.groupby:
            by = obs.iloc[order][self.groupby].reset_index(drop=True)
            order = order[by.sort_values(self.groupby, kind="stable").index.to_numpy()]
        return order


class _Bucket:
    """The rows of one dataset-to-be, appended to plain files as inputs are read: X, the rows'
    ids, each obs column (the obs names as column ``index``) in fixed-width parts, and each
    carried element (layers, obsm) under its own prefix.

    ``sparse``: X is CSR, dense, or (None) absent."""

    def __init__(
        self, folder: Path, *, sparse: bool | None, elements: Sequence[ElementSpec] = ()
    ) -> None:
        self.folder = folder
        self.sparse = sparse
        self.elements = list(elements)

    def _append(self, name: str, array: np.ndarray) -> None:
        # Python's write, not numpy's tofile: on a full disk it raises ENOSPC (tofile says
        # only "N requested and M written").
        with naming(self.folder / name):
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / name, "ab") as f:
                f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)

    def _append_rows(self, prefix: str, rows: Any, *, sparse: bool) -> None:
        if sparse:
            self._append(f"{prefix}nnz", np.diff(rows.indptr).astype(np.int64))
            self._append(f"{prefix}data", rows.data)
            self._append(f"{prefix}indices", rows.indices.astype(np.int32))
        else:
            self._append(f"{prefix}x", rows)

    def append(self, rows: Any, ids: np.ndarray, elements: Sequence[Any] = ()) -> None:
        self._append("ids", ids.astype(np.int64))
        if self.sparse is not None:
            self._append_rows("", rows, sparse=self.sparse)
        for k, (spec, part) in enumerate(zip(self.elements, elements, strict=True)):
            self._append_rows(f"e{k}_", part, sparse=spec.sparse)

    def append_obs(self, column: int | str, parts: Sequence[np.ndarray]) -> None:
        for p, part in enumerate(parts):
            self._append(f"obs_{column}.{p}", part)

    def _load_rows(
        self, prefix: str, dtype: np.dtype, n_rows: int, tail: tuple[int, ...], *, sparse: bool
    ) -> Any:
        if sparse:
            nnz = np.fromfile(self.folder / f"{prefix}nnz", dtype=np.int64)
            indptr = np.concatenate([[0], np.cumsum(nnz)])
            data = np.fromfile(self.folder / f"{prefix}data", dtype=dtype)
            indices = np.fromfile(self.folder / f"{prefix}indices", dtype=np.int32)
            return sp.csr_matrix((data, indices, indptr), shape=(n_rows, *tail))
        return np.fromfile(self.folder / f"{prefix}x", dtype=dtype).reshape(n_rows, *tail)

    def load(self, dtype: np.dtype | None, n_var: int) -> tuple[Any, np.ndarray]:
        """(X's rows or None without X, the rows' ids), in bucket order."""
        ids = np.fromfile(self.folder / "ids", dtype=np.int64)
        if self.sparse is None or dtype is None:
            return None, ids
        return self._load_rows("", dtype, ids.size, (n_var,), sparse=self.sparse), ids

    def load_elements(self, n_rows: int, n_var: int) -> dict[str, Any]:
        """Each carried element's rows, in bucket order."""
        return {
            spec.path: self._load_rows(
                f"e{k}_",
                spec.dtype,
                n_rows,
                (n_var,) if spec.is_layer else spec.tail,
                sparse=spec.sparse,
            )
            for k, spec in enumerate(self.elements)
        }

    def load_obs(self, column: int | str, t: ColumnType) -> Any:
        parts = []
        for p, dtype in enumerate(part_dtypes(t)):
            path = self.folder / f"obs_{column}.{p}"
            parts.append(np.fromfile(path, dtype=dtype) if path.exists() else np.empty(0, dtype))
        return decode(parts, t)


def _scatter(owner: np.ndarray) -> list[np.ndarray]:
    """Positions of ``owner`` grouped by value (ascending within each), in value order."""
    if owner.size == 0:
        return []
    order = np.argsort(owner, kind="stable")
    bounds = np.flatnonzero(np.diff(owner[order])) + 1
    return np.split(order, bounds)


def distribute(
    inputs: Sequence[Input],
    var_names: pd.Index,
    schema: ObsSchema,
    plan: BuildPlan,
    assignment: np.ndarray,
    scratch: Path,
    progress: Callable[[int], None],
    elements: Sequence[ElementSpec] = (),
) -> list[str]:
    """Pass 1: read every input once (obs a column at a time, X and the carried elements in
    blocks) and append each row to its dataset's bucket. Returns each input's content
    fingerprint (see :mod:`annbatch.collection._fingerprint`), hashed from what was read."""
    buckets = [
        _Bucket(scratch / f"{k:06d}", sparse=_x_kind(inputs[0]), elements=elements)
        for k in range(plan.n_datasets)
    ]
    fingerprints = []
    first_row = 0
    for i, inp in enumerate(inputs):
        digest = ContentDigest(inp, [spec.path for spec in elements])
        owner = assignment[first_row : first_row + inp.n_obs]
        groups = _scatter(owner)
        checkpoint(f"distribute obs of input {i}")
        index = encode_strings(inp.obs.index())
        digest.index(index)
        _distribute_column(buckets, owner, groups, "index", index, strings=True)
        for j, (column, t) in enumerate(schema.types.items()):
            if column in inp.obs.columns:
                values = inp.obs.column(column)
                digest.column(column, values)
                parts = encode(values, t)
            else:
                parts = encode_missing(t, inp.n_obs)
            _distribute_column(buckets, owner, groups, j, parts, strings=t.kind == "string")
        mapping = column_map(inp, var_names)
        for lo in range(0, inp.n_obs, plan.rows_per_block):
            hi = min(inp.n_obs, lo + plan.rows_per_block)
            checkpoint(f"distribute rows {lo}:{hi} of input {i}")
            rows = None
            if inp.has_x:
                read = inp.x[lo:hi]
                digest.rows(X, read)
                rows = align_rows(read, mapping, len(var_names))
            ids = np.arange(first_row + lo, first_row + hi, dtype=np.int64)
            extra = [
                _element_rows(inp, spec, lo, hi, mapping, len(var_names), digest)
                for spec in elements
            ]
            for part in _scatter(owner[lo:hi]):
                buckets[int(owner[lo + part[0]])].append(
                    None if rows is None else rows[part], ids[part], [e[part] for e in extra]
                )
            progress(hi - lo)
        fingerprints.append(digest.hexdigest())
        first_row += inp.n_obs
    return fingerprints


def _x_kind(inp: Input) -> bool | None:
    """What a bucket holds of X: sparse (True), dense (False) or nothing (None)."""
    return inp.sparse if inp.has_x else None


def _element_rows(
    inp: Input,
    spec: ElementSpec,
    lo: int,
    hi: int,
    mapping: np.ndarray | None,
    n_var: int,
    digest: ContentDigest,
) -> Any:
    """Rows ``lo:hi`` of one carried element (a layer aligned to the collection's genes),
    fed to the input's ``digest`` as read."""
    rows = inp.elements[spec.path][lo:hi]
    digest.rows(spec.path, rows)
    rows = sp.csr_matrix(rows) if spec.sparse else np.asarray(rows)
    return align_rows(rows, mapping, n_var) if spec.is_layer else rows


def _distribute_column(
    buckets: Sequence[_Bucket],
    owner: np.ndarray,
    groups: Sequence[np.ndarray],
    column: int | str,
    parts: Sequence[np.ndarray],
    *,
    strings: bool,
) -> None:
    """Append each bucket's values of one encoded column (``strings``: lengths, then bytes)."""
    if strings:
        lengths, blob = parts
        ends = np.cumsum(np.maximum(lengths, 0))
        starts = ends - np.maximum(lengths, 0)
        for rows in groups:
            pieces = [
                blob[a:b] for a, b in zip(starts[rows].tolist(), ends[rows].tolist(), strict=True)
            ]
            data = np.concatenate(pieces) if pieces else np.empty(0, np.uint8)
            buckets[int(owner[rows[0]])].append_obs(column, [lengths[rows], data])
        return
    for rows in groups:
        buckets[int(owner[rows[0]])].append_obs(column, [part[rows] for part in parts])


def write_datasets(
    root: zarr.Group,
    names: Sequence[str],
    schema: ObsSchema,
    sources: Sequence[str],
    offsets: np.ndarray,
    var_names: pd.Index,
    dtype: np.dtype | None,
    scratch: Path,
    rng: np.random.Generator,
    on_written: Callable[[str, int], None],
    *,
    sparse: bool | None,
    skip: set[str],
    compression: Compression,
    order: RowOrder = RowOrder(),
    layout: XLayout | None = None,
    elements: Sequence[ElementSpec] = (),
    var: pd.DataFrame | None = None,
) -> None:
    """Pass 2: shuffle each bucket's rows and write it as a dataset with its obs (the
    ``src_path`` column from ``sources``, the inputs' names, and ``offsets``, their first
    row ids); record it (``on_written``), then delete the bucket. ``dtype`` and ``sparse``
    describe X (both None: the inputs have no X)."""
    source_dtype = pd.CategoricalDtype(list(dict.fromkeys(sources)))
    source_codes = source_dtype.categories.get_indexer(list(sources))
    for k, name in enumerate(names):
        order_rng = np.random.default_rng(rng.integers(2**63))  # same stream on resume
        bucket = _Bucket(scratch / f"{k:06d}", sparse=sparse, elements=elements)
        if name in skip:
            if bucket.folder.exists():  # recorded, then interrupted before the deletion
                checkpoint(f"delete bucket {k}")
                shutil.rmtree(bucket.folder)
            continue
        x, ids = bucket.load(dtype, len(var_names))
        columns = {
            column: bucket.load_obs(j, t) for j, (column, t) in enumerate(schema.types.items())
        }
        obs = pd.DataFrame(columns, index=pd.Index(bucket.load_obs("index", STRING), dtype=object))
        obs[SOURCE_COLUMN] = pd.Categorical.from_codes(
            source_codes[np.searchsorted(offsets, ids, side="right") - 1], dtype=source_dtype
        )
        positions = order.order(ids, obs, order_rng)
        x = None if x is None else x[positions]
        obs = obs.iloc[positions]
        loaded = bucket.load_elements(ids.size, len(var_names))
        extra = {path: rows[positions] for path, rows in loaded.items()}
        with naming(_member_path(root, name)):
            checkpoint(f"write dataset {name}")
            if name in root:
                del root[name]  # a dataset left half-written by an interrupted build
            write_dataset(
                root.create_group(name),
                x,
                obs,
                var_names,
                compression,
                checkpoint,
                layout,
                extra,
                var,
            )
        on_written(name, int(ids.size))
        checkpoint(f"delete bucket {k}")
        shutil.rmtree(bucket.folder)


def _member_path(root: zarr.Group, name: str) -> str:
    """Where the member ``name`` of ``root`` is stored: a folder, or (object storage) a key."""
    base = getattr(root.store, "root", None)  # a LocalStore's folder
    if base is None:
        return f"{root.store}/{root.path}/{name}".replace("//", "/")
    return str(Path(base) / root.path / name)


def progress_bar(total: int, desc: str, *, show: bool, initial: int = 0) -> tqdm:
    """A tqdm bar counting rows (with rows/s) from ``initial`` (rows a resumed build has
    written already), or a silent one when not ``show``."""
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        unit=" rows",
        unit_scale=True,
        smoothing=0.1,
        disable=not show,
    )
