"""The Loader: streams batches of rows from on-disk AnnData arrays.

A facade: it takes checked arguments (:mod:`annbatch._loader_args`), keeps its datasets
(:class:`~annbatch._loader_data.LoaderData`) and its resume progress
(:mod:`annbatch._core.resume`), and hands each epoch to :class:`~annbatch._core.epoch.Epoch`.
Its resume protocol (``set_epoch``, ``state_dict``, ``load_state_dict``) is inherited from
:class:`~annbatch._core.resume.Resumable`, and the reference library's other spellings of
its methods from :class:`~annbatch._reference.LoaderAliases`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Literal, Self

from annbatch._args import parse_int
from annbatch._compat import torch_available
from annbatch._core.assembler import parse_concat_strategy
from annbatch._core.buffers import BufferPool
from annbatch._core.epoch import Epoch, read_threads
from annbatch._core.lent import BatchMemory
from annbatch._core.resume import Progress, Resumable, start_epoch
from annbatch._loader_args import (
    UNSET,
    gpu_device,
    parse_flag,
    parse_output,
    parse_preload_to_gpu,
    parse_sampler,
)
from annbatch._loader_data import LoaderData, collection_parts
from annbatch._reference import LoaderAliases
from annbatch.abc import Sampler
from annbatch.errors import (
    CollectionAlreadyUsedError,
    InvalidArgumentError,
    LoaderBusyError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import numpy as np
    import pandas as pd
    import zarr
    from anndata import AnnData

    from annbatch._core.assembler import ConcatStrategy
    from annbatch.collection import DatasetCollection

__all__ = ["Loader", "read_threads"]

if torch_available():
    from torch.utils.data import IterableDataset as _IterableBase
else:  # torch stays optional: without it the Loader is a plain iterable.
    _IterableBase = object  # type: ignore[assignment,misc]


class Loader(LoaderAliases, Resumable, _IterableBase):
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
        GPU: float32 for integers of up to 16 bits, float64 for wider ones, so every value
        stays exact (the documentation's Loader page, "GPU").
    drop_last
        Drop the epoch's last batch if it is short (default False). Sampler argument.
    to_torch
        Deprecated (a ``DeprecationWarning``): ``to_torch=True`` is ``to="torch"``,
        ``to_torch=False`` is ``to=None``. Used only when ``to`` is not given; giving both is
        an error.
    concat_strategy
        How a window's chunks are cut into batches; both yield the same rows in the same
        order. ``"concat-shuffle"`` joins the chunks into one buffer and takes each batch's
        rows from it (the window is held twice at its peak); ``"shuffle-concat"`` takes each
        batch's rows from the chunks it touches. Default: ``"concat-shuffle"`` for sparse
        data, otherwise ``"shuffle-concat"``.
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
        whole too, and verifies it (slower: the measured cost is in the documentation's
        page on damaged data).
    stored_dtype
        Yield X's values in the dtype they are stored in. A collection in the ``packed``
        layout stores integer counts in the narrowest exact integer type (uint8, uint16...)
        and the Loader widens them back to the dtype the inputs had (float32, say); ``True``
        yields the narrow type instead (fewer bytes to move to a GPU; cast there). The type
        is chosen per dataset: datasets stored in different types are promoted to a common
        one, with a warning, as for any datasets of different dtypes. torch implements few
        operations on unsigned types beyond uint8: cast first (``batch["X"].float()``).
    dense
        Yield X dense whatever the datasets store: a numpy array, with ``to="torch"`` a
        tensor sharing its memory, with ``to="jax"`` a ``jax.Array``. Sparse batches
        are made dense on the read threads, where they are cut from their window, a group of
        consecutive batches into one zeroed array (each batch a view of it; holding a batch
        keeps its group in memory, which is reused for later batches only once every batch
        of the group is dropped). The values are exactly the
        sparse batch's ``toarray()``, in the same dtype: the datasets' (for a ``packed``
        collection the inputs', float32 for counts as usually written; with
        ``stored_dtype`` the stored type). Dense datasets are yielded as without it. On a CPU
        this is much faster than densifying in the training loop (torch's
        ``Tensor.to_dense()`` on sparse CSR tensors; see ``benchmarks/RESULTS.md``), at a cost
        in memory: a window's batches are cut ahead of the consumer, so each window in
        flight holds ``chunk_size * preload_nchunks * n_var`` values dense. Cannot be
        combined with ``preload_to_gpu`` (densify on the device there).

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
        to: Literal["numpy", "torch", "jax"] | None = UNSET,
        read_ahead: int = 1,
        verify_checksums: bool = False,
        stored_dtype: bool = False,
        dense: bool = False,
    ) -> None:
        self._sampler = parse_sampler(
            batch_sampler,
            chunk_size=chunk_size,
            preload_nchunks=preload_nchunks,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            rng=rng,
        )
        self._output = parse_output(to_torch=to_torch, to=to)
        self._dense = parse_flag(dense, "dense")
        self._preload_to_gpu = parse_preload_to_gpu(preload_to_gpu, self._output, dense=self._dense)
        self._concat_strategy = parse_concat_strategy(concat_strategy)
        hint = " (windows read in the background)"
        self._read_ahead = parse_int(read_ahead, "read_ahead", minimum=0, numpy=False, hint=hint)
        # Sparse windows' memory, kept from window to window and epoch to epoch: two arrays
        # for each window that can be alive at once (the consumed one, those read ahead).
        self._buffers = BufferPool(capacity=2 * (self._read_ahead + 2))
        # Batches' memory, taken back once the user drops a batch (annbatch._core.lent).
        self._memory = BatchMemory()
        self._return_index = parse_flag(return_index, "return_index")
        self._data = LoaderData(
            verify_checksums=parse_flag(verify_checksums, "verify_checksums"),
            stored_dtype=parse_flag(stored_dtype, "stored_dtype"),
        )
        self._active_iterations = 0
        self._used_collection = False
        self._progress = Progress()  # the running epoch and a pending resume point

    # ----------------------------------------------------------------------------- attributes
    @property
    def batch_sampler(self) -> Sampler:
        """The sampler that decides which rows are read together and how they are batched."""
        return self._sampler

    def _set_sampler(self, sampler: Sampler) -> None:
        """Iterate with ``sampler`` from now on, forgetting a resume point loaded for the old."""
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
        return self._data.dataset_type

    @property
    def var(self) -> pd.DataFrame | None:
        """The datasets' var (one row per column), or None if none was given."""
        return self._data.var

    @property
    def n_obs(self) -> int:
        """Number of rows over all datasets."""
        return self._data.n_obs

    @property
    def n_var(self) -> int:
        """Number of columns, common to all datasets. A ``ValueError`` before any is added."""
        return self._data.n_var

    def __len__(self) -> int:
        """Number of batches in one epoch (all DataLoader workers together)."""
        return self._sampler.n_batches(self.n_obs)

    def __repr__(self) -> str:
        kind = self.dataset_type.__name__ if self.dataset_type else "no data"
        return (
            f"Loader({len(self._data.sources)} datasets of {kind}, n_obs={self.n_obs}, "
            f"n_var={self.n_var if self._data.sources else None}, sampler={self._sampler!r})"
        )

    # --------------------------------------------------------------------------------- adding
    def add_datasets(
        self,
        datasets: Sequence[Any],
        obs: Sequence[pd.DataFrame | None] | None = None,
        var: pd.DataFrame | Sequence[pd.DataFrame | None] | None = None,
    ) -> Self:
        """Append arrays of one type and column count (``zarr.Array``, ``h5py.Dataset``, CSR
        dataset, numpy or scipy CSR; rows along axis 0). Nothing is added unless every one is
        valid.

        Parameters
        ----------
        datasets
            The arrays, in the order their rows are numbered.
        obs
            One table per dataset, one row per dataset row, yielded with the batches.
        var
            One table for all datasets or one per dataset (all equal), one row per column;
            yielded with every batch (``batch["var"]``) and kept as :attr:`var`.
        """
        self._refuse_while_iterating()
        self._data.add(datasets, obs, var)
        return self

    def _refuse_while_iterating(self) -> None:
        """Datasets cannot change under a running epoch."""
        if self._active_iterations:
            msg = (
                "cannot add data while the Loader is being iterated; finish the loop (or close "
                "its iterator) first"
            )
            raise LoaderBusyError(msg)

    def use_collection(
        self,
        collection: DatasetCollection,
        *,
        load_adata: Callable[[zarr.Group], AnnData] | None = None,
        obs_index: bool = False,
    ) -> Self:
        """Read every dataset of a :class:`~annbatch.DatasetCollection`.

        Callable once per Loader (add further data with :meth:`add_anndatas`).

        Parameters
        ----------
        collection
            A complete collection.
        load_adata
            Opens one dataset (a zarr group) as an AnnData whose X is on disk; whatever obs
            it returns is yielded with the batches, held in memory (its var is not: for a var
            in every batch, pass the loaded AnnData objects to :meth:`add_adatas` instead).
            Default: X on disk and every obs column read per window from disk, with X's
            checks, so that memory for obs does not grow with the collection (the
            documentation's page on collections, "obs").
        obs_index
            With the default ``load_adata``: also read the obs index (cell names, held in
            memory) and index each batch's obs by it. Without it, batches' obs are indexed by
            their rows' global positions.
        """
        if self._used_collection:
            msg = "use_collection can be called once per Loader; add more data with add_anndatas"
            raise CollectionAlreadyUsedError(msg)
        obs_index = parse_flag(obs_index, "obs_index")
        self._refuse_while_iterating()
        if load_adata is None:
            self._data.add_collection(collection, obs_index=obs_index)
        else:
            self.add_datasets(*collection_parts(collection, load_adata, obs_index=obs_index))
        self._used_collection = True
        return self

    # ------------------------------------------------------------------------------ iterating
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield one epoch of batches: ``{"X": ..., "obs": DataFrame | None, "var": DataFrame |
        None, "index": array | None}``."""
        sources = self._data.sources
        if not sources:
            msg = "the Loader has no data; add some with add_anndata or add_dataset first"
            raise InvalidArgumentError(msg)
        for source in sources:
            source.check_open()
        device = gpu_device(sources) if self._preload_to_gpu else None
        return self._iterate(device)

    def _iterate(self, device: int | None = None) -> Iterator[dict[str, Any]]:
        """One epoch (see :class:`~annbatch._core.epoch.Epoch`), with the bookkeeping that
        :meth:`state_dict` reads."""
        skip = start_epoch(self._sampler, self._progress)
        sparse = self._data.sources[0].is_sparse
        epoch = Epoch(
            sources=self._data.sources,
            sampler=self._sampler,
            strategy=self._concat_strategy or ("concat-shuffle" if sparse else "shuffle-concat"),
            obs=self._data.obs_rows(),
            var=self._data.var,
            output=self._output,
            return_index=self._return_index,
            read_ahead=self._read_ahead,
            skip=skip,
            device=device,
            dense=self._dense,
            buffers=self._buffers,
            memory=self._memory,
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
        new._data = copy.copy(self._data)
        new._buffers = copy.copy(self._buffers)  # a pool of its own, empty
        new._memory = copy.copy(self._memory)
        new._active_iterations = 0
        return new

    def __getstate__(self) -> dict[str, Any]:
        # Sent to DataLoader workers: a worker starts with no iteration running.
        state = self.__dict__.copy()
        state["_active_iterations"] = 0
        state["_progress"] = self._progress.for_worker()
        return state
