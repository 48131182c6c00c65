"""The Loader: streams batches of rows from on-disk AnnData arrays.

A facade: it checks arguments, keeps the datasets added (one :class:`~annbatch._core.sources.
RowSource` each, with their obs) and the resume state, and hands each epoch to
:class:`~annbatch._core.epoch.Epoch`.
"""

from __future__ import annotations

import copy
import enum
import warnings
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import pandas as pd

from annbatch._args import parse_int, parse_rng
from annbatch._compat import import_optional, torch_available
from annbatch._core import gpu
from annbatch._core.assembler import parse_concat_strategy
from annbatch._core.epoch import Epoch, read_threads
from annbatch._core.reader import common_dtype
from annbatch._core.resume import Progress, ResumePoint, same_state
from annbatch._core.sources import as_row_source
from annbatch._core.workers import current_shard, join_queue_feeders_at_exit
from annbatch.abc import Sampler
from annbatch.errors import (
    CollectionAlreadyUsedError,
    GPUUnavailableError,
    IncompatibleDatasetsError,
    InvalidArgumentError,
    LoaderBusyError,
    ObsMismatchError,
    UnsupportedDatasetError,
)
from annbatch.samplers import RandomSampler, SequentialSampler

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import zarr
    from anndata import AnnData

    from annbatch._core.assembler import ConcatStrategy
    from annbatch._core.convert import OutputKind
    from annbatch._core.sources import RowSource
    from annbatch.collection import DatasetCollection

__all__ = ["Loader", "read_threads"]

if torch_available():
    from torch.utils.data import IterableDataset as _IterableBase
else:  # torch stays optional: without it the Loader is a plain iterable.
    _IterableBase = object  # type: ignore[assignment,misc]

_SAMPLER_ARGS = ("chunk_size", "preload_nchunks", "batch_size", "shuffle", "drop_last", "rng")
_OUTPUTS = ("numpy", "torch", "jax")


class _Unset(enum.Enum):
    """Default of ``to``: not given (``to=None`` means no conversion). An enum member, so
    copies and pickles stay the same object."""

    UNSET = "unset"

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset.UNSET


