"""obs of a collection build: one type per column across inputs, read one column at a time.

Inputs rarely agree on obs: a column may be missing from some, categorical in one and plain
strings in another, int8 here and int64 there. :func:`merge_types` decides each column's type
before anything is written:

- the same kind everywhere keeps it (numbers widened to the widest, categories united in order
  of first appearance);
- a column missing from some inputs takes pandas' nullable type of its kind (``boolean``,
  ``Int64`` and friends, ``string``; floats use NaN, categoricals and datetimes their own NA);
- ints meeting floats become floats, strings meeting categoricals become categoricals;
- anything else (ints here, strings there) is an :class:`~annbatch.errors.IncompatibleDatasetsError`
  naming the column and the inputs.

During the build a column travels to the datasets as plain fixed-width arrays (:func:`encode`,
:func:`decode`), next to the rows' ids in the scratch buckets, so obs is never held whole.

anndata cannot write datetime columns: they are stored as ISO 8601 strings (nullable) whose
array carries the attribute ``annbatch-dtype``; :func:`annbatch.load_x_and_obs` turns them
back into datetimes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from annbatch._anndata_io import DTYPE_ATTR, restore_types
from annbatch.errors import IncompatibleDatasetsError, UnsupportedDatasetError

if TYPE_CHECKING:
    from collections.abc import Sequence

_NESTED = {"categorical": ("codes", "categories"), "nullable": ("values", "mask")}


# ------------------------------------------------------------------------------- reading inputs
class ObsColumns:
    """An input's obs, read one column at a time (bounded memory for any number of columns)."""

    n_obs: int
    columns: list[str]

    def index(self) -> pd.Index:
        """The obs names, as strings."""
        raise NotImplementedError

    def column(self, name: str) -> pd.Series:
        """One column, whole."""
        raise NotImplementedError

    def column_type(self, name: str) -> ColumnType:
        """The column's type, from metadata where that is enough."""
        return observe(self.column(name))


class FrameColumns(ObsColumns):
    """obs already in memory: an AnnData object's, or a legacy encoding anndata read whole."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self._frame = frame
        self.n_obs = len(frame)
        self.columns = [str(c) for c in frame.columns]
        self._by_name = dict(zip(self.columns, frame.columns, strict=True))

    def index(self) -> pd.Index:
        return pd.Index(self._frame.index.astype(str), dtype=object)

    def column(self, name: str) -> pd.Series:
        return self._frame[self._by_name[name]].reset_index(drop=True)


class GroupColumns(ObsColumns):
    """obs of an AnnData store (an anndata ``dataframe`` element), read through anndata's own
    element readers, one column at a time."""

    def __init__(self, group: Any) -> None:
        self._group = group
        self._index_key = str(group.attrs["_index"])
        self.columns = [str(c) for c in group.attrs.get("column-order", [])]
        index = group[self._index_key]
        self.n_obs = int(index.shape[0]) if hasattr(index, "shape") else len(self.index())

    def _read(self, key: str) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ad.io.read_elem(self._group[key])

    def index(self) -> pd.Index:
        return pd.Index(pd.Index(self._read(self._index_key)).astype(str), dtype=object)

    def column(self, name: str) -> pd.Series:
        values = self._read(name)
        if DTYPE_ATTR in self._group[name].attrs:
            frame = restore_types(pd.DataFrame({name: values}), self._group)
            return frame[name].reset_index(drop=True)
        if isinstance(values, pd.Series | pd.Index):
            return pd.Series(values.array if isinstance(values, pd.Index) else values.to_numpy())
        return pd.Series(values)

    def column_type(self, name: str) -> ColumnType:
        element = self._group[name]
        encoding = element.attrs.get("encoding-type")
        if DTYPE_ATTR in element.attrs:  # a collection's datetimes, stored as strings
            dtype = pd.api.types.pandas_dtype(element.attrs[DTYPE_ATTR])
            tz = str(dtype.tz) if isinstance(dtype, pd.DatetimeTZDtype) else None
            return ColumnType("datetime", np.dtype("datetime64[ns]"), tz=tz)
        if encoding == "categorical":
            categories = pd.Index(self._read(f"{name}/categories"))
            return ColumnType(
                "category", categories.dtype, categories=categories,
                ordered=bool(element.attrs.get("ordered", False)),
            )  # fmt: skip
        if encoding == "array" and np.dtype(element.dtype).kind in "biuf":
            return observe(pd.Series(np.empty(0, dtype=element.dtype)))
        if encoding in {"nullable-integer", "nullable-boolean"}:
            dtype = np.dtype(element["values"].dtype)
            return ColumnType("bool" if dtype.kind == "b" else "int", dtype, nullable=True)
        return observe(self.column(name))  # strings (their NA must be seen) and anything else


class TypesOnly(ObsColumns):
    """The column types of a collection's existing datasets (for an append): no values."""

    def __init__(self, types: dict[str, ColumnType]) -> None:
        self._types = types
        self.n_obs = 0
        self.columns = list(types)

    def column_type(self, name: str) -> ColumnType:
        return self._types[name]


