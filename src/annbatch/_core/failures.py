"""What a failure of the libraries underneath (h5py, zarr, anndata, a codec, the operating
system) becomes while annbatch reads stored data: a :class:`~annbatch.errors.StoreReadError`
that names what was being read, with the original error chained."""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

from annbatch.errors import AnnbatchError, StoreReadError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


@contextmanager
def store_errors(
    what: Callable[[], str], *, first: Callable[[], None] | None = None
) -> Iterator[None]:
    """Re-raise any error but annbatch's own (and ``MemoryError``) as a ``StoreReadError``.

    Parameters
    ----------
    what
        Names the read, e.g. ``"reading rows 0:10 of zarr.Array (...)"``; called only on
        failure, so that naming costs nothing on the hot path.
    first
        Called before the ``StoreReadError`` is raised; it may raise a more precise error
        itself (a source whose HDF5 file was closed raises ``ClosedDatasetError``).
    """
    try:
        yield
    except (AnnbatchError, MemoryError):
        raise
    except Exception as e:
        if first is not None:
            first()
        msg = f"{what()} failed: {type(e).__name__}: {e}"
        raise StoreReadError(msg) from e
