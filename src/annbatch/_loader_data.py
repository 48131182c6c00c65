"""The data a Loader reads: its datasets (one row source each) with their obs and var, every
new dataset checked against those added before (type, columns, dtype, obs, var)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import zarr

from annbatch._core.failures import store_errors
from annbatch._core.members import member
from annbatch._core.obs import CategoriesCache, ObsRows, StoredObs
from annbatch._core.planner import dataset_offsets
from annbatch._core.sources import as_row_source
from annbatch._core.sources.stack import link
from annbatch._warnings import warn
from annbatch.errors import (
    CollectionChangedError,
    IncompatibleDatasetsError,
    InvalidArgumentError,
    ObsMismatchError,
    UnsupportedDatasetError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from anndata import AnnData

    from annbatch._core.sources import RowSource
    from annbatch.collection import DatasetCollection


class LoaderData:
    """The datasets of one Loader, in the order added: together they form its row space.

    Parameters
    ----------
    verify_checksums, stored_dtype
        How each dataset is read; see :class:`~annbatch.Loader`.
    """

    def __init__(self, *, verify_checksums: bool, stored_dtype: bool) -> None:
        self.verify_checksums = verify_checksums
        self.stored_dtype = stored_dtype
        self.sources: list[RowSource] = []
        self.obs: list[pd.DataFrame | StoredObs | None] = []
        """One obs per dataset (in memory, or read per window from a collection), None where
        none was given (then none has one)."""
        self.var: pd.DataFrame | None = None
        """The var all datasets share, None if none was given."""
        self._obs_rows: ObsRows | None = None  # all of self.obs as one row space, made lazily
        self._collection: _CollectionHandle | None = None
        """Set while every dataset is one collection's, read with the default ``load_adata``:
        what a pickled Loader carries instead of the datasets (see :meth:`__getstate__`)."""

    @property
    def n_obs(self) -> int:
        """Rows over all datasets."""
        return sum(s.shape[0] for s in self.sources)

    @property
    def n_var(self) -> int:
        """Columns, common to all datasets; an error before any is added."""
        if not self.sources:
            msg = "the Loader has no data yet, so no n_var; add a dataset first"
            raise InvalidArgumentError(msg)
        return self.sources[0].shape[1]

    @property
    def dataset_type(self) -> type | None:
        """Type of the datasets (e.g. ``zarr.Array``); None before any is added."""
        return self.sources[0].dataset_type if self.sources else None

    def add(
        self,
        datasets: Sequence[Any],
        obs: Sequence[pd.DataFrame | StoredObs | None] | None,
        var: pd.DataFrame | Sequence[pd.DataFrame | None] | None,
    ) -> None:
        """Append ``datasets`` with ``obs`` (one per dataset, or None) and ``var`` (one for
        all, or one per dataset, all equal), or raise and append nothing."""
        datasets = list(datasets)
        obs_list: list[pd.DataFrame | StoredObs | None] = (
            [None] * len(datasets) if obs is None else list(obs)
        )
        if len(obs_list) != len(datasets):
            msg = (
                f"got {len(datasets)} datasets but {len(obs_list)} obs tables; pass one per dataset"
            )
            raise ObsMismatchError(msg)
        first = len(self.sources)
        new = [
            as_row_source(
                d,
                where=f"dataset {first + i}",
                verify_checksums=self.verify_checksums,
                stored_dtype=self.stored_dtype,
            )
            for i, d in enumerate(datasets)
        ]
        for i, (source, o) in enumerate(zip(new, obs_list, strict=True)):
            check_compatible(
                source,
                o,
                position=first + i,
                earlier=[*self.sources, *new[:i]],
                earlier_obs=[*self.obs, *obs_list[:i]],
            )
        var_frame = self._check_var(var, new, first)
        self.sources.extend(new)
        link(self.sources)  # CSR datasets read as one row space (annbatch._core.sources.stack)
        self.obs.extend(obs_list)
        self._obs_rows = None
        if var_frame is not None:
            self.var = var_frame

    def _check_var(
        self,
        var: pd.DataFrame | Sequence[pd.DataFrame | None] | None,
        new: Sequence[RowSource],
        first: int,
    ) -> pd.DataFrame | None:
        """The one var of ``var`` (given for the new datasets), checked against their columns
        and the var of those before; None when none is given."""
        frames = [var] * len(new) if var is None or isinstance(var, pd.DataFrame) else list(var)
        if len(frames) != len(new):
            msg = f"got {len(new)} datasets but {len(frames)} var tables; pass one, or one per dataset"
            raise ObsMismatchError(msg)
        found = self.var
        for i, (frame, source) in enumerate(zip(frames, new, strict=True)):
            if frame is None:
                continue
            where = f"var of dataset {first + i} ({source.describe()})"
            if not isinstance(frame, pd.DataFrame):
                msg = f"{where} is a {type(frame).__name__}; expected a pandas.DataFrame"
                raise ObsMismatchError(msg)
            if len(source.shape) == 2 and len(frame) != source.shape[1]:
                msg = f"{where} has {len(frame)} rows; the dataset has {source.shape[1]} columns"
                raise ObsMismatchError(msg)
            if found is not None and not (frame.index.equals(found.index) and frame.equals(found)):
                msg = f"{where} differs from the Loader's var; every dataset of one Loader needs the same var"
                raise IncompatibleDatasetsError(msg)
            found = frame
        return found

    def obs_rows(self) -> ObsRows | None:
        """Every dataset's obs as one row space (None: no obs)."""
        if self._obs_rows is None and self.obs and self.obs[0] is not None:
            offsets = dataset_offsets([s.shape[0] for s in self.sources])
            self._obs_rows = ObsRows([o for o in self.obs if o is not None], offsets)
        return self._obs_rows

    def add_collection(self, collection: DatasetCollection, *, obs_index: bool) -> None:
        """Append every dataset of ``collection``, X on disk and obs read per window (see
        :func:`collection_parts`)."""
        first = len(self.sources)
        self.add(*collection_parts(collection, None, obs_index=obs_index), None)
        if first == 0:
            rows = tuple(s.shape[0] for s in self.sources)
            self._collection = _CollectionHandle(collection, obs_index, rows)

    def obs_frames(self) -> list[pd.DataFrame | None]:
        """One obs DataFrame per dataset; obs read per window is read whole, now."""
        return [o.frame() if isinstance(o, StoredObs) else o for o in self.obs]

    def __copy__(self) -> Self:
        """The same datasets (shared, not reread) in lists of its own, so that adding to one
        copy leaves the other as it was."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.sources, new.obs = list(self.sources), list(self.obs)
        return new

    def __getstate__(self) -> dict[str, Any]:
        """What DataLoader workers and DDP ranks receive. A Loader over one collection (only)
        sends the collection (its location) and reopens it there: a few hundred bytes
        however many datasets, no per-dataset readers or categories; otherwise the datasets
        themselves (in-memory obs with them). The joined obs is rebuilt where needed."""
        state = {**self.__dict__, "_obs_rows": None}
        handle = self._collection
        if handle is not None and len(handle.rows) == len(self.sources):
            state["sources"] = state["obs"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        handle = self._collection
        if self.sources is not None:
            link(self.sources)  # sources pickle without their stack
        if self.sources is None and handle is not None:
            self.sources, self.obs = [], []
            self.add_collection(handle.collection, obs_index=handle.obs_index)
            rows = tuple(s.shape[0] for s in self.sources)
            if rows != handle.rows:
                msg = (
                    f"the collection {handle.collection.path} changed since the Loader was made "
                    f"({len(handle.rows)} datasets of {sum(handle.rows):,} rows then, "
                    f"{len(rows)} of {sum(rows):,} now); make the Loader again"
                )
                raise CollectionChangedError(msg)


@dataclass(frozen=True)
class _CollectionHandle:
    """A collection a Loader reads whole, as a pickled Loader carries it."""

    collection: DatasetCollection
    obs_index: bool
    rows: tuple[int, ...]
    """Rows of each dataset when the Loader opened it (checked when it is opened again)."""


def anndata_parts(
    adatas: Sequence[AnnData], *, with_var: bool
) -> tuple[list[Any], list[pd.DataFrame | None], list[pd.DataFrame | None] | None]:
    """The X, obs and (``with_var``) var of each AnnData, as :meth:`LoaderData.add` takes
    them; an error naming the first object that has no X."""
    datasets, obs = [], []
    for i, adata in enumerate(adatas):
        x = getattr(adata, "X", None)
        if x is None:
            what = (
                "has no X"
                if hasattr(adata, "X")
                else f"is a {type(adata).__name__}, not an AnnData"
            )
            msg = f"anndata {i} {what}"
            raise InvalidArgumentError(msg)
        datasets.append(x)
        obs.append(adata.obs)
    return datasets, obs, [getattr(a, "var", None) for a in adatas] if with_var else None


def collection_parts(
    collection: DatasetCollection,
    load_adata: Callable[[zarr.Group], AnnData] | None,
    *,
    obs_index: bool = False,
) -> tuple[list[Any], list[pd.DataFrame | StoredObs | None]]:
    """Every dataset of ``collection`` with its obs, as :meth:`LoaderData.add` takes them.

    By default X is opened on disk and obs read per window (:class:`~annbatch._core.obs.
    StoredObs`, the index only with ``obs_index``); with ``load_adata``, each dataset is the
    AnnData it returns, whose obs stays in memory. An error for a collection without X read
    by default."""
    from annbatch._anndata_io import load_x_and_obs
    from annbatch._legacy import open_element
    from annbatch.collection import DatasetCollection

    if not isinstance(collection, DatasetCollection):
        msg = (
            f"use_collection expects an annbatch.DatasetCollection, got {type(collection).__name__}"
        )
        raise UnsupportedDatasetError(msg)
    if load_adata is not None and not callable(load_adata):
        msg = f"load_adata must be a callable taking a zarr.Group, got {load_adata!r}"
        raise InvalidArgumentError(msg)
    groups = collection.open_datasets() if load_adata is not None else collection._read_datasets()
    if load_adata is None and groups and "X" not in groups[0]:
        first: Any = groups[0]
        paths = [f"{key}/{name}" for key in ("layers", "obsm") for name in first.get(key, {})]
        msg = (
            f"the collection {collection.path} holds no X (its inputs had none), only "
            f"{', '.join(paths)}; stream one of those: "
            f"loader.add_datasets([g[{paths[0]!r}] for g in collection])"
        )
        raise UnsupportedDatasetError(msg)
    if load_adata is not None or not all(isinstance(g, zarr.Group) for g in groups):
        loaded, obs, _ = anndata_parts(
            [(load_x_and_obs if load_adata is None else load_adata)(g) for g in groups],
            with_var=False,
        )
        return loaded, list(obs)
    datasets: list[Any] = []
    tables: list[pd.DataFrame | StoredObs | None] = []
    categories = CategoriesCache()  # read once where datasets store the same ones
    for group in groups:
        where = str(group.store_path)
        with store_errors(lambda where=where: f"opening the dataset {where}"):  # type: ignore[misc]
            x = open_element(member(group, "X"))
            tables.append(StoredObs(group, int(x.shape[0]), index=obs_index, categories=categories))
        datasets.append(x)
    return datasets, tables


def check_compatible(
    source: RowSource,
    obs: pd.DataFrame | StoredObs | None,
    *,
    position: int,
    earlier: Sequence[RowSource],
    earlier_obs: Sequence[pd.DataFrame | StoredObs | None],
) -> None:
    """Raise if dataset ``position`` (``source`` with ``obs``) cannot join the ``earlier``
    ones: another type, other columns, a dtype with no common numeric type, obs that do not
    fit; warn if its dtype is promoted."""
    where = f"dataset {position} ({source.describe()})"
    if obs is not None:
        if not isinstance(obs, pd.DataFrame | StoredObs):
            msg = f"obs of {where} is a {type(obs).__name__}; expected a pandas.DataFrame"
            raise ObsMismatchError(msg)
        n = obs.n_obs if isinstance(obs, StoredObs) else len(obs)
        if n != source.shape[0]:
            msg = f"obs of {where} has {n} rows; the dataset has {source.shape[0]}"
            raise ObsMismatchError(msg)
    if not earlier:
        return
    ref = earlier[0]
    if source.dataset_type is not ref.dataset_type:
        msg = (
            f"{where} has type {_type_name(source.dataset_type)}; the Loader's datasets "
            f"have type {_type_name(ref.dataset_type)}. All datasets of one Loader must "
            "be of one type"
        )
        raise IncompatibleDatasetsError(msg)
    if source.shape[1:] != ref.shape[1:]:
        cols = "columns" if len(ref.shape) == 2 else "trailing dimensions"
        got = source.shape[1] if len(source.shape) == 2 == len(ref.shape) else source.shape[1:]
        want = ref.shape[1] if len(ref.shape) == 2 == len(source.shape) else ref.shape[1:]
        msg = f"{where} has {got} {cols}; the Loader's datasets have {want}"
        raise IncompatibleDatasetsError(msg)
    before = np.result_type(*(s.dtype for s in earlier))
    if source.dtype != before:
        common = np.result_type(before, source.dtype)
        if common.kind not in "biufc":
            msg = f"{where} has dtype {source.dtype}; the Loader's datasets have {before}"
            raise IncompatibleDatasetsError(msg)
        warn(
            f"{where} has dtype {source.dtype}, the Loader's earlier datasets {before}: "
            f"batches are yielded as {common} (numpy.result_type)",
            UserWarning,
        )
    if (obs is None) != (earlier_obs[0] is None):
        has = "has no obs" if obs is None else "has obs"
        others = "have obs" if obs is None else "have none"
        msg = f"{where} {has} but the Loader's earlier datasets {others}; give obs for all or none"
        raise ObsMismatchError(msg)


def _type_name(t: type) -> str:
    """A type as users spell it: ``zarr.Array``, ``anndata.abc.CSRDataset``..."""
    if t.__name__ == "CSRDataset":
        return "anndata.abc.CSRDataset"
    return f"{t.__module__.split('.')[0]}.{t.__qualname__}"