def dataset_types(groups: Sequence[Any]) -> dict[str, ColumnType]:
    """Each obs column of a collection's datasets with its type (the newest dataset's)."""
    types: dict[str, ColumnType] = {}
    for group in reversed(groups):
        columns = GroupColumns(group["obs"])
        for name in columns.columns:
            if name not in types:
                types[name] = columns.column_type(name)
    return types


# ------------------------------------------------------------------------------------- types
@dataclass
class ColumnType:
    """What one column holds: its kind, numpy dtype and whether it has (or may get) NA."""

    kind: str
    """bool, int, float, string, category or datetime."""
    dtype: np.dtype
    """Values' numpy dtype (categories' dtype for a category; ``datetime64[ns]`` for datetimes)."""
    nullable: bool = False
    categories: pd.Index | None = None
    ordered: bool = False
    tz: str | None = None

    def describe(self) -> str:
        if self.kind == "category":
            return f"category of {_kind_of_dtype(self.dtype)}"
        if self.kind == "datetime":
            return f"datetime{'' if self.tz is None else f' ({self.tz})'}"
        name = "str" if self.kind == "string" else self.dtype.name
        return f"{name}{' (nullable)' if self.nullable else ''}"

    def pandas_dtype(self) -> Any:
        """The dtype of the column in the collection's obs."""
        if self.kind == "category":
            return pd.CategoricalDtype(self.categories, ordered=self.ordered)
        if self.kind == "string":
            return pd.StringDtype() if self.nullable else np.dtype(object)
        if self.kind == "datetime":
            return pd.DatetimeTZDtype("ns", self.tz) if self.tz else np.dtype("datetime64[ns]")
        if self.nullable and self.kind in {"bool", "int"}:
            return pd.api.types.pandas_dtype(_NULLABLE[self.dtype.name])
        return self.dtype


_NULLABLE = {
    "bool": "boolean",
    **{f"int{b}": f"Int{b}" for b in (8, 16, 32, 64)},
    **{f"uint{b}": f"UInt{b}" for b in (8, 16, 32, 64)},
}


def _kind_of_dtype(dtype: np.dtype) -> str:
    return {"b": "bool", "i": "int", "u": "int", "f": "float", "M": "datetime"}.get(
        dtype.kind, "str"
    )


def observe(column: pd.Series) -> ColumnType:
    """The type of one input column (raises for types a collection cannot store)."""
    dtype = column.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        categories = dtype.categories
        return ColumnType(
            "category", categories.dtype, categories=categories, ordered=bool(dtype.ordered)
        )
    if isinstance(dtype, pd.BooleanDtype):
        return ColumnType("bool", np.dtype(bool), nullable=True)
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind in "iu":
        return ColumnType("int", np.dtype(dtype.numpy_dtype), nullable=True)
    if isinstance(dtype, pd.api.extensions.ExtensionDtype) and dtype.kind == "f":
        return ColumnType("float", np.dtype(dtype.numpy_dtype))
    if isinstance(dtype, pd.StringDtype):
        return ColumnType("string", np.dtype(object), nullable=True)
    if isinstance(dtype, pd.DatetimeTZDtype):
        return ColumnType("datetime", np.dtype("datetime64[ns]"), tz=str(dtype.tz))
    dtype = np.dtype(dtype)
    if dtype.kind in "biuf":
        return ColumnType(_kind_of_dtype(dtype), dtype)
    if dtype.kind == "M":
        return ColumnType("datetime", np.dtype("datetime64[ns]"))
    inferred = pd.api.types.infer_dtype(column, skipna=True)
    if dtype.kind in "OUS" and inferred in {"string", "empty"}:
        return ColumnType("string", np.dtype(object), nullable=bool(column.isna().any()))
    if dtype.kind == "O" and inferred == "boolean":  # bools with None: pandas' boolean
        return ColumnType("bool", np.dtype(bool), nullable=bool(column.isna().any()))
    raise TypeError(pd.api.types.infer_dtype(column, skipna=True))


