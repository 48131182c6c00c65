"""Test helper: write an AnnData as .h5ad or .zarr (by the path's suffix)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import anndata as ad

if TYPE_CHECKING:
    from pathlib import Path


def write_adata(adata: ad.AnnData, path: Path) -> str:
    """Write ``adata`` to ``path`` (nullable strings allowed, anndata's notes silenced)."""
    with warnings.catch_warnings(), ad.settings.override(allow_write_nullable_strings=True):
        warnings.simplefilter("ignore")
        if path.suffix == ".h5ad":
            adata.write_h5ad(path)
        else:
            adata.write_zarr(path)
    return str(path)
