"""obs read per window: a collection's columns stay on disk and each window reads its rows.

Held whole, obs grows with the atlas (its string index alone is ~2 GB at 20 million cells) and
is pickled into every DataLoader worker. A column whose arrays the chunk reader reads in small
pieces (annbatch collections write obs in chunks of :data:`WINDOW_CHUNK_ROWS` rows) is read per
window instead, with X's machinery and checks: the chunks the window's rows touch, each decoded
once, its CRC32C verified, a missing chunk an error. Categories (small) are held; a code outside
them is an error naming the column, never another label. Columns the chunk reader cannot read
that way (strings, columns of stores written by anndata or older collections with large
compressed chunks) are read whole when the dataset is opened, as before. The index (cell names)
is read only when asked for; otherwise batches' obs are indexed by global row position.

:class:`StoredObs` is one dataset's obs; :class:`ObsRows` is every dataset's, as the epoch
takes a window's rows from it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from annbatch._core.chunks import direct_array, read_rows
from annbatch._core.chunks.small import read_stacked, stack_bases
from annbatch._core.chunks.table import Readers
from annbatch._core.failures import store_errors
from annbatch._core.frames import describe_column, read_frame
from annbatch._core.members import get_member, member
from annbatch._core.ranges import expand_ranges, runs_of
from annbatch.errors import AnnbatchError, CorruptDataError, UnsupportedDatasetError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import zarr

    from annbatch._core.chunks import ChunkReader

WINDOW_CHUNK_ROWS = 1024
"""Rows per on-disk chunk of a collection's obs arrays: a window's row range decodes at most
this many rows more than it wants (4 KB of int8 codes, 32 KB of int64)."""
_MAX_WINDOWED_CHUNK_ROWS = 16_384
"""Compressed obs arrays with larger chunks are read whole when opened: per window, decoding
chunks of (say) a million rows for a range of 256 would cost more than holding them."""
_NESTED = {
    "categorical": ("codes", "categories"),
    "nullable-integer": ("values", "mask"),
    "nullable-boolean": ("values", "mask"),
}


@dataclass(frozen=True, slots=True)
class _Windowed:
    """A column read per window: its arrays' chunk readers, and what makes them a column."""

    kind: str
    """anndata's encoding type: ``array``, ``categorical``, ``nullable-integer`` /
    ``-boolean``."""
    parts: tuple[ChunkReader, ...]
    """The arrays read per window: values; codes; values and mask."""
    what: str
    """The column and dataset, as named in errors."""
    dtype: Any = None
    """The categorical dtype (categories held in memory)."""

    def read(self, starts: np.ndarray, stops: np.ndarray, n: int) -> Any:
        """Rows ``starts[i]:stops[i]`` (sorted, disjoint; ``n`` in all) as a pandas-ready array."""
        with _named(self.what):
            parts = []
            for reader in self.parts:
                out = np.empty(n, dtype=reader.dtype)
                read_rows(reader, starts, stops, out)
                parts.append(out)
        return self.finish(parts)

    def finish(self, parts: list[np.ndarray], what: Callable[[int], str] | None = None) -> Any:
        """The arrays read (:attr:`parts`' rows) as a pandas-ready array, checked: a code
        outside the categories is an error, naming the column by ``what`` (of the row's
        position; default: :attr:`what`)."""
        if self.kind == "array":
            return parts[0]
        if self.kind == "categorical":
            codes = parts[0]
            n_categories = len(self.dtype.categories)
            if codes.size and (int(codes.min()) < -1 or int(codes.max()) >= n_categories):
                at = int(np.flatnonzero((codes < -1) | (codes >= n_categories))[0])
                name = self.what if what is None else what(at)
                msg = (
                    f"{name}: code {int(codes[at])} is outside its {n_categories} categories; "
                    "the store is damaged"
                )
                raise CorruptDataError(msg)
            return codes
        values, mask = parts
        if self.kind == "nullable-integer":
            return pd.arrays.IntegerArray(values, mask.astype(bool, copy=False))
        return pd.arrays.BooleanArray(
            values.astype(bool, copy=False), mask.astype(bool, copy=False)
        )

    def column(self, values: Any) -> Any:
        """``values`` (what :meth:`read` returned, possibly reordered) as the column's array."""
        if self.kind == "categorical":
            return pd.Categorical.from_codes(values, dtype=self.dtype, validate=False)
        return values