def merge_types(observed: Sequence[tuple[str, ColumnType | None]], column: str) -> ColumnType:
    """One type for ``column`` from each input's (name, type or None where it is missing)."""
    present = [(name, t) for name, t in observed if t is not None]
    missing = len(present) < len(observed)
    kinds = {t.kind for _, t in present}
    if kinds == {"int", "float"}:
        dtype = np.result_type(*(t.dtype for _, t in present), np.float32)
        return ColumnType("float", np.dtype(dtype))
    if kinds == {"string", "category"}:
        cats = [t for _, t in present if t.kind == "category"]
        typed = [t for t in cats if t.categories is not None and len(t.categories)]
        if all(_kind_of_dtype(t.dtype) == "str" for t in typed) and not any(
            t.ordered for t in cats
        ):
            return ColumnType("category", np.dtype(object), categories=pd.Index([], dtype=object))
    if len(kinds) > 1:
        first = present[0]
        other = next((n, t) for n, t in present if t.kind != first[1].kind)
        msg = (
            f"obs column {column!r} is {first[1].describe()} in {first[0]} but "
            f"{other[1].describe()} in {other[0]}; make its type agree across inputs (or drop it) "
            "before building"
        )
        raise IncompatibleDatasetsError(msg)
    kind = kinds.pop()
    types = [t for _, t in present]
    if kind == "category":
        return _merge_categories(present, column)
    if kind == "datetime":
        zones = {t.tz for t in types}
        if len(zones) > 1:
            msg = f"obs column {column!r} has datetimes in different time zones across inputs ({sorted(map(str, zones))})"
            raise IncompatibleDatasetsError(msg)
        return ColumnType("datetime", np.dtype("datetime64[ns]"), tz=zones.pop())
    dtype = np.result_type(*(t.dtype for t in types)) if kind != "string" else np.dtype(object)
    if kind == "int" and np.dtype(dtype).kind == "f":  # uint64 meeting a signed int
        names = ", ".join(f"{t.dtype} in {n}" for n, t in present)
        msg = f"obs column {column!r} has integers no one integer type holds ({names}); cast them first"
        raise IncompatibleDatasetsError(msg)
    nullable = missing or any(t.nullable for t in types)
    return ColumnType(kind, np.dtype(dtype), nullable=nullable and kind != "float")


def _merge_categories(present: Sequence[tuple[str, ColumnType]], column: str) -> ColumnType:
    typed = [t for _, t in present if t.categories is not None and len(t.categories)]
    kinds = {_kind_of_dtype(t.dtype) for t in typed}  # an all-NA column's categories have no type
    if len(kinds) > 1:
        msg = f"obs column {column!r} is categorical with categories of different types across inputs ({sorted(kinds)})"
        raise IncompatibleDatasetsError(msg)
    first = present[0][1]
    if any(t.ordered for _, t in present):
        same = all(t.ordered and t.categories.equals(first.categories) for _, t in present)  # type: ignore[union-attr]
        if not same:
            msg = (
                f"obs column {column!r} is an ordered categorical whose categories or order differ "
                f"across inputs ({', '.join(n for n, _ in present)}); make them agree first"
            )
            raise IncompatibleDatasetsError(msg)
        return first
    union: dict[Any, None] = {}
    for t in typed:
        union.update(dict.fromkeys(t.categories.tolist()))  # type: ignore[union-attr]
    if kinds and kinds != {"str"}:
        dtype = np.result_type(*(t.dtype for t in typed))
        categories = pd.Index(np.asarray(list(union), dtype=dtype))
    else:
        dtype = np.dtype(object)
        categories = pd.Index(list(union), dtype=object)
    return ColumnType("category", np.dtype(dtype), categories=categories)