class Loader(_IterableBase):
    """Stream batches of rows, with their obs, from on-disk (or in-memory) AnnData arrays.

    Rows of every added dataset form one row space, in the order the datasets were added.
    A :class:`~annbatch.abc.Sampler` (by default a :class:`~annbatch.ChunkSampler` built from
    the sampler arguments below) decides which rows are read into memory together and how
    they are cut into batches.

    Parameters
    ----------
    batch_sampler
        The sampler to draw load requests from. Excludes every sampler argument below.
    chunk_size
        Rows per contiguous read (default 512). Sampler argument.
    preload_nchunks
        Chunks read into memory together (default 32). Sampler argument.
    shuffle
        Random order (default False). Sampler argument.
    return_index
        Also yield each row's global position under ``"index"``.
    batch_size
        Rows per batch (default 1). Sampler argument.
    preload_to_gpu
        Copy each window to the GPU once (through pinned memory, overlapping the previous
        window's batches) and cut its batches there with CuPy: yield CuPy arrays or
        ``cupyx.scipy.sparse.csr_matrix``, or torch CUDA tensors with ``to="torch"``. Needs CuPy
        and a CUDA device, and cannot run inside DataLoader worker processes. CuPy's default
        memory pool is emptied after every window. Sparse integer values become floats on the
        GPU (see :mod:`annbatch._core.gpu`).
    drop_last
        Drop the epoch's last batch if it is short (default False). Sampler argument.
    to_torch
        Deprecated (a ``DeprecationWarning``): ``to_torch=True`` is ``to="torch"``,
        ``to_torch=False`` is ``to=None``. Used only when ``to`` is not given; giving both is
        an error.
    concat_strategy
        ``"concat-shuffle"`` or ``"shuffle-concat"``, see :mod:`annbatch._core.assembler`;
        both yield the same rows. Default: ``"concat-shuffle"`` for sparse data, otherwise
        ``"shuffle-concat"``.
    rng
        Generator for shuffling (default ``numpy.random.default_rng()``). Sampler argument.
    to
        What to yield: ``"torch"``, tensors (sparse CSR tensors for sparse data) sharing memory
        with the numpy buffers; ``"jax"``, ``jax.Array`` or ``jax.experimental.sparse.BCSR``
        (64-bit values stay 64-bit only with ``jax_enable_x64``); ``None`` (or ``"numpy"``),
        no conversion: numpy arrays and scipy CSR matrices, or CuPy ones with
        ``preload_to_gpu``. A missing package is an ``ImportError`` here. Not given: torch if
        it is installed, else no conversion (the documented default; the reference's 0.3.1
        defaults to no conversion).
    read_ahead
        Number of windows read in a background thread while the current window's batches are
        consumed; 0 reads in the consuming thread. Each window in flight holds
        ``chunk_size * preload_nchunks`` rows in memory.
    verify_checksums
        Chunks that carry a CRC32C checksum (annbatch collections do) are verified whenever
        they are read whole, which is always the case for compressed chunks. Uncompressed
        chunks are read in part, only the wanted rows' bytes; ``True`` reads each of those
        whole too, and verifies it (slower: see the README for the measured cost).
    stored_dtype
        Yield X's values in the dtype they are stored in. A collection in the ``packed``
        layout stores integer counts in the narrowest exact integer type (uint8, uint16...)
        and the Loader widens them back to the dtype the inputs had (float32, say); ``True``
        yields the narrow type instead (fewer bytes to move to a GPU; cast there). The type
        is chosen per dataset: datasets stored in different types are promoted to a common
        one, with a warning, as for any datasets of different dtypes. torch implements few
        operations on unsigned types beyond uint8: cast first (``batch["X"].float()``).

    Examples
    --------
    >>> loader = Loader(batch_size=4096, chunk_size=32, preload_nchunks=512, shuffle=True)
    >>> loader.add_anndata(adata)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     fit(batch["X"], batch["obs"])

    Inside ``torch.utils.data.DataLoader(loader, batch_size=None, num_workers=k,
    multiprocessing_context="spawn")`` the workers share each epoch's load requests
    round-robin, so together they yield every row once.
    """

    def __init__(
        self,
        *,
        batch_sampler: Sampler | None = None,
        chunk_size: int | None = None,
        preload_nchunks: int | None = None,
        shuffle: bool | None = None,
        return_index: bool = False,
        batch_size: int | None = None,
        preload_to_gpu: bool = False,
        drop_last: bool | None = None,
        to_torch: bool | None = None,
        concat_strategy: ConcatStrategy | None = None,
        rng: np.random.Generator | None = None,
        to: Literal["numpy", "torch", "jax"] | None = _UNSET,
        read_ahead: int = 1,
        verify_checksums: bool = False,
        stored_dtype: bool = False,
    ) -> None:
        sampler_args = {
            "chunk_size": chunk_size,
            "preload_nchunks": preload_nchunks,
            "batch_size": batch_size,
            "shuffle": shuffle,
            "drop_last": drop_last,
            "rng": rng,
        }
        given = [name for name in _SAMPLER_ARGS if sampler_args[name] is not None]
        if batch_sampler is not None:
            if given:
                msg = (
                    f"batch_sampler is given, so {', '.join(given)} must not be: "
                    "the sampler controls them"
                )
                raise InvalidArgumentError(msg)
            if not isinstance(batch_sampler, Sampler):
                msg = f"batch_sampler must be an annbatch.abc.Sampler, got {type(batch_sampler).__name__}"
                raise InvalidArgumentError(msg)
            self._sampler: Sampler = batch_sampler
        else:
            chunking = (
                512 if chunk_size is None else chunk_size,
                32 if preload_nchunks is None else preload_nchunks,
                1 if batch_size is None else batch_size,
            )
            if shuffle is not None and not isinstance(shuffle, bool | np.bool_):
                msg = f"shuffle must be a bool, got {shuffle!r}"
                raise InvalidArgumentError(msg)
            drop = False if drop_last is None else drop_last
            if shuffle:
                self._sampler = RandomSampler(*chunking, drop_last=drop, rng=rng)
            else:
                parse_rng(rng)  # checked as the samplers check it, though nothing is drawn
                self._sampler = SequentialSampler(*chunking, drop_last=drop)
        self._output: OutputKind = _parse_output(to_torch=to_torch, to=to)
        if not isinstance(preload_to_gpu, bool):
            msg = f"preload_to_gpu must be a bool, got {preload_to_gpu!r}"
            raise InvalidArgumentError(msg)
        if preload_to_gpu and self._output == "jax":
            msg = "to='jax' cannot be combined with preload_to_gpu; use to='torch' or to=None there"
            raise InvalidArgumentError(msg)
        if preload_to_gpu:
            gpu.check_available()  # CuPy and a device, before any data is added or read
        self._preload_to_gpu = preload_to_gpu
        self._concat_strategy = parse_concat_strategy(concat_strategy)
        self._read_ahead = parse_int(
            read_ahead,
            "read_ahead",
            minimum=0,
            numpy=False,
            hint=" (windows read in the background)",
        )
        for name, flag in (
            ("return_index", return_index),
            ("verify_checksums", verify_checksums),
            ("stored_dtype", stored_dtype),
        ):
            if not isinstance(flag, bool):
                msg = f"{name} must be a bool, got {flag!r}"
                raise InvalidArgumentError(msg)
        self._return_index = return_index
        self._verify_checksums = verify_checksums
        self._stored_dtype = stored_dtype
        self._sources: list[RowSource] = []
        self._obs: list[pd.DataFrame | None] = []
        self._obs_all: pd.DataFrame | None = None  # concatenation of self._obs, built lazily
        self._var: pd.DataFrame | None = None
        self._active_iterations = 0
        self._used_collection = False
        self._progress = Progress()  # the running epoch and a pending resume point

    # ----------------------------------------------------------------------------- attributes
    @property
    def batch_sampler(self) -> Sampler:
        """The sampler that decides which rows are read together and how they are batched."""
        return self._sampler

    @property
    def _batch_sampler(self) -> Sampler:
        """The sampler, under the reference library's private name, which clients read and set
        (scvi-tools gives a ``copy.copy`` of the Loader a new sampler with a ``mask`` for its
        training and validation rows). Setting it changes the sampler this Loader iterates
        with, and forgets a resume point loaded for the previous one."""
        return self._sampler

    @_batch_sampler.setter
    def _batch_sampler(self, sampler: Sampler) -> None:
        if self._active_iterations:
            msg = "cannot change the sampler while the Loader is being iterated"
            raise LoaderBusyError(msg)
        if not isinstance(sampler, Sampler):
            msg = f"the sampler must be an annbatch.abc.Sampler, got {type(sampler).__name__}"
            raise InvalidArgumentError(msg)
        self._sampler = sampler
        self._progress = Progress()

    @property
    def dataset_type(self) -> type | None:
        """Type of the added datasets (e.g. ``zarr.Array``); None before any is added."""
        return self._sources[0].dataset_type if self._sources else None

    @property
    def var(self) -> pd.DataFrame | None:
        """The datasets' var (one row per column), or None if none was given."""
        return self._var

    @property
    def n_obs(self) -> int:
        """Number of rows over all datasets."""
        return sum(s.shape[0] for s in self._sources)

    @property
    def n_var(self) -> int:
        """Number of columns, common to all datasets. A ``ValueError`` before any is added."""
        if not self._sources:
            msg = "the Loader has no data yet, so no n_var; add a dataset first"
            raise InvalidArgumentError(msg)
        return self._sources[0].shape[1]

    def __len__(self) -> int:
        """Number of batches in one epoch (all DataLoader workers together)."""
        return self._sampler.n_batches(self.n_obs)

    def __repr__(self) -> str:
        kind = self.dataset_type.__name__ if self.dataset_type else "no data"
        return (
            f"Loader({len(self._sources)} datasets of {kind}, n_obs={self.n_obs}, "
            f"n_var={self.n_var if self._sources else None}, sampler={self._sampler!r})"
        )

    # --------------------------------------------------------------------------------- adding
    def add_anndata(self, adata: AnnData) -> Self:
        """Append an AnnData whose ``X`` is a ``zarr.Array``, ``h5py.Dataset`` or CSR dataset.

        Its ``obs`` is yielded with each batch, row for row.
        """
        return self.add_anndatas([adata])

    def add_anndatas(self, adatas: Sequence[AnnData]) -> Self:
        """Append several AnnData objects; see :meth:`add_anndata`."""
        return self._add_anndatas(adatas, with_var=False)

    def add_adata(self, adata: AnnData) -> Self:
        """Append an AnnData, as :meth:`add_anndata`, and take ``adata.var`` as the Loader's
        var (the spelling of the reference library's current release)."""
        return self._add_anndatas([adata], with_var=True)

    def add_adatas(self, adatas: Sequence[AnnData]) -> Self:
        """Append several AnnData objects with their var; see :meth:`add_adata`."""
        return self._add_anndatas(adatas, with_var=True)

    def _add_anndatas(self, adatas: Sequence[AnnData], *, with_var: bool) -> Self:
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
        if not with_var:
            return self.add_datasets(datasets, obs)
        return self.add_datasets(datasets, obs, var=[getattr(a, "var", None) for a in adatas])

    def add_dataset(
        self, dataset: Any, obs: pd.DataFrame | None = None, var: pd.DataFrame | None = None
    ) -> Self:
        """Append one array (``zarr.Array``, ``h5py.Dataset``, CSR dataset, numpy or scipy CSR).

        Parameters
        ----------
        dataset
            Rows along axis 0.
        obs
            One row per dataset row, yielded with the batches.
        var
            One row per column; every dataset of the Loader must have an equal one. Yielded
            with every batch (``batch["var"]``) and kept as :attr:`var`.
        """
        return self.add_datasets([dataset], None if obs is None else [obs], var=var)

    def add_datasets(
        self,
        datasets: Sequence[Any],
        obs: Sequence[pd.DataFrame] | None = None,
        var: pd.DataFrame | Sequence[pd.DataFrame | None] | None = None,
    ) -> Self:
        """Append several arrays of the same type and column count; see :meth:`add_dataset`.

        ``var`` is one DataFrame for all of them, or one per dataset (all equal). Nothing is
        added unless every dataset is valid.
        """
        if self._active_iterations:
            msg = (
                "cannot add data while the Loader is being iterated; finish the loop (or close "
                "its iterator) first"
            )
            raise LoaderBusyError(msg)
        datasets = list(datasets)
        obs_list: list[pd.DataFrame | None] = [None] * len(datasets) if obs is None else list(obs)
        if len(obs_list) != len(datasets):
            msg = (
                f"got {len(datasets)} datasets but {len(obs_list)} obs tables; pass one per dataset"
            )
            raise ObsMismatchError(msg)
        first = len(self._sources)
        new = [
            as_row_source(
                d,
                where=f"dataset {first + i}",
                verify_checksums=self._verify_checksums,
                stored_dtype=self._stored_dtype,
            )
            for i, d in enumerate(datasets)
        ]
        for i, (source, o) in enumerate(zip(new, obs_list, strict=True)):
            self._check_compatible(
                source,
                o,
                position=first + i,
                earlier=[*self._sources, *new[:i]],
                earlier_obs=[*self._obs, *obs_list[:i]],
            )
        var_frame = self._check_var(var, new, first)
        self._sources.extend(new)
        self._obs.extend(obs_list)
        self._obs_all = None
        if var_frame is not None:
            self._var = var_frame
        return self

    def _check_var(
        self,
        var: pd.DataFrame | Sequence[pd.DataFrame | None] | None,
        new: Sequence[RowSource],
        first: int,
    ) -> pd.DataFrame | None:
        """The one var of ``var`` (given for the new datasets), checked against the columns and
        the Loader's var; None when none is given."""
        frames = [var] * len(new) if var is None or isinstance(var, pd.DataFrame) else list(var)
        if len(frames) != len(new):
            msg = f"got {len(new)} datasets but {len(frames)} var tables; pass one, or one per dataset"
            raise ObsMismatchError(msg)
        found = self._var
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

    def use_collection(
        self,
        collection: DatasetCollection,
        *,
        load_adata: Callable[[zarr.Group], AnnData] | None = None,
    ) -> Self:
        """Read every dataset of a :class:`~annbatch.DatasetCollection`.

        Callable once per Loader (add further data with :meth:`add_anndatas`).

        Parameters
        ----------
        collection
            A complete collection.
        load_adata
            Opens one dataset (a zarr group) as an AnnData whose X is on disk; whatever obs
            it returns is yielded with the batches (its var is not: for a var in every batch,
            pass the loaded AnnData objects to :meth:`add_adatas` instead). Default
            :func:`annbatch.load_x_and_obs` (X and all of obs); pass your own to load only the
            obs columns you need.
        """
        from annbatch._anndata_io import load_x_and_obs
        from annbatch.collection import DatasetCollection

        if self._used_collection:
            msg = "use_collection can be called once per Loader; add more data with add_anndatas"
            raise CollectionAlreadyUsedError(msg)
        if not isinstance(collection, DatasetCollection):
            msg = f"use_collection expects an annbatch.DatasetCollection, got {type(collection).__name__}"
            raise UnsupportedDatasetError(msg)
        load = load_x_and_obs if load_adata is None else load_adata
        if not callable(load):
            msg = f"load_adata must be a callable taking a zarr.Group, got {load!r}"
            raise InvalidArgumentError(msg)
        groups = collection.open_datasets()
        if load_adata is None and groups and "X" not in groups[0]:
            first: Any = groups[0]
            paths = [f"{key}/{name}" for key in ("layers", "obsm") for name in first.get(key, {})]
            msg = (
                f"the collection {collection.path} holds no X (its inputs had none), only "
                f"{', '.join(paths)}; stream one of those: "
                f"loader.add_datasets([g[{paths[0]!r}] for g in collection])"
            )
            raise UnsupportedDatasetError(msg)
        self.add_anndatas([load(group) for group in groups])
        self._used_collection = True
        return self

    @staticmethod
    def _check_compatible(
        source: RowSource,
        obs: pd.DataFrame | None,
        *,
        position: int,
        earlier: Sequence[RowSource],
        earlier_obs: Sequence[pd.DataFrame | None],
    ) -> None:
        where = f"dataset {position} ({source.describe()})"
        if obs is not None:
            if not isinstance(obs, pd.DataFrame):
                msg = f"obs of {where} is a {type(obs).__name__}; expected a pandas.DataFrame"
                raise ObsMismatchError(msg)
            if len(obs) != source.shape[0]:
                msg = f"obs of {where} has {len(obs)} rows; the dataset has {source.shape[0]}"
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
            warnings.warn(
                f"{where} has dtype {source.dtype}, the Loader's earlier datasets {before}: "
                f"batches are yielded as {common} (numpy.result_type)",
                UserWarning,
                stacklevel=4,
            )
        if (obs is None) != (earlier_obs[0] is None):
            has = "has no obs" if obs is None else "has obs"
            others = "have obs" if obs is None else "have none"
            msg = f"{where} {has} but the Loader's earlier datasets {others}; give obs for all or none"
            raise ObsMismatchError(msg)

    # ---------------------------------------------------------------------- epochs and resume
    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch`` next; forwarded to the sampler (see
        :meth:`annbatch.ChunkSampler.set_epoch`). Call it before every epoch when ranks or
        DataLoader workers read, as with ``torch.utils.data.DistributedSampler``."""
        self._sampler.set_epoch(epoch)

    def state_dict(self, batches_seen: int | None = None) -> dict[str, Any]:
        """Where training stands: the sampler's state at the start of the current epoch and
        the number of its batches already consumed.

        :meth:`load_state_dict` on a Loader over the same data then yields exactly the rest
        of that epoch (none of its rows twice), and later epochs as they would have been.
        After :meth:`load_state_dict`, the loaded state is returned until the epoch it
        belongs to begins, so a second interruption before the first batch loses nothing.

        Parameters
        ----------
        batches_seen
            Batches of the current epoch that training consumed, those consumed before a
            resume included. Default: the number this Loader yielded, which is right when it
            is iterated in this process. Under a ``DataLoader`` with workers, the Loader in
            this process does not see the batches: pass the count taken from the DataLoader,
            and call :meth:`set_epoch` before each epoch, so that the workers' order depends
            on the epoch alone (resuming without it is an error in the workers).
        """
        if batches_seen is not None:
            batches_seen = parse_int(batches_seen, "batches_seen", minimum=0, numpy=False)
        now = self._sampler.state_dict()  # raises for samplers that cannot be resumed
        return self._progress.current(now, batches_seen, self._sampler._epoch_of).as_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the epoch it was taken in yields its remaining
        batches only, wherever it runs (this process, DataLoader workers); later epochs are
        whole."""
        if self._active_iterations:
            msg = "cannot load a state while the Loader is being iterated"
            raise LoaderBusyError(msg)
        point = ResumePoint.parse(state)
        self._sampler.load_state_dict(point.sampler)
        self._progress.load(point)

    # ------------------------------------------------------------------------------ iterating
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield one epoch of batches: ``{"X": ..., "obs": DataFrame | None, "var": DataFrame |
        None, "index": array | None}``."""
        if not self._sources:
            msg = "the Loader has no data; add some with add_anndata or add_dataset first"
            raise InvalidArgumentError(msg)
        for source in self._sources:
            source.check_open()
        device = None
        if self._preload_to_gpu:
            self._check_gpu_iteration()
            device = gpu.current_device()  # the consumer's (under DDP, the rank's) device
        return self._iterate(device)

    def _check_gpu_iteration(self) -> None:
        if current_shard().count > 1:
            msg = (
                "preload_to_gpu=True cannot run inside DataLoader worker processes (each would "
                "hold its own CUDA context and windows); iterate the Loader in the main process "
                "(num_workers=0), or use preload_to_gpu=False with workers"
            )
            raise GPUUnavailableError(msg)
        if self._sources[0].is_sparse:
            # raises for dtypes CuPy cannot hold (after promotion of mixed dtypes)
            gpu.device_sparse_dtype(common_dtype(self._sources))

    def _iterate(self, device: int | None = None) -> Iterator[dict[str, Any]]:
        """One epoch (see :class:`~annbatch._core.epoch.Epoch`), with the bookkeeping that
        :meth:`state_dict` reads."""
        sampler = self._sampler
        try:
            start: dict[str, Any] | None = sampler.state_dict()
        except InvalidArgumentError:  # a sampler that cannot be resumed
            start = None
        skip = self._progress.begin(start, sampler._epoch_of)
        shard = current_shard()
        if shard.seed is not None:
            join_queue_feeders_at_exit()  # an epoch ended early must not abort the worker
            # DataLoader workers: one order for all workers of the epoch, a new one each epoch.
            sampler.reseed(shard.seed)
            if skip and not same_state(sampler.state_dict(), start):
                msg = (
                    "cannot resume under DataLoader workers: the sampler's order depends on "
                    "the DataLoader's seed of this epoch, which the interrupted run had drawn "
                    "differently; call loader.set_epoch(epoch) before every epoch (in the run "
                    "that saves the state and in the one that resumes)"
                )
                raise InvalidArgumentError(msg)
        epoch = Epoch(
            sources=self._sources,
            sampler=sampler,
            strategy=self._concat_strategy
            or ("concat-shuffle" if self._sources[0].is_sparse else "shuffle-concat"),
            obs=self._all_obs(),
            var=self._var,
            output=self._output,
            return_index=self._return_index,
            read_ahead=self._read_ahead,
            skip=skip,
            device=device,
        )
        batches = epoch.batches()
        self._active_iterations += 1
        try:
            for batch in batches:
                self._progress.handed_over()  # counted as consumed once handed over
                yield batch
            self._progress.end()
        finally:
            self._active_iterations -= 1
            batches.close()

    def _all_obs(self) -> pd.DataFrame | None:
        if self._obs_all is None and self._obs and self._obs[0] is not None:
            # Tables of empty datasets add no rows; leaving them out keeps pandas from
            # changing column dtypes because of them.
            frames = [o for o in self._obs if o is not None and len(o)] or [self._obs[0]]
            self._obs_all = pd.concat(frames, axis=0) if len(frames) > 1 else frames[0]
        return self._obs_all

    def __copy__(self) -> Self:
        """A Loader over the same datasets (shared, not reread) with state of its own: its
        sampler (a deep copy), its epoch and resume progress, and its lists of datasets, so
        that iterating, resuming, adding data or setting :attr:`_batch_sampler` on one copy
        leaves the other as it was. A custom sampler that cannot be deep-copied (it holds a
        lock or an open file, say) is shared by both."""
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        try:
            new._sampler = copy.deepcopy(self._sampler)
        except (TypeError, copy.Error):
            new._sampler = self._sampler
        new._progress = copy.copy(self._progress)
        new._sources = list(self._sources)
        new._obs = list(self._obs)
        new._active_iterations = 0
        return new

    def __getstate__(self) -> dict[str, Any]:
        # Sent to DataLoader workers: a worker starts with no iteration running.
        state = self.__dict__.copy()
        state["_active_iterations"] = 0
        state["_progress"] = self._progress.for_worker()
        state["_obs_all"] = None
        return state


def _type_name(t: type) -> str:
    """A type as users spell it: ``zarr.Array``, ``anndata.abc.CSRDataset``..."""
    if t.__name__ == "CSRDataset":
        return "anndata.abc.CSRDataset"
    return f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def _parse_output(*, to_torch: bool | None, to: object) -> OutputKind:
    """The output kind from ``to`` (``"torch"``, ``"jax"``, ``"numpy"`` or None: no conversion)
    or, when ``to`` is not given, the deprecated ``to_torch`` (unset: torch if importable)."""
    if to is not _UNSET:
        if to_torch is not None:
            msg = (
                f"pass either to={to!r} or to_torch={to_torch!r}, not both (to_torch is deprecated)"
            )
            raise InvalidArgumentError(msg)
        if to is not None and to not in _OUTPUTS:
            msg = f"to must be 'torch', 'jax', 'numpy' or None (no conversion), got {to!r}"
            raise InvalidArgumentError(msg)
        kind: OutputKind = "numpy" if to is None else to  # type: ignore[assignment]
        if kind != "numpy":
            import_optional(kind, purpose=f"to={kind!r}", extra=kind)  # ImportError now, not later
        return kind
    if to_torch is None:
        return "torch" if torch_available() else "numpy"
    if not isinstance(to_torch, bool):
        msg = f"to_torch must be a bool or None, got {to_torch!r}"
        raise InvalidArgumentError(msg)
    warnings.warn(
        "to_torch is deprecated; pass to='torch' or to=None (no conversion) instead",
        DeprecationWarning,
        stacklevel=3,
    )
    if to_torch:
        import_optional("torch", purpose="to_torch=True", extra="torch")
    return "torch" if to_torch else "numpy"
