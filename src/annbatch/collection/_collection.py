"""DatasetCollection: many AnnData inputs, rows shuffled across them, as sharded zarr datasets
(or h5ad files): the public facade over the store, the append policy, the build runner and the
h5ad collections of this package."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Self

import h5py
import pandas as pd
import zarr

from annbatch.collection import _h5ad as h5ad
from annbatch.collection import _runner as runner
from annbatch.collection._check import manifest_problems, missing_datasets, missing_message
from annbatch.collection._policy import parse_request
from annbatch.collection._store import ATTR, CollectionStore
from annbatch.errors import (
    CorruptDataError,
    InvalidArgumentError,
    MissingDataError,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import anndata as ad
    import numpy as np

    from annbatch.collection._layout import Compression

__all__ = ["ATTR", "DatasetCollection"]  # ATTR: read by annbatch._scrub

DEFAULT_DATASET_SIZE = 1_048_576
DEFAULT_MEMORY_BUDGET = 2 * 2**30


class DatasetCollection:
    """A folder of AnnData datasets (sharded zarr v3) whose rows were shuffled across inputs.

    Chunked reading only mixes rows well if rows that sit together on disk come from
    different files. A collection is written once from many inputs (h5ad or zarr AnnData
    stores, or AnnData objects), with every row sent to a random dataset and put in a random
    place there. Read it with :meth:`annbatch.Loader.use_collection`.

    Parameters
    ----------
    group
        The collection's folder, as a path or as a ``zarr.Group`` on the local file system
        (e.g. ``zarr.open_group("atlas.zarr", mode="w")``); or its place in object storage,
        as a URL (``"s3://bucket/atlas.zarr"``, read through obstore) or a ``zarr.Group`` on
        zarr's ``ObjectStore``. Nothing is written until :meth:`add_adatas`.
    mode
        As for ``zarr.open_group``: ``"r"`` read only, ``"r+"`` an existing collection,
        ``"a"`` (default) read or build, ``"w"`` delete what the folder holds first (not for
        object storage), ``"w-"`` refuse an existing collection.
    is_collection_h5ad
        The datasets are (or will be) h5ad files in the folder rather than zarr groups; a
        folder holding an annbatch h5ad collection is recognised without it.
    storage_options
        For a URL: obstore's options (``endpoint``, ``region``, credentials, ``client_options``,
        ``retry_config``...); credentials not given come from the environment.
    scratch_dir
        For object storage: the local folder where a build keeps the rows it has distributed
        to datasets but not yet uploaded (at most the collection's uncompressed size, shrinking
        as datasets are written; deleted when the build ends). Default: a folder named after
        the URL in the system's temporary folder, so that an interrupted build run again on
        the same machine resumes.

    Notes
    -----
    obs names are kept as the inputs give them (the reference library makes them unique):
    checking uniqueness over all inputs would hold every name in memory at once.

    Examples
    --------
    >>> collection = DatasetCollection("atlas.zarr").add_adatas(["a.h5ad", "b.h5ad"])  # doctest: +SKIP
    >>> loader = Loader(batch_size=4096).use_collection(collection)  # doctest: +SKIP
    """

    _added = False
    """Whether add_adatas succeeded on this object: later calls then append."""

    def __init__(
        self,
        group: zarr.Group | str | os.PathLike[str],
        *,
        mode: Literal["r", "r+", "a", "w", "w-"] = "a",
        is_collection_h5ad: bool = False,
        storage_options: dict[str, Any] | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._mode: str = mode
        store = CollectionStore.open(
            group,
            mode,
            is_collection_h5ad=is_collection_h5ad,
            storage_options=storage_options,
            scratch_dir=scratch_dir,
        )
        local_path = store.store is None and not isinstance(group, zarr.Group)
        if is_collection_h5ad or (local_path and h5ad.holds_h5ad(store.path)):
            store = h5ad.H5adStore(store.path)
        self._store = store
        store.apply_mode(mode)

    def __repr__(self) -> str:
        state = self._state()
        where = self._store.where
        if state is None:
            return f"DatasetCollection({where!r}, empty)"
        return (
            f"DatasetCollection({where!r}, {state['state']}, "
            f"{len(state['datasets'])} datasets, {sum(d['n_obs'] for d in state['datasets']):,} rows, "
            f"{len(state['var_names']):,} genes)"
        )

    def _state(self) -> dict[str, Any] | None:
        """The collection's recorded state; None if the path holds nothing yet."""
        return self._store.state()

    # ---------------------------------------------------------------------------- reading
    @property
    def path(self) -> Path:
        """The collection's folder."""
        return self._store.path

    @property
    def is_empty(self) -> bool:
        """Whether no collection is there yet (nothing was written to the path)."""
        return self._state() is None

    @property
    def mode(self) -> str:
        """How the collection was opened: ``"r"`` (read only), ``"r+"``, ``"a"``, ``"w"``
        or ``"w-"``, as for ``zarr.open_group``."""
        return self._mode

    def obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The obs of all datasets, one after another in dataset order (the Loader's row
        order after :meth:`annbatch.Loader.use_collection`).

        Parameters
        ----------
        columns
            Only these columns (``[]``: none, only the index). Default: all.
        """
        from annbatch._anndata_io import read_obs

        if columns is not None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                msg = f"columns must be a list of column names, got {columns!r}"
                raise InvalidArgumentError(msg)
            columns = list(columns)
        frames = []
        for group in self.open_datasets():
            frames.append(read_obs(group, columns=columns))
            if isinstance(group, h5py.File):
                group.close()
        if not frames:
            return pd.DataFrame(columns=columns or [])
        return pd.concat(frames, axis=0) if len(frames) > 1 else frames[0]

    @property
    def is_complete(self) -> bool:
        """Whether the collection holds data and no build is unfinished."""
        state = self._state()
        return state is not None and state["state"] == "complete"

    @property
    def dataset_names(self) -> list[str]:
        """Names of the datasets (zarr groups under :attr:`path`), in order."""
        return [d["name"] for d in self._store.complete_state()["datasets"]]

    @property
    def is_collection_h5ad(self) -> bool:
        """Whether the datasets are h5ad files (else zarr groups)."""
        return self._store.h5ad

    @property
    def datasets(self) -> list[zarr.Group]:
        """The datasets, each an AnnData zarr group opened in the collection's :attr:`mode`
        (read-only for ``"r"``, writable otherwise); a ``ValueError`` for h5ad collections
        (see :meth:`open_datasets`)."""
        if self._store.h5ad:
            msg = f"{self._store.where} is a collection of h5ad files, not of zarr groups; use open_datasets()"
            raise InvalidArgumentError(msg)
        return self.open_datasets()

    def __iter__(self) -> Iterator[zarr.Group]:
        """Each dataset's group (an AnnData zarr store), in order, opened in the collection's
        :attr:`mode`; a ``ValueError`` for h5ad collections."""
        return iter(self.datasets)

    def open_datasets(self) -> list[zarr.Group | h5py.File]:
        """Each dataset: zarr groups (as :attr:`datasets`), or ``h5py.File`` objects opened
        read-only for h5ad collections (they close when no longer referenced)."""
        return self._store.open_datasets(self._present(), self._mode)

    def _read_datasets(self) -> list[zarr.Group | h5py.File]:
        """Each dataset opened read-only, whatever the collection's mode (for the Loader; a
        local zarr collection's metadata is then read in one pass per dataset)."""
        return self._store.open_datasets(self._present(), "r")

    def _present(self) -> list[str]:
        """The datasets' names; an error if the store lacks any of them."""
        names = self.dataset_names
        lost = missing_datasets(self._store, names)
        if lost:
            raise MissingDataError(missing_message(self._store, lost))
        return names

    def __len__(self) -> int:
        return len(self.dataset_names)

    @property
    def n_obs(self) -> int:
        """Rows in all datasets."""
        return sum(d["n_obs"] for d in self._store.complete_state()["datasets"])

    @property
    def var_names(self) -> pd.Index:
        """The genes (columns) of every dataset."""
        return pd.Index(self._store.complete_state()["var_names"])

    def info(self) -> dict[str, Any]:
        """Datasets, rows, genes, dtype, codec and bytes on disk (what ``annbatch info`` prints).

        A dataset that the manifest names and the store lacks raises
        :class:`~annbatch.errors.MissingDataError`; one whose rows, genes or elements differ
        from the manifest's record raises :class:`~annbatch.errors.CorruptDataError` (neither
        reads any chunk: ``annbatch verify`` does).
        """
        state = self._store.complete_state()
        names = self._present()
        problems = manifest_problems(self)
        if problems:
            listed = "; ".join(map(str, problems[:5]))
            more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
            msg = (
                f"the collection {self._store.where} is damaged: {listed}{more}. "
                f"`annbatch verify {self._store.where}` lists every problem"
            )
            raise CorruptDataError(msg)
        datasets = self._store.describe(names, self._mode)
        return {
            "path": self._store.where,
            "format": "h5ad" if self._store.h5ad else "zarr",
            "n_datasets": len(datasets),
            "n_obs": sum(d["n_obs"] for d in datasets),
            "n_var": len(state["var_names"]),
            "bytes": sum(d["bytes"] for d in datasets),
            "datasets": datasets,
        }

    # ---------------------------------------------------------------------------- writing
    def add_adatas(
        self,
        adata_paths: Sequence[str | os.PathLike[str] | ad.AnnData | zarr.Group] | None = None,
        *,
        load_adata: Callable[[Any], ad.AnnData] | None = None,
        groupby: str | Sequence[str] | None = None,
        var_subset: Sequence[str] | None = None,
        n_obs_per_chunk: int | None = None,
        shard_size: int | str | None = None,
        zarr_compressor: Any = None,
        h5ad_compressor: str | None = "gzip",
        dataset_size: int | str = DEFAULT_DATASET_SIZE,
        shuffle_chunk_size: int | None = None,
        shuffle: bool = True,
        rng: np.random.Generator | int | None = None,
        merge: str | None = None,
        inputs: Sequence[str | os.PathLike[str] | ad.AnnData | zarr.Group] | None = None,
        var_names: Sequence[str] | None = None,
        memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
        progress: bool = True,
        compression: Compression | None = None,
        append: bool = False,
        force: bool = False,
    ) -> Self:
        """Write ``inputs`` into the collection, their rows shuffled across datasets.

        On an empty path this builds the collection. After an interrupted build, the same
        call resumes it. On a finished collection, the same call (same inputs and options)
        writes nothing and says so (a ``UserWarning``); other inputs need ``append=True``.
        Inputs are only read, never modified.

        Appending shuffles the new rows among themselves into new datasets, aligned to the
        collection's genes (genes it lacks are dropped, with a warning); existing datasets
        are not rewritten, so old and new rows mix only when the Loader reads chunks of both
        into one window. To mix everything, build a new collection from all inputs.

        obs keeps its types: a column missing from some inputs becomes pandas' nullable type
        of its kind (``boolean``, ``Int64``, ``string``; NaN for floats), categoricals get the
        union of their categories, ints meeting floats become floats, strings meeting
        categoricals become categoricals; any other disagreement is an error before anything
        is written.

        Parameters
        ----------
        adata_paths
            Paths to ``.h5ad`` files or zarr AnnData stores (any encoding anndata reads), open
            AnnData groups (``zarr.Group``, ``h5py.File``), or AnnData objects (in memory or
            backed). X must be dense in all of them or CSR in all. Also accepted as
            ``inputs=``.
        load_adata
            Called with each of ``adata_paths``; returns the AnnData whose X and obs are
            written (e.g. to leave out obs columns). Its ``src_path`` is still the path.
        groupby
            obs column(s), present in every input, by which the rows of each dataset are
            sorted (stably, after shuffling): rows of one class then lie together, as
            :class:`~annbatch.samplers.ClassSampler` needs.
        var_subset
            The genes to keep, in this order (missing ones are zeros). Default: every gene of
            any input, in order of first appearance. Also accepted as ``var_names=``.
        n_obs_per_chunk, shard_size, zarr_compressor
            X's on-disk layout, as for :func:`annbatch.write_sharded`: rows per chunk (64),
            rows or bytes per shard (``"1GB"``), and the codec (LZ4 in Blosc). Giving any of
            them chooses that layout (the reference library's); without them X gets
            annbatch's measured layout for ``compression``. A CRC32C checksum is added.
        h5ad_compressor
            The h5py compression of a collection of h5ad files (``"gzip"``, ``"lzf"`` or None).
        dataset_size
            Most rows per dataset, or a size such as ``"20GB"`` (of X, uncompressed); the
            memory budget may make datasets smaller.
        shuffle_chunk_size
            Move runs of this many consecutive input rows together (into one dataset, one
            after another). Default: single rows (the best mixing; the reference library
            moves runs of 1,000).
        shuffle
            Mix rows across inputs (default). ``False`` keeps the inputs' order: the datasets
            hold the rows one input after another.
        merge
            How the inputs' var columns are combined, as ``anndata.concat`` does it: ``None``
            (default: no var columns), ``"same"``, ``"unique"``, ``"first"`` or ``"only"``.
            Appends keep the collection's var columns.
        memory_budget
            Bytes (or a size such as ``"2GB"``) the build may hold in memory at once, about.
        rng
            Seed or generator for the shuffle. The same seed and inputs give the same
            collection.
        progress
            Show a progress bar with rows per second.
        compression
            Layout of the new datasets' X (and of the layers and obsm arrays they carry):
            ``"packed-lz4"`` (default), ``"packed"``, ``"none"``, ``"lz4"`` or ``"zstd"``.
            ``"packed"`` stores integer-valued arrays (counts) in the narrowest integer type
            that holds every value exactly and CSR gene indices as uint16 (up to 65,536
            genes), uncompressed: the Loader reads only the wanted rows' bytes and widens
            them back to the inputs' dtype (``Loader(stored_dtype=True)`` keeps the narrow
            type); other values are stored as they are. ``anndata.read_zarr`` reads the same
            values in the narrow type. ``"packed-lz4"`` also compresses the values (not the
            indices) with LZ4: on UMI-like counts a third of ``"none"``'s size at about its
            speed. ``"none"`` keeps the inputs' types, uncompressed;
            ``"lz4"`` and ``"zstd"`` compress them. Measured sizes and speeds are in
            ``benchmarks/RESULTS.md`` ("packed layouts").
        append
            Add the inputs to a finished collection (implied for later calls on the object
            whose add_adatas built or extended it, as in the reference library). Checked before anything is written: X's
            dtype and kind (dense or sparse), obs column types and genes must fit.
        force
            Add inputs whose data the collection already holds (the same content: every
            value of X, the carried layers and obsm, obs and var), or that ``inputs`` names
            twice; refused otherwise. Telling whether an input is the same reads it whole
            (only when its shape, names and first and last rows match a held input's).

        Returns
        -------
        The collection, to chain ``Loader().use_collection(...)``.
        """
        if self._mode == "r":
            msg = f"the collection {self._store.where} was opened with mode='r' (read only)"
            raise InvalidArgumentError(msg)
        if h5ad_compressor is not None and not isinstance(h5ad_compressor, str):
            msg = f"h5ad_compressor must be a codec name such as 'gzip', or None; got {h5ad_compressor!r}"
            raise InvalidArgumentError(msg)
        items, genes = _reference_keywords(adata_paths, inputs, var_subset, var_names)
        request = parse_request(
            inputs=items,
            var_names=genes,
            dataset_size=dataset_size,
            memory_budget=memory_budget,
            n_obs_per_chunk=n_obs_per_chunk,
            shard_size=shard_size,
            zarr_compressor=zarr_compressor,
            compression=compression,
            merge=merge,
            shuffle=shuffle,
            shuffle_chunk_size=shuffle_chunk_size,
            groupby=groupby,
        )
        # Later calls on the object that built the collection add to it (the reference's
        # current API); a collection opened anew takes append=True for that.
        append = append or self._added
        if isinstance(self._store, h5ad.H5adStore):
            h5ad.add(
                self._store,
                request,
                rng,
                load_adata,
                compressor=h5ad_compressor,
                append=append,
                force=force,
                progress=progress,
            )
        else:
            runner.add(
                self._store, request, rng, load_adata, append=append, force=force, progress=progress
            )
        self._added = True
        return self


# ------------------------------------------------------------- the reference's spellings
# add_adatas takes two keywords under the reference library's name and annbatch's; they are
# resolved here, in one place, so that everything past the facade knows one name for each.
# (They are keywords of one method, not methods, hence no mixin of aliases.)
def _reference_keywords(
    adata_paths: Sequence[Any] | None,
    inputs: Sequence[Any] | None,
    var_subset: Sequence[str] | None,
    var_names: Sequence[str] | None,
) -> tuple[Sequence[Any], Sequence[str] | None]:
    """``inputs`` (also ``adata_paths``) and ``var_names`` (also ``var_subset``)."""
    items = _one_of(adata_paths, inputs, "adata_paths", "inputs")
    if items is None:
        msg = "add_adatas needs adata_paths: paths to AnnData stores, or AnnData objects"
        raise InvalidArgumentError(msg)
    return items, _one_of(var_subset, var_names, "var_subset", "var_names")


def _one_of(ours: Any, theirs: Any, name: str, other: str) -> Any:
    """The argument given under one of two names that mean the same."""
    if ours is not None and theirs is not None:
        msg = f"{name} and {other} mean the same; give one"
        raise InvalidArgumentError(msg)
    return theirs if ours is None else ours