@dataclass
class ObsSchema:
    """The collection's obs columns, in order, each with its merged type."""

    types: dict[str, ColumnType] = field(default_factory=dict)


STRING_BYTES = 64
"""Bytes a short string takes in memory as a Python object (an estimate for the budget)."""


def obs_bytes_per_row(schema: ObsSchema) -> float:
    """About how many bytes a row's obs takes in memory (obs names included)."""
    total = STRING_BYTES
    for t in schema.types.values():
        if t.kind == "string":
            total += STRING_BYTES
        elif t.kind == "category":
            total += 4
        else:
            total += t.dtype.itemsize + int(t.nullable)
    return float(total)


def build_schema(sources: Sequence[tuple[str, ObsColumns]], skip: str) -> ObsSchema:
    """Merge the obs columns of every (name, columns) source; ``skip``: a column annbatch
    writes itself."""
    order: dict[str, None] = {}
    for _, columns in sources:
        order.update(dict.fromkeys(c for c in columns.columns if c != skip))
    schema = ObsSchema()
    for column in order:
        observed: list[tuple[str, ColumnType | None]] = []
        for name, columns in sources:
            if column not in columns.columns:
                observed.append((name, None))
                continue
            try:
                observed.append((name, columns.column_type(column)))
            except TypeError as e:
                msg = f"{name}: obs column {column!r} holds {e} values; a collection stores bool, int, float, string, categorical and datetime columns"
                raise UnsupportedDatasetError(msg) from None
        merged = merge_types(observed, column)
        if (
            merged.kind == "category"
            and merged.categories is not None
            and not len(merged.categories)
        ):
            merged = _categories_from_strings(observed, [c for _, c in sources], column)
        schema.types[column] = merged
    return schema


def _categories_from_strings(
    observed: Sequence[tuple[str, ColumnType | None]], obs: Sequence[ObsColumns], column: str
) -> ColumnType:
    """Strings meeting categoricals: the categories, then the strings' values, in order of
    first appearance (one column of one input in memory at a time)."""
    union: dict[Any, None] = {}
    for (_, t), columns in zip(observed, obs, strict=True):
        if t is None:
            continue
        if t.kind == "category":
            union.update(dict.fromkeys(t.categories.tolist()))  # type: ignore[union-attr]
        elif not isinstance(columns, TypesOnly):  # a collection's strings stay strings there
            values = columns.column(column)
            union.update(dict.fromkeys(pd.unique(values[values.notna()].astype(str))))
    return ColumnType("category", np.dtype(object), categories=pd.Index(list(union), dtype=object))


# ------------------------------------------------------------------ bucket encoding of a column
def encode(values: pd.Series, t: ColumnType) -> list[np.ndarray]:
    """One input column, converted to ``t``, as fixed-width arrays (see :func:`decode`)."""
    values = values.reset_index(drop=True)
    if t.kind == "category":
        if isinstance(values.dtype, pd.CategoricalDtype):
            mapping = t.categories.get_indexer(values.cat.categories)  # type: ignore[union-attr]
            codes = values.cat.codes.to_numpy()
            out = np.full(codes.size, -1, dtype=np.int64)
            valid = codes >= 0
            out[valid] = mapping[codes[valid]]
        else:
            strings = values.astype(object).where(values.notna(), None)
            out = t.categories.get_indexer(strings.map(lambda v: None if v is None else str(v)))  # type: ignore[union-attr]
            out[values.isna().to_numpy()] = -1
        return [out.astype(np.int32)]
    if t.kind == "string":
        return encode_strings(values)
    if t.kind == "datetime":
        stamps = pd.DatetimeIndex(values)
        if t.tz is not None:
            stamps = stamps.tz_convert("UTC").tz_localize(None)
        return [stamps.as_unit("ns").asi8]
    mask = values.isna().to_numpy()
    filled = values.to_numpy(dtype=object if mask.any() else None)
    if mask.any():
        filled = np.where(mask, 0, filled)
    data = np.asarray(filled).astype(t.dtype)
    if t.kind == "float":
        data[mask] = np.nan
        return [data]
    return [data, mask.view(np.uint8)] if t.nullable else [data]