class StoredObs:
    """One dataset's obs, in an AnnData zarr store, read per window (see module docstring).

    Parameters
    ----------
    group
        The dataset's root group (with ``obs``).
    n_obs
        Rows of the dataset (X's).
    index
        Read the index (cell names) too, whole, now.
    categories
        Categories already read, shared by the datasets of one collection (see
        :class:`CategoriesCache`); None: read each dataset's.
    """

    def __init__(
        self,
        group: zarr.Group,
        n_obs: int,
        *,
        index: bool = False,
        categories: CategoriesCache | None = None,
    ) -> None:
        elem: Any = member(group, "obs")
        attrs = dict(elem.attrs)
        if attrs.get("encoding-type") != "dataframe":
            msg = f"obs of {group.store_path} is not a dataframe in anndata's encoding"
            raise UnsupportedDatasetError(msg)
        self.n_obs = n_obs
        self.columns: list[str] = [str(c) for c in attrs.get("column-order", [])]
        self._windowed: dict[str, _Windowed] = {}
        held: dict[str, Any] = {}
        for name in self.columns:
            node = member(elem, name)
            windowed = _windowed(node, elem, n_obs, categories)
            if windowed is not None:
                self._windowed[name] = windowed
            else:
                held[name] = _held(node, elem, n_obs)
        self._held = held
        self._index: pd.Index | None = None
        if index:
            key = attrs["_index"]
            stored = member(elem, key)
            values = read_frame(stored, elem, "obs")
            self._index = pd.Index(values, name=None if key == "_index" else key)
            _check_rows(len(self._index), n_obs, describe_column(stored, elem, "obs"))

    @property
    def has_index(self) -> bool:
        """Whether the cell names were read (``index=True``)."""
        return self._index is not None

    @property
    def index_name(self) -> Any:
        """The name of the index (None: anndata's default, or not read)."""
        return None if self._index is None else self._index.name

    @property
    def schema(self) -> tuple[tuple[str, str, Any], ...]:
        """Each column's name, how it is read and its dtype: tables with equal schemas are
        joined column by column (:class:`ObsRows`), their codes decoded with the first
        table's categories, so categories count in their order (pandas calls two unordered
        categorical dtypes with the same categories in another order equal)."""
        return tuple(
            (name, "windowed", (c.kind, _exact(c.dtype), tuple(p.dtype for p in c.parts)))
            if (c := self._windowed.get(name)) is not None
            else (name, "held", _exact(self._held[name].dtype))
            for name in self.columns
        )

    def read(self, rows: np.ndarray) -> dict[str, Any]:
        """Rows ``rows`` (this dataset's positions, any order, repeats allowed) of every
        column, in that order, as :meth:`build` takes them (categoricals as codes)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.read_runs(*runs_of(rows), rows)

    def read_runs(
        self,
        starts: np.ndarray,
        stops: np.ndarray,
        positions: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """:meth:`read` of the rows ``expand_ranges(starts, stops)[positions]`` (``rows``, if
        given): the runs ``starts[i]:stops[i]`` sorted and disjoint, so no sort is needed."""
        out: dict[str, Any] = {}
        if self._windowed:
            n = int(np.sum(stops - starts))
            for name, c in self._windowed.items():
                out[name] = c.read(starts, stops, n)[positions]
        for name in self.columns:
            if name not in out:
                if rows is None:
                    rows = expand_ranges(starts, stops)[positions]
                out[name] = self._held[name].take(rows)
        return out

    def names(self, rows: np.ndarray) -> np.ndarray | None:
        """The cell names of ``rows`` (None: the index was not read)."""
        return None if self._index is None else self._index.to_numpy()[rows]

    def build(self, parts: dict[str, Any], index: pd.Index) -> pd.DataFrame:
        """A DataFrame of what :meth:`read` returned (or several such joined column by
        column), indexed by ``index``."""
        data = {
            name: c.column(parts[name]) if (c := self._windowed.get(name)) else parts[name]
            for name in self.columns
        }
        # The columns in order already (``columns=`` made pandas reindex them: a window of
        # 16,384 rows and 4 columns took 1.85 ms to read and build with it, 1.55 without),
        # each a new array of this window's: nothing to copy.
        if not data:  # (no columns: the same empty column index as pandas gives the table)
            return pd.DataFrame(index=index, columns=self.columns)
        return pd.DataFrame(data, index=index, copy=False)

    def take(self, rows: np.ndarray) -> pd.DataFrame:
        """Rows ``rows`` (this dataset's positions, any order, repeats allowed), indexed by the
        cell names if they were read, else by ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.take_runs(*runs_of(rows), rows)

    def take_runs(
        self,
        starts: np.ndarray,
        stops: np.ndarray,
        positions: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """:meth:`take` of the rows ``expand_ranges(starts, stops)[positions]`` (``rows``, if
        given; see :meth:`read_runs`)."""
        if rows is None:
            rows = expand_ranges(starts, stops)[positions]
        names = self.names(rows)
        index = pd.Index(rows) if names is None else pd.Index(names, name=self.index_name)
        return self.build(self.read_runs(starts, stops, positions, rows), index)

    def frame(self) -> pd.DataFrame:
        """All rows (read now, every call)."""
        return self.take(np.arange(self.n_obs))


def _exact(dtype: Any) -> Any:
    """``dtype``, with a categorical's categories in their order and its ``ordered`` flag."""
    if isinstance(dtype, pd.CategoricalDtype):
        return ("category", tuple(dtype.categories.tolist()), dtype.ordered)
    return dtype


def _check_rows(n: int, n_obs: int, what: str) -> None:
    if n != n_obs:
        msg = f"{what} has {n} rows; the dataset has {n_obs}"
        raise CorruptDataError(msg)


def _windowed(
    node: Any, frame: Any, n_obs: int, categories: CategoriesCache | None = None
) -> _Windowed | None:
    """``node`` (an obs column) as a column read per window, or None if it is not one."""
    import zarr

    attrs = dict(node.attrs)
    kind = attrs.get("encoding-type")
    what = describe_column(node, frame, "obs")
    if isinstance(node, zarr.Array):
        if (
            kind != "array"
            or attrs.get("annbatch-dtype")
            or np.dtype(node.dtype).kind not in "biuf"
        ):
            return None
        names: tuple[str, ...] = ()
        arrays = [node]
    elif kind in _NESTED:
        names = _NESTED[kind]
        found = [get_member(node, n) for n in names]
        if any(not isinstance(a, zarr.Array) for a in found):
            return None
        arrays = found[:1] if kind == "categorical" else found
    else:
        return None
    readers = []
    for array in arrays:
        reader = direct_array(array, verify_checksums=True)
        if reader is None or len(reader.shape) != 1:
            return None
        layout = reader.layout
        if layout.compressor is not None and layout.rows_per_chunk > _MAX_WINDOWED_CHUNK_ROWS:
            return None
        _check_rows(reader.shape[0], n_obs, what)
        readers.append(reader)
    dtype = None
    if kind.startswith("nullable-") and np.dtype(readers[1].dtype) != np.bool_:
        msg = f"{what}: the mask has dtype {readers[1].dtype}; expected bool"
        raise CorruptDataError(msg)
    if kind == "nullable-integer" and np.dtype(readers[0].dtype).kind not in "iu":
        msg = f"{what}: nullable integer values have dtype {readers[0].dtype}; expected integers"
        raise CorruptDataError(msg)
    if kind == "categorical":
        if np.dtype(readers[0].dtype).kind not in "iu":
            msg = f"{what}: categorical codes have dtype {readers[0].dtype}; expected integers"
            raise CorruptDataError(msg)
        values = (categories or CategoriesCache()).read(found[1], frame)
        dtype = pd.CategoricalDtype(pd.Index(values), ordered=bool(attrs.get("ordered", False)))
    return _Windowed(kind=str(kind), parts=tuple(readers), what=what, dtype=dtype)


class CategoriesCache:
    """Categories of categorical obs columns, read once for all the datasets of a collection
    that store them alike.

    The datasets of a collection usually share each column's categories; reading them through
    zarr costs a few round trips per dataset (about 1 s of a 100-dataset collection's opening).
    An array of categories in a local store is known by its bytes: its ``zarr.json`` and every
    file below it. Arrays with the same bytes decode to the same values, so those are read
    (with every check of :func:`~annbatch._core.frames.read_frame`) for the first such array
    only. Arrays elsewhere (object storage, h5py), or larger than :data:`LIMIT` bytes, are read
    each time.
    """

    LIMIT = 1 << 20
    """Bytes of an array of categories beyond which it is not remembered."""

    def __init__(self) -> None:
        self._read: dict[tuple[bytes, ...], Any] = {}

    def read(self, array: Any, frame: Any) -> Any:
        """The values of ``array`` (the categories of a column of the dataframe ``frame``)."""
        key = _stored_bytes(array, self.LIMIT)
        if key is None:
            return read_frame(array, frame, "obs")
        if key not in self._read:
            self._read[key] = read_frame(array, frame, "obs")
        return self._read[key]


def _stored_bytes(array: Any, limit: int) -> tuple[bytes, ...] | None:
    """Every file of the zarr ``array`` in a local store (its ``zarr.json`` and its chunks),
    each after its path, in path order; None: not a local zarr array, or over ``limit``
    bytes."""
    import os

    import zarr
    from zarr.storage import LocalStore

    if not isinstance(array, zarr.Array) or not isinstance(array.store_path.store, LocalStore):
        return None

    def fail(error: OSError) -> None:
        raise error  # (os.walk skips a folder it cannot list: its files would not be in the key)

    folder = os.path.join(array.store_path.store.root, array.store_path.path)
    found: list[tuple[str, bytes]] = []
    total = 0
    try:
        for at, folders, files in os.walk(folder, onerror=fail):
            if any(os.path.islink(os.path.join(at, name)) for name in folders):
                return None  # os.walk does not enter a linked folder: its files would be left out
            for name in files:
                path = os.path.join(at, name)
                total += os.path.getsize(path)
                if total > limit:
                    return None
                with open(path, "rb") as f:
                    found.append((os.path.relpath(path, folder), f.read()))
    except OSError:
        return None
    found.sort()
    return tuple(part for path, data in found for part in (path.encode(), data))


def _held(node: Any, frame: Any, n_obs: int) -> Any:
    """``node`` (an obs column) read whole, as a pandas array (types restored)."""
    from annbatch._anndata_io import restore_types

    name = node.basename if hasattr(node, "basename") else node.name.rsplit("/", 1)[-1]
    column = pd.Series(read_frame(node, frame, "obs"))
    column = restore_types(pd.DataFrame({name: column}), frame)[name]
    _check_rows(len(column), n_obs, describe_column(node, frame, "obs"))
    return column.array


@contextmanager
def _named(what: str) -> Iterator[None]:
    """Failures reading a column start with its name and dataset."""
    try:
        with store_errors(lambda: f"reading {what}"):
            yield
    except AnnbatchError as e:
        if str(e).startswith(what):
            raise
        msg = f"{what}: {e}"
        raise type(e)(msg) from e


class ObsRows:
    """Every dataset's obs (one table each: a DataFrame in memory, or a :class:`StoredObs`), as
    one row space: the epoch takes each window's rows from it.

    Tables read per window with one schema (the datasets of one collection) are joined column
    by column: one DataFrame per window, however many datasets its rows come from.

    Parameters
    ----------
    tables
        One per dataset, in the order their rows are numbered.
    offsets
        The global row where each dataset begins, then the total.
    """

    def __init__(self, tables: Sequence[pd.DataFrame | StoredObs], offsets: np.ndarray) -> None:
        self._tables = list(tables)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._frame: pd.DataFrame | None = None
        in_memory = [t for t in self._tables if isinstance(t, pd.DataFrame)]
        if len(in_memory) == len(self._tables):
            # Tables of empty datasets add no rows; leaving them out keeps pandas from
            # changing column dtypes because of them.
            frames = [t for t in in_memory if len(t)] or in_memory[:1]
            self._frame = pd.concat(frames, axis=0) if len(frames) > 1 else frames[0]
        stored = [t for t in self._tables if isinstance(t, StoredObs)]
        self._columnar = (
            len(stored) == len(self._tables)
            and len({t.schema for t in stored}) == 1
            and len({t.has_index for t in stored}) == 1
        )
        self._stack = _Stack.of(stored) if self._columnar and stored else None

    def take(self, rows: np.ndarray) -> pd.DataFrame:
        """The obs of global rows ``rows``, in that order."""
        if self._frame is not None:
            return self._frame.iloc[rows]
        rows = np.asarray(rows, dtype=np.int64)
        return self.take_runs(*runs_of(rows), rows)

    def take_runs(
        self,
        starts: np.ndarray,
        stops: np.ndarray,
        positions: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> pd.DataFrame:
        """:meth:`take` of the global rows ``expand_ranges(starts, stops)[positions]``
        (``rows``, if given), where the runs ``starts[i]:stops[i]`` are sorted and disjoint:
        a window's reads already are, so its obs are read without sorting its rows."""
        if rows is None and (self._frame is not None or self._stack is None):
            rows = expand_ranges(starts, stops)[positions]
        if self._frame is not None:
            return self._frame.iloc[rows]
        starts, stops, run_dataset = _split_runs(starts, stops, self._offsets)
        if run_dataset.size and run_dataset[0] == run_dataset[-1]:  # sorted: one dataset
            d = int(run_dataset[0])
            table = self._tables[d]
            base = int(self._offsets[d])
            if isinstance(table, StoredObs):
                if rows is None:
                    rows = expand_ranges(starts, stops)[positions]
                out = table.take_runs(starts - base, stops - base, positions, rows - base)
                if not table.has_index:
                    out.index = pd.Index(rows)
                return out
        if self._stack is not None:  # one pass over all datasets: no grouping by dataset
            return self._stack.take_runs(starts, stops, positions, run_dataset, self._offsets)
        assert rows is not None
        return self._take_rows(rows)

    def _take_rows(self, rows: np.ndarray) -> pd.DataFrame:
        """:meth:`take` dataset by dataset (rows of several datasets that are not stacked)."""
        dataset = np.searchsorted(self._offsets, rows, side="right") - 1
        present = np.unique(dataset)
        if present.size <= 1:
            return self._take_one(int(present[0]) if present.size else 0, rows)
        order = np.argsort(dataset, kind="stable")  # rows grouped by dataset, in order
        back = np.empty_like(order)
        back[order] = np.arange(order.size)
        sorted_ds = dataset[order]
        cuts = np.flatnonzero(np.diff(sorted_ds)) + 1
        groups = np.split(rows[order], cuts)
        if not self._columnar:
            parts = [self._take_one(int(d), g) for d, g in zip(present, groups, strict=True)]
            return pd.concat(parts, axis=0).iloc[back]
        tables = [t for d in present if isinstance(t := self._tables[int(d)], StoredObs)]
        local = [g - self._offsets[int(d)] for d, g in zip(present, groups, strict=True)]
        reads = [t.read(part) for t, part in zip(tables, local, strict=True)]
        joined = {name: _join([r[name] for r in reads])[back] for name in reads[0]}
        index = pd.Index(rows)
        if tables[0].has_index:
            names = [t.names(part) for t, part in zip(tables, local, strict=True)]
            index = pd.Index(np.concatenate(names)[back], name=tables[0].index_name)  # type: ignore[arg-type]
        return tables[0].build(joined, index)

    def _take_one(self, d: int, rows: np.ndarray) -> pd.DataFrame:
        table = self._tables[d]
        local = rows - self._offsets[d]
        if isinstance(table, pd.DataFrame):
            return table.iloc[local]
        out = table.take(local)
        if not table.has_index:
            out.index = pd.Index(rows)
        return out


def _split_runs(
    starts: np.ndarray, stops: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted, disjoint global runs cut where a dataset begins (``offsets``: where each does,
    then the total), and the dataset of each run. The runs' rows stay in their order."""
    first = np.searchsorted(offsets, starts, side="right") - 1
    last = np.searchsorted(offsets, stops - 1, side="right") - 1
    if np.array_equal(first, last):
        return starts, stops, first
    cut_starts, cut_stops, cut_ds = [], [], []
    for a, b, d, e in zip(
        starts.tolist(), stops.tolist(), first.tolist(), last.tolist(), strict=True
    ):
        while d < e:  # skips datasets without rows: offsets repeat, and side="right" above
            end = int(offsets[d + 1])
            if end > a:
                cut_starts.append(a)
                cut_stops.append(end)
                cut_ds.append(d)
                a = end
            d += 1
        cut_starts.append(a)
        cut_stops.append(b)
        cut_ds.append(e)
    return (
        np.array(cut_starts, dtype=np.int64),
        np.array(cut_stops, dtype=np.int64),
        np.array(cut_ds, dtype=np.int64),
    )


def _join(parts: list[Any]) -> Any:
    """Arrays of one column (numpy or pandas extension arrays of one dtype), one after another."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return type(parts[0])._concat_same_type(parts)


class _Stack:
    """Every dataset's windowed columns read as one (:func:`~annbatch._core.chunks.small.read_stacked`):
    each column's arrays of all datasets are one row space, so a window reads each column in
    one pass, however many datasets its rows come from. Held columns and the index are taken
    per dataset.

    Parameters
    ----------
    tables
        The datasets' obs, one schema (:attr:`StoredObs.schema`), in row order.
    bases
        Where each dataset's rows begin in the stacked row space.
    """

    def __init__(self, tables: Sequence[StoredObs], bases: np.ndarray) -> None:
        self.tables = list(tables)
        self.bases = bases
        first = self.tables[0]
        self.columns = {  # each keeps its chunk table (Readers)
            name: [
                Readers(t._windowed[name].parts[p] for t in self.tables)
                for p in range(len(c.parts))
            ]
            for name, c in first._windowed.items()
        }
        self.names = {name: [t._windowed[name].what for t in self.tables] for name in self.columns}

    @classmethod
    def of(cls, tables: Sequence[StoredObs]) -> _Stack | None:
        """The stack of ``tables`` (one schema), or None when some column's arrays cannot be
        read as one or do not share one row space (rows per chunk, lengths)."""
        bases = None
        for name in tables[0]._windowed:
            for p in range(len(tables[0]._windowed[name].parts)):
                found = stack_bases([t._windowed[name].parts[p] for t in tables])
                if found is None or (bases is not None and not np.array_equal(found, bases)):
                    return None
                bases = found
        return None if bases is None else cls(tables, bases)

    def take_runs(
        self,
        starts: np.ndarray,
        stops: np.ndarray,
        positions: np.ndarray,
        run_dataset: np.ndarray,
        offsets: np.ndarray,
    ) -> pd.DataFrame:
        """The obs of the global rows ``expand_ranges(starts, stops)[positions]``, in that
        order: ``starts[i]:stops[i]`` sorted, disjoint, each within dataset
        ``run_dataset[i]`` (``offsets``: where each dataset begins)."""
        first = self.tables[0]
        shift = self.bases[run_dataset] - offsets[run_dataset]  # global -> stacked rows
        starts, stops = starts + shift, stops + shift
        n = int(np.sum(stops - starts))
        out: dict[str, Any] = {}
        for name, parts in self.columns.items():
            names = self.names[name]
            read = []
            for readers in parts:
                values = np.empty(n, dtype=readers[0].dtype)
                read_stacked(readers, self.bases, starts, stops, values, names=names, checked=True)
                read.append(values)

            def what(at: int, names: list[str] = names) -> str:
                lengths = stops - starts
                run = int(np.searchsorted(np.cumsum(lengths), at, side="right"))
                row = int(starts[run] + at - (np.cumsum(lengths)[run] - lengths[run]))
                return names[int(np.searchsorted(self.bases, row, side="right")) - 1]

            out[name] = first._windowed[name].finish(read, what)[positions]
        held = [name for name in first.columns if name not in out]
        rows = expand_ranges(starts - shift, stops - shift)[positions]  # global rows
        index = pd.Index(rows)
        names_of_rows = np.empty(rows.size, dtype=object) if first.has_index else None
        if held or names_of_rows is not None:
            dataset = np.repeat(run_dataset, stops - starts)[positions]
            local = rows - offsets[dataset]
            present = np.unique(run_dataset) if run_dataset.size else np.zeros(1, np.int64)
            parts_of: dict[str, list[Any]] = {name: [] for name in held}
            where = []
            for d in present.tolist():
                mask = np.flatnonzero(dataset == d)
                where.append(mask)
                table = self.tables[d]
                for name in held:
                    parts_of[name].append(table._held[name].take(local[mask]))
                if names_of_rows is not None:
                    names_of_rows[mask] = table.names(local[mask])
            back = np.empty(rows.size, dtype=np.int64)
            back[np.concatenate(where)] = np.arange(rows.size)
            for name in held:
                out[name] = _join(parts_of[name])[back]
            if names_of_rows is not None:
                index = pd.Index(names_of_rows, name=first.index_name)
        return first.build(out, index)
