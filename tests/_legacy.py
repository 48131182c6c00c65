"""Test helper: write a *pre-anndata-0.7* ("legacy") .h5ad file with plain h5py.

Layout mimics scanpy's bundled ``datasets/10x_pbmc68k_reduced.h5ad``:

* no ``encoding-type`` / ``encoding-version`` attributes anywhere (root included)
* ``/obs`` and ``/var`` are 1-D *compound* datasets; the first field is the
  index (named ``index``, fixed-width bytes ``S<n>``), further fields are the
  columns.  Strings are fixed-width bytes, numbers/bools native dtypes.
* categorical columns are stored as integer codes (int8 if it fits, -1 = NaN)
  inside the compound dataset; their categories live in
  ``/uns/<column>_categories`` (fixed-width bytes for string categories).
* ``/X`` is either a plain 2-D dense dataset, or a group with attributes
  ``h5sparse_format`` ("csr"/"csc") and ``h5sparse_shape`` holding
  ``data``/``indices``/``indptr`` datasets (old h5sparse convention).
* ``/obsm`` (optional) is one compound dataset, a field per entry (of shape
  ``(n_columns,)`` per row); ``/layers`` (optional) a group of dense datasets or h5sparse
  groups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import numpy as np
import pandas as pd
from scipy import sparse

if TYPE_CHECKING:
    from collections.abc import Sequence
    from os import PathLike


def _fixed_bytes(values: Sequence[str]) -> np.ndarray:
    enc = [str(v).encode("utf-8") for v in values]
    width = max((len(b) for b in enc), default=1) or 1
    return np.array(enc, dtype=f"S{width}")


def _codes_dtype(n_categories: int) -> np.dtype:
    for dt in (np.int8, np.int16, np.int32):
        if n_categories <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def _legacy_dataframe(
    index: Sequence[str], df: pd.DataFrame | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Build the compound record array plus the ``uns/<col>_categories`` arrays."""
    cols: list[tuple[str, np.ndarray]] = [("index", _fixed_bytes(index))]
    uns_cats: dict[str, np.ndarray] = {}
    if df is not None:
        for name, col in df.items():
            name = str(name)
            if isinstance(col.dtype, pd.CategoricalDtype):
                cats = col.cat.categories
                codes = col.cat.codes.to_numpy().astype(_codes_dtype(len(cats)))
                cols.append((name, codes))
                if cats.dtype.kind in "OSUT" or pd.api.types.is_string_dtype(cats):
                    uns_cats[f"{name}_categories"] = _fixed_bytes(cats)
                else:
                    uns_cats[f"{name}_categories"] = np.asarray(cats)
            elif col.dtype.kind in "biuf":
                cols.append((name, col.to_numpy()))
            elif pd.api.types.is_string_dtype(col) or col.dtype == object:
                cols.append((name, _fixed_bytes(col.astype(str).tolist())))
            else:
                msg = f"unsupported column dtype {col.dtype!r} for {name!r}"
                raise TypeError(msg)
    n = len(index)
    rec = np.empty(n, dtype=[(k, v.dtype) for k, v in cols])
    for k, v in cols:
        assert len(v) == n, (k, len(v), n)
        rec[k] = v
    return rec, uns_cats


def write_legacy_h5ad(
    path: str | PathLike[str],
    X: np.ndarray | sparse.csr_matrix | sparse.csc_matrix,
    obs: pd.DataFrame,
    var_names: Sequence[str],
    *,
    var: pd.DataFrame | None = None,
    obsm: dict[str, np.ndarray] | None = None,
    layers: dict[str, np.ndarray | sparse.csr_matrix] | None = None,
) -> None:
    """Write ``X``/``obs``/``var_names`` in the pre-0.7 anndata h5ad layout.

    ``obs.index`` becomes ``obs_names`` (cast to str).  Supported obs/var column
    dtypes: str/object, int, float, bool, categorical (string or numeric
    categories).  A categorical column name must not occur in both obs and var
    (old format limitation: a single ``uns/<col>_categories`` per name).

    Strings are stored as fixed-width bytes, so keep them ASCII: anndata
    0.12's legacy reader decodes ``S<n>`` via numpy ``astype('U')`` (ASCII) and
    raises ``UnicodeDecodeError`` on non-ASCII bytes.
    """
    n_obs, n_vars = X.shape
    if len(obs) != n_obs or len(var_names) != n_vars:
        msg = f"shape mismatch: X{X.shape}, obs {len(obs)}, var_names {len(var_names)}"
        raise ValueError(msg)
    obs_rec, obs_cats = _legacy_dataframe([str(i) for i in obs.index], obs)
    var_rec, var_cats = _legacy_dataframe([str(v) for v in var_names], var)
    clash = obs_cats.keys() & var_cats.keys()
    if clash:
        msg = f"categorical columns present in both obs and var: {sorted(clash)}"
        raise ValueError(msg)

    with h5py.File(path, "w") as f:
        _write_matrix(f, "X", X)
        if obsm:
            rec = np.empty(n_obs, dtype=[(k, v.dtype, v.shape[1:]) for k, v in obsm.items()])
            for k, v in obsm.items():
                rec[k] = v
            f.create_dataset("obsm", data=rec)
        if layers:
            group = f.create_group("layers")
            for k, v in layers.items():
                _write_matrix(group, k, v)
        f.create_dataset("obs", data=obs_rec)
        f.create_dataset("var", data=var_rec)
        uns = f.create_group("uns")
        for k, v in {**obs_cats, **var_cats}.items():
            uns.create_dataset(k, data=v)


def _write_matrix(
    parent: h5py.Group, key: str, X: np.ndarray | sparse.csr_matrix | sparse.csc_matrix
) -> None:
    """A dense dataset, or a sparse matrix as an h5sparse group."""
    if sparse.issparse(X):
        fmt = X.format
        if fmt not in {"csr", "csc"}:
            X = X.tocsr()
            fmt = "csr"
        g = parent.create_group(key)
        g.attrs["h5sparse_format"] = fmt
        g.attrs["h5sparse_shape"] = np.array(X.shape)
        g.create_dataset("data", data=X.data)
        g.create_dataset("indices", data=X.indices)
        g.create_dataset("indptr", data=X.indptr)
    else:
        parent.create_dataset(key, data=np.asarray(X))
