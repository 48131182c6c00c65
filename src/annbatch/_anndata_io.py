"""Open AnnData stores with X left on disk."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata
import h5py
import zarr

from annbatch._core.failures import store_errors
from annbatch.errors import (
    CorruptDataError,
    UnsupportedDatasetError,
)

if TYPE_CHECKING:
    from anndata import AnnData


def load_x_and_obs(group: zarr.Group | h5py.Group) -> AnnData:
    """Open an AnnData store with ``X`` on disk and ``obs`` in memory.

    Parameters
    ----------
    group
        The store's root: ``zarr.open_group(path, mode="r")`` for zarr, or an open
        ``h5py.File(path, "r")`` for h5ad (keep it open while the Loader reads).

    Returns
    -------
    An AnnData whose ``X`` is a ``zarr.Array`` / ``h5py.Dataset`` (dense) or an
    :class:`anndata.abc.CSRDataset` (sparse), and whose ``obs`` is a DataFrame.
    """
    if not isinstance(group, zarr.Group | h5py.Group):
        msg = f"expected a zarr.Group or h5py.Group (an AnnData store's root), got {type(group).__name__}"
        raise UnsupportedDatasetError(msg)
    if "X" not in group or "obs" not in group:
        missing = [k for k in ("X", "obs") if k not in group]
        msg = f"{group} is not an AnnData store: it has no {' or '.join(missing)}"
        raise UnsupportedDatasetError(msg)
    where = group.file.filename if isinstance(group, h5py.Group) else str(group.store_path)
    with store_errors(lambda: f"reading X and obs of the AnnData store {where}"):
        x = group["X"]
        if isinstance(x, zarr.Group | h5py.Group):
            x = anndata.io.sparse_dataset(x)
        obs = anndata.io.read_elem(group["obs"])
    if len(obs) != x.shape[0]:
        msg = f"the AnnData store {where} has {x.shape[0]} rows in X but {len(obs)} in obs; the store is damaged"
        raise CorruptDataError(msg)
    return anndata.AnnData(X=x, obs=obs)
