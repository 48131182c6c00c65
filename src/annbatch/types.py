"""Typed dictionaries of the reference library's current API (plain dicts at run time).

:class:`LoadRequest` is what a custom sampler's ``_sample`` may yield instead of an
:class:`annbatch.abc.LoadRequest`; :class:`LoaderOutput` is one batch of the Loader.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["LoadRequest", "LoaderOutput"]


class LoadRequest(TypedDict):
    """Rows read into memory together, and (optionally) how they are cut into batches."""

    requests: list[slice] | np.ndarray
    """Row ranges over the global row space (slices with step 1, none empty), or an integer
    array of row positions (any order; repeats allowed)."""
    chunks: NotRequired[list[slice]]
    """The old name of ``requests`` (deprecated; give one of the two)."""
    splits: NotRequired[list[np.ndarray]]
    """One integer array per batch of positions into the rows in request order (the order
    the slices or positions are listed). Missing: batches of ``batch_size`` rows, shuffled
    first if the sampler shuffles."""


class LoaderOutput(TypedDict):
    """One batch yielded by :class:`annbatch.Loader`."""

    X: Any
    """The rows: numpy / scipy CSR, torch, jax or CuPy, depending on ``to`` and
    ``preload_to_gpu``; dense whatever the datasets store with ``dense=True``."""
    obs: pd.DataFrame | None
    """The rows' obs, row for row (None when the datasets have none)."""
    var: pd.DataFrame | None
    """The datasets' var (None when none was given)."""
    index: np.ndarray | None
    """Each row's global position (with ``return_index=True``; else None)."""
