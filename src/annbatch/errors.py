"""Exceptions raised by annbatch.

Every error derives from :class:`AnnbatchError` and also from the built-in exception that
fits it, so callers can catch either::

    AnnbatchError
    ├── InvalidArgumentError      (ValueError)    a bad or conflicting argument
    ├── ArgumentTypeError         (TypeError)     an argument of the wrong type (where the reference's
    │                                             API promises a TypeError)
    ├── DistributedNotInitializedError (RuntimeError)  ranks asked of a process group not started
    ├── IncompatibleDatasetsError (ValueError)    datasets that cannot share one Loader
    ├── ObsMismatchError          (ValueError)    obs that does not line up with its dataset
    ├── UnsupportedDatasetError   (TypeError)     an array type or sparse format we cannot read
    ├── ClosedDatasetError        (ValueError)    an HDF5 dataset whose file was closed
    ├── LoaderBusyError           (RuntimeError)  changing a Loader while it is being iterated
    ├── SamplerBusyError          (RuntimeError)  setting a sampler's mask while a pass over it runs
    ├── CollectionAlreadyUsedError (RuntimeError) a second use_collection on one Loader
    ├── StoreReadError            (OSError)       reading stored rows failed (names store, array, rows)
    │   ├── CorruptChunkError     (OSError)       on-disk bytes that do not decode, or the wrong size
    │   │   └── ChecksumMismatchError (OSError)   a chunk whose bytes do not match their checksum
    │   ├── StoreTimeoutError     (TimeoutError)  object storage that did not answer in time (names the URL)
    │   ├── ForkedRemoteReadError (OSError)       object storage read in a fork-started process (use spawn)
    │   └── MissingDataError      (FileNotFoundError)  a dataset a collection's manifest names is gone
    ├── CorruptDataError          (ValueError)    stored structure that contradicts itself (CSR indptr,
    │                                             column indices out of range, array metadata)
    ├── InputFileError            (OSError)       a collection input that is missing or unreadable
    ├── DiskFullError             (OSError)       a build or append that ran out of space (names the path)
    ├── CollectionPathError       (FileExistsError)  a collection path that holds something else
    ├── IncompleteCollectionError (RuntimeError)  a collection whose build did not finish
    ├── CollectionCompleteError   (RuntimeError)  new inputs for a finished collection without append=True
    ├── CollectionChangedError    (RuntimeError)  a collection changed under a Loader sent to a worker
    ├── DuplicateInputError       (ValueError)    an input that is already in the collection (or given twice)
    ├── GPUUnavailableError       (RuntimeError)  preload_to_gpu without CuPy or a CUDA device
    │   └── CuPyMissingError      (ImportError)   preload_to_gpu where CuPy is not installed
    └── FeatureNotAvailableError  (NotImplementedError)  a store collections cannot live on (a zarr
                                                  group neither on the local disk nor object storage)
"""

from __future__ import annotations


class AnnbatchError(Exception):
    """Base class of every error raised by annbatch."""


class InvalidArgumentError(AnnbatchError, ValueError):
    """An argument has a value outside its domain, or conflicts with another argument."""


class ArgumentTypeError(AnnbatchError, TypeError):
    """An argument is of a type that cannot work (e.g. ``classes`` that is not a
    ``pandas.Categorical``)."""


class DistributedNotInitializedError(AnnbatchError, RuntimeError):
    """Ranks were asked of torch.distributed or jax.distributed before it was initialized."""


class CollectionAlreadyUsedError(AnnbatchError, RuntimeError):
    """:meth:`annbatch.Loader.use_collection` was called a second time on one Loader."""


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


class SamplerBusyError(AnnbatchError, RuntimeError):
    """Setting a sampler's mask while a pass over it (a ``sample()`` iterator, an epoch of a
    Loader) is running."""


class StoreReadError(AnnbatchError, OSError):
    """Reading stored rows failed; the message names the store, the array and the rows or chunk.

    The error of the library underneath (h5py, zarr, a codec, the operating system) is chained
    as ``__cause__``.
    """


class CorruptChunkError(StoreReadError):
    """A chunk's bytes on disk could not be decoded, or have the wrong size (a truncated or
    damaged file)."""


class ChecksumMismatchError(CorruptChunkError):
    """A chunk's bytes do not match the CRC32C checksum stored with them."""


class StoreTimeoutError(StoreReadError, TimeoutError):
    """Object storage did not answer a read within ``ANNBATCH_REMOTE_TIMEOUT`` seconds; the
    message names the URL and the chunk."""


class ForkedRemoteReadError(StoreReadError):
    """Object storage was to be read in a process forked after its parent read object storage
    (a DataLoader worker started with "fork", torch's default on Linux). obstore's runtime does
    not survive ``fork()``: the read would wait forever. Start the workers with "spawn" or
    "forkserver" (``DataLoader(..., multiprocessing_context="spawn")``)."""


class MissingDataError(StoreReadError, FileNotFoundError):
    """A dataset that a collection's manifest names is not in its folder or bucket (deleted,
    or lost in a copy or an upload)."""


class CorruptDataError(AnnbatchError, ValueError):
    """Stored data contradicts itself: a CSR ``indptr`` that decreases or does not match the
    stored entries, column indices outside ``[0, n_var)``, or array metadata that does not fit
    the files. Raised before the data reaches any code that trusts it."""


class InputFileError(AnnbatchError, OSError):
    """An input of a collection build is missing, unreadable, or holds no AnnData."""


class DiskFullError(AnnbatchError, OSError):
    """A write of a collection build or append found no space left (ENOSPC, or a disk quota).

    The message is one line: the path that could not be written, "disk full", and what became
    of the collection (an append is undone; a first build resumes when run again). ``errno`` is
    ``ENOSPC`` (or ``EDQUOT``), as for the operating system's error, which is chained as
    ``__cause__``.
    """

    path: str = ""
    """The file or folder that could not be written."""


class CollectionPathError(AnnbatchError, FileExistsError):
    """A collection's path holds something that is not a collection (or a different build)."""


class IncompleteCollectionError(AnnbatchError, RuntimeError):
    """A collection whose build was interrupted: it cannot be read until the build finishes."""


class CollectionCompleteError(AnnbatchError, RuntimeError):
    """A finished collection was given inputs it does not hold, without ``append=True``."""


class CollectionChangedError(AnnbatchError, RuntimeError):
    """A collection that changed (an append) between making a Loader over it and reopening it
    in a DataLoader worker or DDP rank the Loader was sent to."""


class DuplicateInputError(AnnbatchError, ValueError):
    """An input whose data the collection already holds (or that a call names twice)."""


class GPUUnavailableError(AnnbatchError, RuntimeError):
    """``preload_to_gpu=True`` where CuPy or a CUDA device is missing, or in a worker process."""


class CuPyMissingError(GPUUnavailableError, ImportError):
    """``preload_to_gpu=True`` where CuPy cannot be imported (an ImportError, as for any
    missing backend)."""


class FeatureNotAvailableError(AnnbatchError, NotImplementedError):
    """A store that collections cannot live on: a :class:`~annbatch.DatasetCollection` given a
    zarr group that is neither on the local file system nor on object storage (give a path, a
    URL, or a group on zarr's ``LocalStore`` or ``ObjectStore``)."""
