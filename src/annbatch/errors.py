"""Exceptions raised by annbatch.

Every error derives from :class:`AnnbatchError` and also from the built-in exception that
fits it, so callers can catch either::

    AnnbatchError
    ├── InvalidArgumentError      (ValueError)    a bad or conflicting argument
    ├── IncompatibleDatasetsError (ValueError)    datasets that cannot share one Loader
    ├── ObsMismatchError          (ValueError)    obs that does not line up with its dataset
    ├── UnsupportedDatasetError   (TypeError)     an array type or sparse format we cannot read
    ├── ClosedDatasetError        (ValueError)    an HDF5 dataset whose file was closed
    ├── LoaderBusyError           (RuntimeError)  changing a Loader while it is being iterated
    ├── CorruptChunkError         (OSError)       on-disk bytes that do not decode
    ├── InputFileError            (OSError)       a collection input that is missing or unreadable
    ├── CollectionPathError       (FileExistsError)  a collection path that holds something else
    ├── IncompleteCollectionError (RuntimeError)  a collection whose build did not finish
    ├── GPUUnavailableError       (RuntimeError)  preload_to_gpu without CuPy or a CUDA device
    └── FeatureNotAvailableError  (NotImplementedError)  documented, not built yet
"""

from __future__ import annotations


class AnnbatchError(Exception):
    """Base class of every error raised by annbatch."""


class InvalidArgumentError(AnnbatchError, ValueError):
    """An argument has a value outside its domain, or conflicts with another argument."""


class IncompatibleDatasetsError(AnnbatchError, ValueError):
    """Datasets cannot be combined in one Loader (different columns, types or dtypes)."""


class ObsMismatchError(AnnbatchError, ValueError):
    """An obs table does not line up with the rows of its dataset."""


class UnsupportedDatasetError(AnnbatchError, TypeError):
    """A dataset is of a type or sparse format that annbatch cannot read."""


class ClosedDatasetError(AnnbatchError, ValueError):
    """A dataset lives in an HDF5 file that has been closed."""


class LoaderBusyError(AnnbatchError, RuntimeError):
    """A Loader was changed while an iteration over it was running."""


class CorruptChunkError(AnnbatchError, OSError):
    """A chunk's bytes on disk could not be decoded (truncated or damaged file)."""


class InputFileError(AnnbatchError, OSError):
    """An input of a collection build is missing, unreadable, or holds no AnnData."""


class CollectionPathError(AnnbatchError, FileExistsError):
    """A collection's path holds something that is not a collection (or a different build)."""


class IncompleteCollectionError(AnnbatchError, RuntimeError):
    """A collection whose build was interrupted: it cannot be read until the build finishes."""


class GPUUnavailableError(AnnbatchError, RuntimeError):
    """``preload_to_gpu=True`` where CuPy or a CUDA device is missing, or in a worker process."""


class FeatureNotAvailableError(AnnbatchError, NotImplementedError):
    """A documented option whose implementation has not landed yet."""