def encode_missing(t: ColumnType, n: int) -> list[np.ndarray]:
    """``n`` NA values of ``t``, encoded (a column an input lacks)."""
    if t.kind == "category":
        return [np.full(n, -1, dtype=np.int32)]
    if t.kind == "string":
        return [np.full(n, -1, dtype=np.int64), np.empty(0, dtype=np.uint8)]
    if t.kind == "datetime":
        return [np.full(n, np.iinfo(np.int64).min, dtype=np.int64)]  # NaT
    if t.kind == "float":
        return [np.full(n, np.nan, dtype=t.dtype)]
    return [np.zeros(n, dtype=t.dtype), np.ones(n, dtype=np.uint8)]  # nullable: all masked


def part_dtypes(t: ColumnType) -> list[np.dtype]:
    """The dtypes of the arrays :func:`encode` makes for ``t``."""
    if t.kind == "category":
        return [np.dtype(np.int32)]
    if t.kind == "string":
        return [np.dtype(np.int64), np.dtype(np.uint8)]
    if t.kind == "datetime":
        return [np.dtype(np.int64)]
    if t.nullable and t.kind != "float":
        return [t.dtype, np.dtype(np.uint8)]
    return [t.dtype]


STRING = ColumnType("string", np.dtype(object))
"""The type of obs names."""


def decode(parts: Sequence[np.ndarray], t: ColumnType) -> Any:
    """The column ``encode`` made, back in ``t``'s pandas type."""
    if t.kind == "category":
        return pd.Categorical.from_codes(parts[0], dtype=t.pandas_dtype())
    if t.kind == "string":
        strings = decode_strings(parts)
        return pd.array(strings, dtype=t.pandas_dtype()) if t.nullable else strings
    if t.kind == "datetime":
        stamps = pd.DatetimeIndex(parts[0].view("datetime64[ns]"))
        return stamps.tz_localize("UTC").tz_convert(t.tz) if t.tz is not None else stamps
    if t.nullable:
        return pd.arrays.BooleanArray(parts[0], parts[1].view(bool)) if t.kind == "bool" else (
            pd.arrays.IntegerArray(parts[0], parts[1].view(bool))
        )  # fmt: skip
    return parts[0]


def encode_strings(values: Any) -> list[np.ndarray]:
    """Strings (NA allowed) as [byte lengths (-1: NA), UTF-8 bytes]."""
    series = pd.Series(values, dtype=object)
    na = series.isna().to_numpy()
    encoded = [b"" if missing else str(v).encode() for v, missing in zip(series, na, strict=True)]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    lengths[na] = -1
    return [lengths, np.frombuffer(b"".join(encoded), dtype=np.uint8)]


def decode_strings(parts: Sequence[np.ndarray]) -> np.ndarray:
    lengths, blob = parts
    ends = np.cumsum(np.maximum(lengths, 0))
    raw = blob.tobytes()
    out = np.empty(lengths.size, dtype=object)
    start = 0
    for i, (end, n) in enumerate(zip(ends.tolist(), lengths.tolist(), strict=True)):
        out[i] = None if n < 0 else raw[start:end].decode()
        start = end
    return out


# ---------------------------------------------------------------------------- writing and reading
def prepare_for_write(obs: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """obs as anndata can write it, and the columns stored in another type (datetimes as ISO
    8601 strings) with the type to restore."""
    restore: dict[str, str] = {}
    out = obs.copy(deep=False)
    for column in obs.columns:
        dtype = obs[column].dtype
        if (
            isinstance(dtype, pd.DatetimeTZDtype)
            or np.dtype(getattr(dtype, "base", object)).kind == "M"
        ):
            restore[str(column)] = str(dtype)
            stamps = pd.DatetimeIndex(obs[column])
            iso = np.where(stamps.isna(), None, stamps.astype(str).to_numpy(dtype=object))
            out[column] = pd.array(iso, dtype="string")
    return out, restore
