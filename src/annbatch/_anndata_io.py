"""Open AnnData stores with X left on disk."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import anndata
import h5py
import pandas as pd
import zarr

from annbatch._core.failures import store_errors
from annbatch._core.frames import read_frame
from annbatch._legacy import is_records, open_element
from annbatch._legacy import read_frame as read_legacy_frame
from annbatch._stores import is_url, open_zarr
from annbatch.errors import (
    CorruptDataError,
    InvalidArgumentError,
    UnsupportedDatasetError,
)

if TYPE_CHECKING:
    from anndata import AnnData

DTYPE_ATTR = "annbatch-dtype"
"""Attribute of an obs column that a collection stores in another type than the user's
(datetimes, which anndata cannot write, as ISO 8601 strings); the value is the type to restore."""


def read_obs(group: zarr.Group | h5py.Group, columns: list[str] | None = None) -> pd.DataFrame:
    """A store's obs (only ``columns``, if given), in any encoding anndata reads, with the
    types annbatch collections stored differently restored."""
    elem: Any = group["obs"]
    if is_records(elem):  # anndata < 0.7's encoding: see annbatch._legacy
        obs = read_legacy_frame(group, "obs")
        return obs if columns is None else _select(obs, columns, group)
    # Every array through the checks of annbatch._core.frames: a lost or damaged chunk of a
    # column is an error naming it, never the fill value.
    if columns is not None and elem.attrs.get("encoding-version") == "0.2.0":
        # Read only what is asked: the index and the named columns.
        missing = [c for c in columns if c not in elem.attrs.get("column-order", [])]
        if missing:
            msg = f"obs of {group} has no column {missing}"
            raise InvalidArgumentError(msg)
        index_key = elem.attrs["_index"]
        index = pd.Index(read_frame(elem[index_key], elem, "obs"))
        index.name = None if index_key == "_index" else index_key
        obs = pd.DataFrame({c: read_frame(elem[c], elem, "obs") for c in columns}, index=index)
    else:
        obs = read_frame(elem, elem, "obs")
        if columns is not None:
            obs = _select(obs, columns, group)
    return restore_types(obs, elem)


def _select(obs: pd.DataFrame, columns: list[str], group: Any) -> pd.DataFrame:
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        msg = f"obs of {group} has no column {missing}"
        raise InvalidArgumentError(msg)
    return obs[columns]


def restore_types(obs: pd.DataFrame, elem: Any) -> pd.DataFrame:
    """Columns of ``obs`` (read from the obs element ``elem``) back in the type whose
    ``annbatch-dtype`` attribute they carry."""
    for column in obs.columns:
        key = str(column)
        dtype = elem[key].attrs.get(DTYPE_ATTR) if key in elem else None
        if dtype is None:
            continue
        target = pd.api.types.pandas_dtype(dtype)
        stamps = pd.to_datetime(obs[column].astype(object), format="ISO8601", utc=True)
        if isinstance(target, pd.DatetimeTZDtype):
            obs[column] = stamps.dt.tz_convert(target.tz)
        else:
            obs[column] = stamps.dt.tz_localize(None).astype(target)
    return obs


def load_x_and_obs(
    group: zarr.Group | h5py.Group | str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
) -> AnnData:
    """Open an AnnData store with ``X`` on disk and ``obs`` in memory.

    var is not loaded: a Loader given var hands it out with every batch, and checks that all
    its datasets' var are equal. For var in the batches, set the returned AnnData's var and
    pass it to :meth:`Loader.add_adata <annbatch.Loader.add_adata>`
    (``use_collection`` yields no var, whatever its ``load_adata`` returns).

    Stores in older encodings (files written by anndata < 0.7, such as scanpy's bundled
    datasets) are read too, element by element.

    Parameters
    ----------
    group
        The store's root: ``zarr.open_group(path, mode="r")`` for zarr, or an open
        ``h5py.File(path, "r")`` for h5ad (keep it open while the Loader reads); or a path
        (``.h5ad`` files are opened read-only with h5py), or the URL of a zarr store in
        object storage (``"s3://bucket/atlas.zarr"``, ``gs://``, ``az://``, ``https://``),
        read through obstore with annbatch's chunk reader.
    storage_options
        For a URL: obstore's options (``endpoint``, ``region``, credentials,
        ``client_options``, ``retry_config``...). Credentials not given are read from the
        environment as the provider's tools do.

    Returns
    -------
    An AnnData whose ``X`` is a ``zarr.Array`` / ``h5py.Dataset`` (dense) or an
    :class:`anndata.abc.CSRDataset` (sparse), and whose ``obs`` is a DataFrame.
    """
    if isinstance(group, str | os.PathLike):
        if str(group).endswith(".h5ad") and not is_url(group):
            group = h5py.File(group, "r")
        else:
            group = open_zarr(group, storage_options=storage_options)
    elif storage_options:
        msg = "storage_options are for a URL; this store is open already"
        raise InvalidArgumentError(msg)
    if not isinstance(group, zarr.Group | h5py.Group):
        msg = f"expected a zarr.Group or h5py.Group (an AnnData store's root), got {type(group).__name__}"
        raise UnsupportedDatasetError(msg)
    if "X" not in group or "obs" not in group:
        missing = [k for k in ("X", "obs") if k not in group]
        msg = f"{group} is not an AnnData store: it has no {' or '.join(missing)}"
        raise UnsupportedDatasetError(msg)
    where = group.file.filename if isinstance(group, h5py.Group) else str(group.store_path)
    with store_errors(lambda: f"reading X and obs of the AnnData store {where}"):
        x = open_element(group["X"])
        obs = read_obs(group)
    if len(obs) != x.shape[0]:
        msg = f"the AnnData store {where} has {x.shape[0]} rows in X but {len(obs)} in obs; the store is damaged"
        raise CorruptDataError(msg)
    return anndata.AnnData(X=x, obs=obs)
