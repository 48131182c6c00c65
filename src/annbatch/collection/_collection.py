"""DatasetCollection: many AnnData inputs, rows shuffled across them, as sharded zarr datasets."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import zarr

from annbatch._args import parse_int, parse_size
from annbatch._core.frames import read_frame
from annbatch._stores import is_url, zarr_object_store
from annbatch.collection import _h5ad as h5ad
from annbatch.collection._build import (
    BuildPlan,
    RowOrder,
    assign_datasets,
    checkpoint,
    distribute,
    plan_build,
    progress_bar,
    write_datasets,
)
from annbatch.collection._check import manifest_problems, missing_datasets, missing_message
from annbatch.collection._disk import full_disk_cause, naming, with_consequence
from annbatch.collection._encoding import FOREIGN, foreign_state, has_encoding, with_encoding
from annbatch.collection._fingerprint import Fingerprints, recorded, recorded_build
from annbatch.collection._inputs import (
    SOURCE_COLUMN,
    ElementSpec,
    element_specs,
    open_inputs,
    union_var_names,
)
from annbatch.collection._layout import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    Compression,
    XLayout,
    describe_x,
    parse_compression,
    parse_layout,
)
from annbatch.collection._obs import (
    ColumnType,
    ObsColumns,
    ObsSchema,
    TypesOnly,
    build_schema,
    dataset_types,
    obs_bytes_per_row,
)
from annbatch.errors import (
    ArgumentTypeError,
    CollectionCompleteError,
    CollectionPathError,
    CorruptDataError,
    DuplicateInputError,
    FeatureNotAvailableError,
    IncompatibleDatasetsError,
    IncompleteCollectionError,
    InvalidArgumentError,
    MissingDataError,
    StoreReadError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from annbatch.collection._inputs import Input

_MODES = ("r", "r+", "a", "w", "w-")
_REMOTE_MODES = ("r", "r+", "a", "w-")
"""Modes for a collection in object storage (``"w"`` would delete a prefix of a bucket)."""
_MERGES = (None, "same", "unique", "first", "only")
"""anndata.concat's strategies for combining the inputs' var columns."""

ATTR = "annbatch-collection"
"""Root attribute holding the collection's state."""
SCRATCH = "_annbatch_build"
"""Folder inside the collection for the buckets of a build in progress."""
BEFORE_APPEND = "manifest-before-append.json"
"""In the scratch folder while an append runs: the root's metadata as it was before the
append (a hard link: zarr >= 3.1.3 replaces the file at every write, so the link keeps the old
bytes), which a failed append renames back."""
FORMAT_VERSION = 1
DEFAULT_DATASET_SIZE = 1_048_576
DEFAULT_MEMORY_BUDGET = 2 * 2**30


def parse_bytes(value: int | str) -> int:
    """A memory budget in bytes from ``123``, ``"512MB"`` or ``"2GB"`` (binary units)."""
    number = parse_size(value, "memory_budget")
    if number < 2**20:
        msg = f"memory_budget must be at least 1MB, got {value!r}"
        raise InvalidArgumentError(msg)
    return number


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
    _layout: XLayout | None = None
    """X's layout for the build in progress (write_sharded's arguments), None: annbatch's."""

    def __init__(
        self,
        group: zarr.Group | str | os.PathLike[str],
        *,
        mode: Literal["r", "r+", "a", "w", "w-"] = "a",
        is_collection_h5ad: bool = False,
        storage_options: dict[str, Any] | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._store: Any = None  # zarr's ObjectStore of a collection in object storage
        self._store_path = ""  # the collection's path in that store
        self._url = ""
        self._mode: str = mode
        self._elements: list[ElementSpec] = []  # layers and obsm of the build in progress
        self._var: pd.DataFrame | None = None  # var columns of the build in progress
        remote_group = isinstance(group, zarr.Group) and _is_object_store(group.store)
        if is_url(group) or remote_group:
            self._open_remote(
                group,
                mode,
                is_collection_h5ad=is_collection_h5ad,
                storage_options=storage_options,
                scratch_dir=scratch_dir,
            )
            return
        if storage_options:
            msg = "storage_options are for a collection's URL in object storage"
            raise InvalidArgumentError(msg)
        if scratch_dir is not None:
            msg = "scratch_dir is for a collection in object storage (a local build's scratch is in its folder)"
            raise InvalidArgumentError(msg)
        if not isinstance(is_collection_h5ad, bool):
            msg = f"is_collection_h5ad must be a bool, got {is_collection_h5ad!r}"
            raise InvalidArgumentError(msg)
        if mode not in _MODES:
            msg = f"mode must be one of {_MODES}, got {mode!r}"
            raise InvalidArgumentError(msg)
        if isinstance(group, zarr.Group):
            if is_collection_h5ad:
                msg = "is_collection_h5ad=True cannot be combined with a zarr.Group; pass the folder's path"
                raise InvalidArgumentError(msg)
            self._path = _local_path(group)
        elif isinstance(group, str | os.PathLike):
            self._path = Path(group)
        else:
            msg = f"group must be a zarr.Group or a path, got {type(group).__name__}"
            raise ArgumentTypeError(msg)
        self._h5ad = is_collection_h5ad or (
            not isinstance(group, zarr.Group)
            and any((self._path / name).exists() for name in (h5ad.MANIFEST, h5ad.SCRATCH))
        )
        if mode == "r+" and self._state() is None:
            msg = f"mode='r+' needs an existing collection, and {self._where} holds none"
            raise IncompleteCollectionError(msg)
        if mode == "w-" and self._state() is not None:
            msg = f"mode='w-' refuses to overwrite the collection at {self._where}"
            raise CollectionPathError(msg)
        if mode == "w" and self._path.exists():
            self._state()  # raises unless the path holds a collection (or nothing)
            checkpoint("delete the collection (mode='w')")
            shutil.rmtree(self._path)

    def _open_remote(
        self,
        group: zarr.Group | str | os.PathLike[str],
        mode: str,
        *,
        is_collection_h5ad: bool,
        storage_options: dict[str, Any] | None,
        scratch_dir: str | os.PathLike[str] | None,
    ) -> None:
        """Open a collection in object storage: a URL, or a zarr group on an ObjectStore."""
        if is_collection_h5ad or mode not in _REMOTE_MODES:
            msg = (
                f"a collection in object storage is a zarr collection opened with mode in "
                f"{_REMOTE_MODES}; got mode={mode!r}, is_collection_h5ad={is_collection_h5ad}"
            )
            raise InvalidArgumentError(msg)
        if isinstance(group, zarr.Group):
            if storage_options:
                msg = "storage_options are for a URL; this group's store is open already"
                raise InvalidArgumentError(msg)
            self._store, self._store_path = group.store, group.path
            self._url = f"{type(group.store).__name__}({group.store})/{group.path}".rstrip("/")
        else:
            self._url = str(group).rstrip("/")
            self._store = zarr_object_store(self._url, storage_options, read_only=mode == "r")
        self._path = Path(self._url.split("://", 1)[-1])  # for messages only
        self._h5ad = False
        # A build's scratch (the rows distributed to datasets, pass 1) is local; a build
        # interrupted and run again on this machine finds it there.
        digest = hashlib.sha256(self._url.encode()).hexdigest()[:16]
        self._scratch = (
            Path(scratch_dir)
            if scratch_dir is not None
            else Path(tempfile.gettempdir()) / "annbatch-scratch" / digest
        )
        state = self._state()
        if mode in ("r", "r+") and state is None:
            msg = f"{self._url} holds no annbatch collection"
            raise IncompleteCollectionError(msg)
        if mode == "w-" and state is not None:
            msg = f"mode='w-' refuses to overwrite the collection at {self._url}"
            raise CollectionPathError(msg)

    def _root(self, mode: Literal["r", "r+"] = "r") -> zarr.Group:
        """The collection's root group, opened anew (so that its attributes are current)."""
        if self._store is None:
            return zarr.open_group(self._path, mode=mode, zarr_format=3)
        try:
            return zarr.open_group(self._store, path=self._store_path, mode=mode, zarr_format=3)
        except FileNotFoundError:
            raise
        except Exception as e:
            msg = f"cannot open the collection at {self._url} ({type(e).__name__}: {e})"
            raise StoreReadError(msg) from None

    @property
    def _where(self) -> str:
        """The collection's location for messages: its folder or its URL."""
        return self._url if self._store is not None else str(self._path)

    @property
    def _scratch_folder(self) -> Path:
        """Where a build keeps its buckets: in the collection's folder, or (object storage)
        in a local folder."""
        return self._scratch if self._store is not None else self._path / SCRATCH

    def __repr__(self) -> str:
        state = self._state()
        where = self._where
        if state is None:
            return f"DatasetCollection({where!r}, empty)"
        return (
            f"DatasetCollection({where!r}, {state['state']}, "
            f"{len(state['datasets'])} datasets, {sum(d['n_obs'] for d in state['datasets']):,} rows, "
            f"{len(state['var_names']):,} genes)"
        )

    # ---------------------------------------------------------------------------- reading
    @property
    def path(self) -> Path:
        """The collection's folder."""
        return self._path

    def _state(self) -> dict[str, Any] | None:
        """The collection's recorded state; None if the path holds nothing yet."""
        if self._store is not None:
            try:
                root = self._root("r")
            except FileNotFoundError:  # nothing at the prefix yet
                return None
        elif self._h5ad:
            return h5ad.read_state(self._path, lambda p: DatasetCollection(p)._state())
        elif not self._path.exists() or (self._path.is_dir() and not any(self._path.iterdir())):
            return None
        else:
            try:
                root = zarr.open_group(self._path, mode="r")
            except Exception as e:
                msg = f"{self._where} exists and is not a collection; choose another path or delete it"
                raise CollectionPathError(msg) from e
        state = root.attrs.get(ATTR)
        if state is None and has_encoding(root.attrs):
            return foreign_state(root, FORMAT_VERSION)  # built by the reference library
        if state is None and not dict(root.attrs) and next(iter(root.keys()), None) is None:
            return None  # an empty group (made with zarr.open_group(path, mode="w"))
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            msg = f"{self._where} holds a zarr group that is not an annbatch collection; choose another path"
            raise CollectionPathError(msg)
        return state

    def _complete_state(self) -> dict[str, Any]:
        state = self._state()
        if state is None:
            msg = f"{self._where} holds no collection yet; build one with add_adatas"
            raise IncompleteCollectionError(msg)
        if state["state"] != "complete":
            msg = (
                f"the build of {self._where} did not finish; run the same add_adatas call (or "
                "`annbatch build`) again to resume it, or delete the folder"
            )
            raise IncompleteCollectionError(msg)
        return state

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
        return [d["name"] for d in self._complete_state()["datasets"]]

    @property
    def is_collection_h5ad(self) -> bool:
        """Whether the datasets are h5ad files (else zarr groups)."""
        return self._h5ad

    @property
    def datasets(self) -> list[zarr.Group]:
        """The datasets, each an AnnData zarr group opened in the collection's :attr:`mode`
        (read-only for ``"r"``, writable otherwise); a ``ValueError`` for h5ad collections
        (see :meth:`open_datasets`)."""
        if self._h5ad:
            msg = f"{self._where} is a collection of h5ad files, not of zarr groups; use open_datasets()"
            raise InvalidArgumentError(msg)
        names = self.dataset_names
        lost = missing_datasets(self, names)
        if lost:
            raise MissingDataError(missing_message(self, lost))
        root = self._root("r" if self._mode == "r" else "r+")
        return [root[name] for name in names]  # type: ignore[misc]

    def __iter__(self) -> Iterator[zarr.Group]:
        """Each dataset's group (an AnnData zarr store), in order, opened in the collection's
        :attr:`mode`; a ``ValueError`` for h5ad collections."""
        return iter(self.datasets)

    def open_datasets(self) -> list[zarr.Group | h5py.File]:
        """Each dataset: zarr groups (as :attr:`datasets`), or ``h5py.File`` objects opened
        read-only for h5ad collections (they close when no longer referenced)."""
        if not self._h5ad:
            return self.datasets
        names = self.dataset_names
        lost = missing_datasets(self, names)
        if lost:
            raise MissingDataError(missing_message(self, lost))
        files = []
        for name in names:
            try:
                files.append(h5py.File(self._path / name, "r"))
            except OSError as e:
                msg = f"the dataset {name} of the collection {self._where} is not readable as an HDF5 file ({e}); the collection is damaged"
                raise StoreReadError(msg) from e
        return files

    def __len__(self) -> int:
        return len(self.dataset_names)

    @property
    def n_obs(self) -> int:
        """Rows in all datasets."""
        return sum(d["n_obs"] for d in self._complete_state()["datasets"])

    @property
    def var_names(self) -> pd.Index:
        """The genes (columns) of every dataset."""
        return pd.Index(self._complete_state()["var_names"])

    def info(self) -> dict[str, Any]:
        """Datasets, rows, genes, dtype, codec and bytes on disk (what ``annbatch info`` prints).

        A dataset that the manifest names and the store lacks raises
        :class:`~annbatch.errors.MissingDataError`; one whose rows, genes or elements differ
        from the manifest's record raises :class:`~annbatch.errors.CorruptDataError` (neither
        reads any chunk: ``annbatch verify`` does).
        """
        state = self._complete_state()
        names = [d["name"] for d in state["datasets"]]
        lost = missing_datasets(self, names)
        if lost:
            raise MissingDataError(missing_message(self, lost))
        problems = manifest_problems(self)
        if problems:
            listed = "; ".join(map(str, problems[:5]))
            more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
            msg = (
                f"the collection {self._where} is damaged: {listed}{more}. "
                f"`annbatch verify {self._where}` lists every problem"
            )
            raise CorruptDataError(msg)
        datasets = []
        for name in names if self._h5ad else []:
            with h5py.File(self._path / name, "r") as f:
                entry = {"name": name, **h5ad.describe(f)}
            datasets.append({**entry, "bytes": (self._path / name).stat().st_size})
        for group in [] if self._h5ad else self.datasets:
            entry = {"name": group.basename, **describe_x(group)}
            entry["bytes"] = (
                _size_in_store(group)
                if self._store is not None
                else _size_on_disk(self._path / group.basename)
            )
            datasets.append(entry)
        return {
            "path": self._where,
            "format": "h5ad" if self._h5ad else "zarr",
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
            msg = f"the collection {self._where} was opened with mode='r' (read only)"
            raise InvalidArgumentError(msg)
        if h5ad_compressor is not None and not isinstance(h5ad_compressor, str):
            msg = f"h5ad_compressor must be a codec name such as 'gzip', or None; got {h5ad_compressor!r}"
            raise InvalidArgumentError(msg)
        if self._h5ad:
            call = {
                "adata_paths": adata_paths, "load_adata": load_adata, "groupby": groupby,
                "var_subset": var_subset, "n_obs_per_chunk": n_obs_per_chunk,
                "shard_size": shard_size, "zarr_compressor": zarr_compressor,
                "dataset_size": dataset_size, "shuffle_chunk_size": shuffle_chunk_size,
                "shuffle": shuffle, "rng": rng, "merge": merge, "inputs": inputs,
                "var_names": var_names, "memory_budget": memory_budget, "progress": progress,
                "compression": compression, "force": force,
            }  # fmt: skip
            return self._add_h5ad(call, h5ad_compressor, append=append)
        items = _one_of(adata_paths, inputs, "adata_paths", "inputs")
        if items is None:
            msg = "add_adatas needs adata_paths: paths to AnnData stores, or AnnData objects"
            raise InvalidArgumentError(msg)
        var_names = _one_of(var_subset, var_names, "var_subset", "var_names")
        if isinstance(dataset_size, str):
            parse_size(dataset_size, "dataset_size")
        else:
            parse_int(dataset_size, "dataset_size", minimum=1, numpy=False)
        budget = parse_bytes(memory_budget)
        layout = parse_layout(n_obs_per_chunk, shard_size, zarr_compressor)
        if layout is not None and compression is not None:
            msg = "give compression (annbatch's layouts) or n_obs_per_chunk / shard_size / zarr_compressor, not both"
            raise InvalidArgumentError(msg)
        compression_given = compression is not None
        compression = parse_compression(DEFAULT_COMPRESSION if compression is None else compression)
        if merge not in _MERGES:
            msg = f"merge must be one of {_MERGES} (as for anndata.concat), got {merge!r}"
            raise InvalidArgumentError(msg)
        if not isinstance(shuffle, bool):
            msg = f"shuffle must be a bool, got {shuffle!r}"
            raise InvalidArgumentError(msg)
        block = (
            1
            if shuffle_chunk_size is None
            else parse_int(shuffle_chunk_size, "shuffle_chunk_size", minimum=1)
        )
        group_columns = _parse_groupby(groupby)
        genes = None if var_names is None else pd.Index(list(var_names), dtype=object)
        if genes is not None and (not genes.is_unique or len(genes) == 0):
            msg = "var_subset (var_names) must be a non-empty list of unique gene names"
            raise InvalidArgumentError(msg)
        state = self._state()  # raises if the path holds something else
        if state is not None and FOREIGN in state:
            msg = (
                f"the collection {self._where} was built by the reference annbatch library "
                "(it carries only the annbatch-preshuffled encoding, not annbatch's manifest): "
                "annbatch reads it, but cannot append to it; build a new collection from all "
                "the inputs instead"
            )
            raise CollectionPathError(msg)
        if not compression_given and state is not None:
            # Without compression=, a collection keeps the layout it was built with (the
            # default has changed over releases): repeats match, appends stay alike.
            used = [b.get("compression") for b in state.get("builds", [])]
            used = [c for c in used if c in COMPRESSIONS]
            if used:
                compression = used[-1]
        # Later calls on the object that built the collection add to it (the reference's
        # current API); a collection opened anew takes append=True for that.
        append = append or self._added
        opened = open_inputs(items, load_adata)
        try:
            _check_groupby(opened, group_columns)
            options: dict[str, Any] = {
                "var_names": None if genes is None else list(genes),
                "dataset_size": dataset_size,
                "memory_budget": budget,
                "compression": compression,
                "rng": int(rng) if isinstance(rng, int | np.integer) else None,
            }
            # Recorded only when they differ from the defaults, so that collections built
            # before these options existed still match a repeat of their call.
            extra = {
                "merge": merge,
                "shuffle": shuffle,
                "shuffle_chunk_size": block,
                "groupby": group_columns or None,
                "layout": None if layout is None else layout.describe(),
            }
            defaults = {
                "merge": None,
                "shuffle": True,
                "shuffle_chunk_size": 1,
                "groupby": None,
                "layout": None,
            }
            options.update({k: v for k, v in extra.items() if v != defaults[k]})
            self._layout = layout
            complete = state is not None and state["state"] == "complete"
            specs = [] if complete else element_specs(opened)
            # The layers and obsm a content fingerprint covers: those the collection (or the
            # build in progress) carries, else those this build will carry.
            carried = [s.path for s in specs] if state is None else list(state.get("elements", {}))
            prints = Fingerprints(opened, carried, budget)
            if complete:
                if not force and _built_by(state, prints, options, self._where):  # type: ignore[arg-type]
                    self._added = True
                    return self
                if not append:
                    _refuse_without_append(state, prints, self._where)  # type: ignore[arg-type]
            if not force:
                _refuse_repeats(prints, state if complete else None)
            if complete:
                specs = element_specs(opened)
                _check_append(opened, state, self._where, self._root())  # type: ignore[arg-type]
                specs = _elements_for_append(specs, state, self._where)  # type: ignore[arg-type]
            self._elements = specs
            self._build(opened, prints, state, options, rng, progress=progress)
        finally:
            self._layout = None
            self._elements = []
            for inp in opened:
                inp.close()
        self._added = True
        return self

    def _add_h5ad(self, call: dict[str, Any], compressor: str | None, *, append: bool) -> Self:
        """Build an h5ad collection, or append to one (see :mod:`annbatch.collection._h5ad`)."""
        state = self._state()
        scratch_path = self._path / h5ad.SCRATCH
        appending = state is not None and state["state"] == "complete"
        pending = False
        if state is not None and appending:
            pending = self._pending_h5ad_append(state)
            if scratch_path.exists() and not pending:  # killed after the manifest was written
                checkpoint("delete the h5ad build's scratch")
                shutil.rmtree(scratch_path)
            if not (append or self._added or pending):
                return self._h5ad_repeat(call, state)
        try:
            if not appending:
                with naming(self._path):
                    self._path.mkdir(parents=True, exist_ok=True)
            elif not pending:
                self._begin_h5ad_append(state)  # type: ignore[arg-type]
            scratch = DatasetCollection(scratch_path)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scratch.add_adatas(**call, append=appending)
            for w in caught:  # said of the collection, not of its scratch folder
                if (pending or not appending) and "nothing was written" in str(w.message):
                    continue  # built already, interrupted while converting: the conversion resumes
                text = str(w.message).replace(str(scratch_path), str(self._path))
                warnings.warn(text, w.category, stacklevel=3)
            h5ad.convert(self._path, scratch, compressor)
        except Exception as e:
            full = with_consequence(e, self._where, after_full_disk(self._where, append=appending))
            # A refused append (nothing began) or one that found the disk full is undone; one
            # that failed otherwise after its scratch build finished resumes when run again.
            if appending and (full is not None or not self._pending_h5ad_append(state)):  # type: ignore[arg-type]
                self._undo_h5ad_append(state)  # type: ignore[arg-type]
            if full is None:
                raise
            raise full from full.__cause__
        self._added = True
        return self

    def _undo_h5ad_append(self, state: dict[str, Any]) -> None:
        """Put the h5ad collection ``state`` back as it was, unless the append's manifest
        replaced its own already: delete the files the append converted, then its scratch
        collection (its manifest first: a half-deleted scratch is not an append to resume)."""
        if h5ad.read_state(self._path, lambda p: None) != state:
            return  # the append finished
        scratch = self._path / h5ad.SCRATCH
        try:
            held = DatasetCollection(scratch)._state() or {}
        except CollectionPathError:
            held = {}
        kept = {d["name"] for d in state["datasets"]}
        for entry in held.get("datasets", []):
            target = self._path / f"{entry['name']}.h5ad"
            if target.name not in kept:
                target.unlink(missing_ok=True)
                target.with_suffix(".h5ad.tmp").unlink(missing_ok=True)
        (self._path / f"{h5ad.MANIFEST}.tmp").unlink(missing_ok=True)
        (scratch / "zarr.json").unlink(missing_ok=True)
        shutil.rmtree(scratch, ignore_errors=True)

    def _h5ad_repeat(self, call: dict[str, Any], state: dict[str, Any]) -> Self:
        """A call on a finished h5ad collection without append: the call that built it writes
        nothing (as for zarr collections); others are refused."""
        opened = open_inputs(
            _one_of(call["adata_paths"], call["inputs"], "adata_paths", "inputs"),
            call["load_adata"],
        )
        try:
            budget = parse_bytes(call["memory_budget"])
            prints = Fingerprints(opened, list(state.get("elements", {})), budget)
            built = any(_same_build(b, prints) for b in state.get("builds", []))
        finally:
            for inp in opened:
                inp.close()
        if built:
            warnings.warn(
                f"{self._where} is finished and already holds these inputs; nothing was written",
                UserWarning,
                stacklevel=4,
            )
            self._added = True
            return self
        msg = (
            f"{self._where} is a finished collection of h5ad files built from other inputs; "
            "pass append=True to add these inputs to it, or build into another folder"
        )
        raise CollectionCompleteError(msg)

    def _pending_h5ad_append(self, state: dict[str, Any]) -> bool:
        """Whether the scratch collection holds an interrupted append to the finished h5ad
        collection ``state``: a build in progress, or datasets not converted yet."""
        scratch = self._path / h5ad.SCRATCH
        if not scratch.exists():
            return False
        try:
            held = DatasetCollection(scratch)._state()
        except CollectionPathError:
            return False  # not even begun: left to be deleted
        if held is None:
            return False
        return held["state"] != "complete" or len(held["datasets"]) > len(state["datasets"])

    def _begin_h5ad_append(self, state: dict[str, Any]) -> None:
        """Start an append to a finished h5ad collection: a scratch zarr collection whose
        manifest is the h5ad collection's (its datasets are read from the h5ad files), which
        the zarr build appends to as to any collection; the new datasets are converted after."""
        if state.get("version") != FORMAT_VERSION or "x" not in state:
            msg = (
                f"{self._where} is a folder of h5ad files without annbatch's manifest; appending "
                "needs a collection annbatch built. Build a new collection from these files instead"
            )
            raise CollectionPathError(msg)
        base = {k: v for k, v in state.items() if k not in ("format", "h5ad_compressor")}
        base["state"] = "complete"
        base["datasets"] = [
            {**d, "name": d["name"].removesuffix(".h5ad")} for d in state["datasets"]
        ]
        checkpoint("begin h5ad append")
        with naming(self._path / h5ad.SCRATCH):
            zarr.create_group(
                self._path / h5ad.SCRATCH, zarr_format=3, attributes={ATTR: base}, overwrite=True
            )

    @contextlib.contextmanager
    def _finished_datasets(self, names: Sequence[str]) -> Iterator[list[Any]]:
        """The finished datasets ``names``, opened read-only: zarr groups, or, in the scratch
        collection of an append to an h5ad collection, the h5ad files of the folder above."""
        root = self._root("r")
        files: list[h5py.File] = []
        groups: list[Any] = []
        try:
            for name in names:
                if name in root:
                    groups.append(root[name])
                else:
                    files.append(h5py.File(self._path.parent / f"{name}.h5ad", "r"))
                    groups.append(files[-1])
            yield groups
        finally:
            for f in files:
                f.close()

    def _save(
        self, root: zarr.Group, record: dict[str, Any], step: str, *, keep_previous: bool = False
    ) -> None:
        """Write the collection's state (one atomic write of the root's metadata); with
        ``keep_previous``, keep the state it replaces for a rollback (:meth:`_keep_manifest`)."""
        checkpoint(f"manifest: {step}")
        if keep_previous:
            self._keep_manifest()
        with naming(self._path / "zarr.json" if self._store is None else self._where):
            _put_state(root, record)

    def _keep_manifest(self) -> None:
        """Keep the root's metadata as it is (the finished collection's manifest) in the scratch
        folder, as a hard link (no space needed; a copy where the file system has none), for
        :meth:`_roll_back` to rename back. Object storage: nothing (its rollback rewrites)."""
        if self._store is not None:
            return
        kept, current = self._scratch_folder / BEFORE_APPEND, self._path / "zarr.json"
        with naming(kept):
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.unlink(missing_ok=True)
            try:
                os.link(current, kept)
            except OSError as e:
                if full_disk_cause(e) is not None:
                    raise
                partial = kept.with_suffix(".partial")  # whole under its name, or not there
                shutil.copyfile(current, partial)
                os.replace(partial, kept)

    def _check_distributed(self, build: dict[str, Any], prints: Fingerprints) -> list[str] | None:
        """The content fingerprints of an interrupted build's buckets, if its inputs still hold
        that data (each is read whole to tell; nothing is written); None, with a warning, if
        any changed since (or the build did not record what it read)."""
        _, held = recorded_build(build)
        now = prints.contents()
        changed = [inp.name for inp, a, b in zip(prints.inputs, now, held, strict=True) if a != b]
        if not changed:
            return now
        warnings.warn(
            f"{', '.join(changed[:5])} {'holds' if len(changed) == 1 else 'hold'} other data than "
            f"the interrupted build of {self._where} read (or it did not record what it read): "
            "the build reads its inputs again",
            UserWarning,
            stacklevel=5,
        )
        return None

    def _build(
        self,
        inputs: list[Input],
        prints: Fingerprints,
        state: dict[str, Any] | None,
        options: dict[str, Any],
        rng: np.random.Generator | int | None,
        *,
        progress: bool,
    ) -> None:
        names = [inp.name for inp in inputs]
        var_names = None if options["var_names"] is None else pd.Index(options["var_names"])
        appending = state is not None and state["state"] == "complete"
        resuming = state is not None and not appending
        if resuming:
            build = state["build"]  # type: ignore[index]
            elements = {e.path: e.describe() for e in self._elements}
            if (
                recorded_build(build)[0] != prints.quick
                or not _same_options(build, options)
                or state.get("elements", {}) != elements  # type: ignore[union-attr]
            ):
                msg = (
                    f"an interrupted build of other inputs or arguments is in {self._where}; run it "
                    "again with the same inputs and arguments to resume, or delete the folder"
                )
                raise CollectionPathError(msg)
            seed = build["seed"]
            names = list(build["inputs"])  # as the build began, however they are spelled now
        else:
            seed = int(np.random.default_rng(rng).integers(2**63))
        done: list[dict[str, Any]] = [] if state is None else list(state["datasets"])
        prior: dict[str, ColumnType] = {}
        if appending:
            existing = pd.Index(state["var_names"], dtype=object)  # type: ignore[index]
            extra = union_var_names(inputs).difference(existing)
            if var_names is not None and not var_names.equals(existing):
                msg = "var_names of an append must be the collection's own genes (collection.var_names)"
                raise InvalidArgumentError(msg)
            if len(extra):
                warnings.warn(
                    f"{len(extra)} genes of the new inputs are not in the collection and are dropped "
                    f"(for example {list(extra[:5])}); build a new collection to keep them",
                    UserWarning,
                    stacklevel=4,
                )
            var_names = existing
        elif resuming:  # the genes were fixed when the build began
            var_names = pd.Index(state["var_names"], dtype=object)  # type: ignore[index]
        elif var_names is None:
            var_names = union_var_names(inputs)
        self._var = None
        if state is not None and state["datasets"]:
            prior_first = state["build"]["first"] if resuming else len(done)
            with self._finished_datasets([d["name"] for d in done[:prior_first]]) as groups:
                prior = dataset_types(groups)
                if prior_first:  # an append keeps the collection's var columns
                    var_group = groups[0]["var"]
                    first_var = read_frame(var_group, var_group, "var")
                    self._var = first_var if len(first_var.columns) else None
        if self._var is None and options.get("merge") is not None and not prior:
            self._var = merged_var(inputs, var_names, options["merge"])
        sources: list[tuple[str, ObsColumns]] = []
        if prior:
            sources.append((f"the collection {self._where}", TypesOnly(prior)))
        sources += [(inp.name, inp.obs) for inp in inputs]
        schema = build_schema(sources, skip=SOURCE_COLUMN)
        columns = [f"{c}: {t.describe()}" for c, t in schema.types.items()]
        if resuming and state["build"].get("obs_columns", columns) != columns:  # type: ignore[index]
            # The buckets hold obs columns by position: other columns cannot resume them.
            msg = (
                f"an interrupted build with other obs columns is in {self._where}; run it again "
                "with the same inputs and load_adata to resume, or delete the folder"
            )
            raise CollectionPathError(msg)
        first = state["build"]["first"] if resuming else len(done)  # type: ignore[index]
        distributed = resuming and state["build"].get("distributed", False)  # type: ignore[index]
        contents: list[str] | None = None  # of the rows in the buckets, once distributed
        if distributed:  # the buckets hold rows read before: from the inputs as they are now?
            contents = self._check_distributed(state["build"], prints)  # type: ignore[index]
            if contents is None:  # an input changed: its buckets are stale, distribute again
                distributed = False
                done = done[:first]
        # Saved before any bucket is rewritten: a kill during the new distribution must not
        # leave a manifest that still calls the half-rewritten buckets distributed.
        redistribute = resuming and not distributed and state["build"].get("distributed", False)  # type: ignore[index]
        plan = plan_build(
            inputs,
            len(var_names),
            options["dataset_size"],
            options["memory_budget"],
            obs_bytes_per_row(schema),
            self._elements,
        )
        dataset_names = [f"dataset_{first + k:06d}" for k in range(plan.n_datasets)]
        # The collection's state, rewritten to the root's attributes at every step of the build.
        record: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "state": "building",
            "var_names": list(var_names),
            "x": _describe_x(inputs[0]),
            "elements": {e.path: e.describe() for e in self._elements},
            "inputs": [] if state is None else list(state.get("inputs", [])),
            "builds": [] if state is None else list(state.get("builds", [])),
            "datasets": done,
            "build": {
                **options,
                "option_keys": list(options),
                "obs_columns": columns,
                "inputs": names,
                "quick_fingerprints": prints.quick,
                "fingerprints": contents,
                "seed": seed,
                "first": first,
                "distributed": distributed,
                "dataset_names": dataset_names,
            },
        }
        root = None if state is None else self._root("r+")
        try:
            if root is None:
                checkpoint("manifest: begin")
                with naming(self._where):
                    # overwrite: the path holds nothing, or an empty group (see _state)
                    root = zarr.create_group(
                        self._store if self._store is not None else self._path,
                        path=self._store_path or None,
                        zarr_format=3,
                        attributes={ATTR: record},
                        overwrite=True,
                    )
            elif not resuming:
                self._save(root, record, "begin append", keep_previous=True)
            elif redistribute:
                self._save(root, record, "redistribute")
            self._write(root, record, inputs, names, var_names, schema, plan, progress=progress)
        except Exception as e:
            if first > 0 and root is not None:  # a failed append: the collection as it was
                try:
                    self._roll_back(root, record, first)
                except Exception as undo:  # the first error stays the one raised
                    e.add_note(f"undoing the append of {self._where} failed too: {undo!r}")
                    raise e from e.__cause__
            full = with_consequence(e, self._where, after_full_disk(self._where, append=first > 0))
            if full is None:
                raise
            raise full from full.__cause__

    def _roll_back(self, root: zarr.Group, record: dict[str, Any], first: int) -> None:
        """Undo a failed append. The manifest goes back first, so that the collection reads as
        it was at every moment: the one kept when the append began is renamed back (a rename
        takes no space: this works on a full disk), or, in object storage (or for an append
        begun by an older annbatch), rewritten. Then the append's datasets and scratch go."""
        current = self._state()
        if current is not None and current["state"] == "complete":
            if len(current["datasets"]) > first:
                return  # the append had finished: nothing to undo
        else:
            restored = {k: v for k, v in record.items() if k != "build"}
            restored["state"] = "complete"
            restored["datasets"] = record["datasets"][:first]
            kept = self._scratch_folder / BEFORE_APPEND
            if self._store is None and _kept_datasets(kept) == restored["datasets"]:
                os.replace(kept, self._path / "zarr.json")
            else:
                _put_state(root, restored)
        for name in record["build"]["dataset_names"]:
            if name in root:
                del root[name]
        shutil.rmtree(self._scratch_folder, ignore_errors=True)

    def _write(
        self,
        root: zarr.Group,
        record: dict[str, Any],
        inputs: list[Input],
        names: list[str],
        var_names: pd.Index,
        schema: ObsSchema,
        plan: BuildPlan,
        *,
        progress: bool,
    ) -> None:
        """Both passes of a build (resumed where ``record`` says), then the manifest."""
        build = record["build"]
        first, done, scratch = build["first"], record["datasets"], self._scratch_folder
        gen = np.random.default_rng(build["seed"])
        shuffle, block = build.get("shuffle", True), build.get("shuffle_chunk_size", 1)
        assignment = assign_datasets(
            plan.n_obs, plan.rows_per_dataset, gen, shuffle=shuffle, block=block
        )
        distributed = build["distributed"]
        if not distributed:
            if scratch.exists():
                checkpoint("delete scratch")
                _clear_scratch(scratch)
            with progress_bar(plan.n_obs, "distributing rows", show=progress) as bar:
                contents = distribute(
                    inputs, var_names, schema, plan, assignment, scratch, bar.update, self._elements
                )
            # The content fingerprints of the rows now in the buckets: what the collection holds.
            record["build"]["fingerprints"] = contents
            record["build"]["distributed"] = True
            self._save(root, record, "distributed")
        del assignment
        written = {d["name"] for d in done}
        offsets = np.cumsum([0] + [inp.n_obs for inp in inputs])[:-1]
        already = sum(d["n_obs"] for d in done[first:])
        with progress_bar(plan.n_obs, "writing datasets", show=progress, initial=already) as bar:

            def on_written(name: str, n_obs: int) -> None:
                done.append({"name": name, "n_obs": n_obs})
                self._save(root, record, f"recorded {name}")
                bar.update(n_obs)

            write_datasets(
                root,
                build["dataset_names"],
                schema,
                names,
                offsets,
                var_names,
                inputs[0].dtype,
                scratch,
                gen,
                on_written,
                sparse=inputs[0].sparse if inputs[0].has_x else None,
                skip=written,
                compression=build["compression"],
                order=RowOrder(shuffle=shuffle, block=block, groupby=build.get("groupby") or []),
                layout=self._layout,
                elements=self._elements,
                var=self._var,
            )
        if scratch.exists():
            checkpoint("delete scratch")
            _clear_scratch(scratch)
        quick, contents = build["quick_fingerprints"], build["fingerprints"]
        added = zip(names, quick, contents, strict=True)
        options = {k: build[k] for k in build.get("option_keys", _BASE_OPTIONS)}
        complete = {k: v for k, v in record.items() if k != "build"}
        complete.update(
            state="complete",
            inputs=record["inputs"]
            + [{"name": n, "fingerprint": c, "quick": q} for n, q, c in added],
            builds=[
                *record["builds"],
                {**options, "fingerprints": contents, "quick_fingerprints": quick},
            ],
        )
        self._save(root, complete, "complete")
        shutil.rmtree(scratch, ignore_errors=True)  # the manifest kept for a rollback


def after_full_disk(where: str, *, append: bool) -> str:
    """What became of the collection ``where`` when a build or append found the disk full."""
    if append:
        return f"the append was undone and {where} is as it was before it; free space and run the append again"
    return (
        f"the build of {where} stopped there; free space and run the same call again to resume it"
    )


def _clear_scratch(scratch: Path) -> None:
    """Delete a build's buckets; the manifest kept for an append's rollback stays."""
    for entry in scratch.iterdir():
        if entry.name == BEFORE_APPEND:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    if not any(scratch.iterdir()):
        scratch.rmdir()


def _kept_datasets(kept: Path) -> list[dict[str, Any]] | None:
    """The datasets of the manifest kept for a rollback (None if there is none to read)."""
    try:
        state = json.loads(kept.read_text())["attributes"][ATTR]
        return list(state["datasets"]) if state["state"] == "complete" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refuse_repeats(prints: Fingerprints, state: dict[str, Any] | None) -> None:
    """Raise if one input's data is given twice, or is in the finished collection ``state``
    (an input is read for this only when its quick fingerprint matches another's)."""
    inputs = prints.inputs
    earlier: dict[str, list[int]] = {}  # inputs before, by quick fingerprint
    for i, quick in enumerate(prints.quick):
        twin = next((j for j in earlier.get(quick, []) if prints.same_pair(i, j)), None)
        if twin is not None:
            msg = f"{inputs[i].name} holds the same data as {inputs[twin].name}; pass each input once (or force=True to add it twice)"
            raise DuplicateInputError(msg)
        earlier.setdefault(quick, []).append(i)
    held = _held(state)
    repeats = []
    for i, inp in enumerate(inputs):
        matches = held.get(prints.quick[i], [])
        old = next((name for c, name in matches if prints.same(i, prints.quick[i], c)), None)
        if old is not None:
            repeats.append((inp.name, old))
    if repeats:
        listed = "; ".join(f"{new} (added as {old})" for new, old in repeats[:5])
        msg = f"the collection already holds the data of {len(repeats)} of these inputs: {listed}; nothing was written. Leave them out, or pass force=True to add them again"
        raise DuplicateInputError(msg)


def _held(state: dict[str, Any] | None) -> dict[str, list[tuple[str | None, str]]]:
    """The inputs a collection holds: (content fingerprint, name) by quick fingerprint."""
    entries = [] if state is None else state.get("inputs", [])
    held: dict[str, list[tuple[str | None, str]]] = {}
    for (quick, content), entry in zip(recorded(entries), entries, strict=True):
        held.setdefault(quick, []).append((content, entry["name"]))
    return held


def _same_build(build: dict[str, Any], prints: Fingerprints) -> bool:
    """Whether the recorded ``build`` was of these inputs' data (quick fingerprints first;
    the inputs are read only if all of those match)."""
    quick, contents = recorded_build(build)
    if quick != prints.quick:
        return False
    return all(prints.same(i, q, c) for i, (q, c) in enumerate(zip(quick, contents, strict=True)))


def _built_by(
    state: dict[str, Any], prints: Fingerprints, options: dict[str, Any], path: str
) -> bool:
    """Whether a build (or append) of these inputs with these options made the finished
    collection ``state``; says so with a warning (nothing is to be done)."""
    for build in state.get("builds", []):
        if _same_options(build, options) and _same_build(build, prints):
            warnings.warn(
                f"{path} is finished and already holds these inputs, added with these options; "
                "nothing was written",
                UserWarning,
                stacklevel=3,
            )
            return True
    return False


def _refuse_without_append(state: dict[str, Any], prints: Fingerprints, path: str) -> None:
    """Adding rows to a finished collection takes ``append=True``."""
    held = _held(state)

    def holds(i: int) -> bool:
        quick = prints.quick[i]
        return any(prints.same(i, quick, c) for c, _ in held.get(quick, []))

    if all(holds(i) for i in range(len(prints))):
        msg = (
            f"{path} already holds these inputs, added by other calls or with other options; "
            "nothing was written. To lay them out otherwise, build a new collection at another path"
        )
    else:
        changed = [
            inp.name
            for i, inp in enumerate(prints.inputs)
            if prints.quick[i] in held and not holds(i)
        ]
        note = (
            f" ({', '.join(changed[:5])} {'has' if len(changed) == 1 else 'have'} the names and "
            "shape of an input the collection holds, but other values)"
            if changed
            else ""
        )
        msg = (
            f"{path} is a finished collection ({sum(d['n_obs'] for d in state['datasets']):,} "
            f"rows) built from other inputs{note}; nothing was written. Pass append=True (annbatch "
            "build --append) to add these inputs to it, or build into another path"
        )
    raise CollectionCompleteError(msg)


def _put_state(root: zarr.Group, record: dict[str, Any]) -> None:
    """Write the collection's state to the root's attributes (one write), with the reference's
    encoding (:data:`~annbatch.collection._encoding.V1_ENCODING`) exactly when the state is
    complete."""
    attributes = {**root.attrs.asdict(), ATTR: record}
    root.attrs.put(with_encoding(attributes, complete=record["state"] == "complete"))


def _check_append(
    inputs: Sequence[Input], state: dict[str, Any], path: str, root: zarr.Group
) -> None:
    """Raise before anything is written if the inputs cannot join the collection's datasets."""
    x = state.get("x")
    if x is None:  # collections written before the manifest recorded X
        described = describe_x(root[state["datasets"][0]["name"]])  # type: ignore[arg-type]
        x = {
            "dtype": np.dtype(described["dtype"]).str,
            "sparse": described["encoding"] == "csr_matrix",
        }
    genes = pd.Index(state["var_names"])
    first = inputs[0]
    if (x["dtype"] is None) != (not first.has_x):
        held = "no X" if x["dtype"] is None else "X"
        given = "has X" if first.has_x else "has no X"
        msg = f"{first.name} {given} but the collection {path} holds {held}; a collection holds X from every input or from none"
        raise IncompatibleDatasetsError(msg)
    for inp in inputs:
        if inp.n_obs and len(genes) and not genes.isin(inp.var_names.astype(str)).any():
            msg = f"{inp.name} shares no gene with the collection {path} (its genes are e.g. {list(inp.var_names[:3])}, the collection's {list(genes[:3])}); its rows would be all zeros"
            raise IncompatibleDatasetsError(msg)
    if not first.has_x:
        return
    kinds = {True: "sparse CSR", False: "dense"}
    if first.sparse != x["sparse"]:
        msg = f"{first.name}: X is {kinds[first.sparse]} but the collection {path} holds {kinds[x['sparse']]} X; a collection holds one kind"
        raise IncompatibleDatasetsError(msg)
    if first.dtype != np.dtype(x["dtype"]):
        msg = f"{first.name}: X has dtype {first.dtype} but the collection {path} holds {np.dtype(x['dtype'])}; cast the inputs to {np.dtype(x['dtype'])} first"
        raise IncompatibleDatasetsError(msg)


def _describe_x(inp: Input) -> dict[str, Any]:
    """X as the manifest records it (dtype and sparse both None: the inputs have no X)."""
    if not inp.has_x:
        return {"dtype": None, "sparse": None}
    return {"dtype": inp.dtype.str, "sparse": inp.sparse}  # type: ignore[union-attr]


def _size_in_store(group: zarr.Group) -> int:
    """Bytes of the objects under ``group`` in its object store."""
    import obstore

    store: Any = group.store
    prefix = group.path.strip("/") + "/"
    return sum(item["size"] for batch in obstore.list(store.store, prefix=prefix) for item in batch)


def _is_object_store(store: object) -> bool:
    """Whether ``store`` is zarr's ObjectStore (a zarr without it has none)."""
    cls = getattr(zarr.storage, "ObjectStore", None)
    return cls is not None and isinstance(store, cls)


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _local_path(group: zarr.Group) -> Path:
    """The folder of a zarr group on a local store."""
    from zarr.storage import LocalStore

    store = group.store
    if not isinstance(store, LocalStore):
        msg = (
            f"DatasetCollection needs a group on the local file system (a zarr LocalStore), got "
            f"one on a {type(store).__name__}; for object storage give its URL or a group on "
            "zarr's ObjectStore"
        )
        raise FeatureNotAvailableError(msg)
    return Path(store.root) / group.path


_BASE_OPTIONS = ("var_names", "dataset_size", "memory_budget", "compression", "rng")


def _same_options(recorded: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether a recorded build had ``options`` (options missing from either have their
    default, which is never recorded)."""
    keys = set(options) | set(recorded.get("option_keys", _BASE_OPTIONS))
    return all(recorded.get(k) == options.get(k) for k in keys)


def _one_of(ours: Any, theirs: Any, name: str, other: str) -> Any:
    """The argument given under one of two names that mean the same."""
    if ours is not None and theirs is not None:
        msg = f"{name} and {other} mean the same; give one"
        raise InvalidArgumentError(msg)
    return theirs if ours is None else ours


def _parse_groupby(groupby: object) -> list[str]:
    if groupby is None:
        return []
    columns = [groupby] if isinstance(groupby, str) else groupby
    if (
        not isinstance(columns, list | tuple)
        or not columns
        or not all(isinstance(c, str) for c in columns)
    ):
        msg = f"groupby must be an obs column name or a list of them, got {groupby!r}"
        raise InvalidArgumentError(msg)
    return list(columns)


def _elements_for_append(
    specs: list[ElementSpec], state: dict[str, Any], path: str
) -> list[ElementSpec]:
    """The new inputs' layers and obsm, as the collection holds them: the same ones, of the
    same kind (others are dropped with a warning); one the collection has and they lack is an
    error, since its datasets would then differ."""
    held = state.get("elements", {})
    mine = {s.path: s for s in specs}
    missing = [p for p in held if p not in mine]
    if missing:
        msg = f"the collection {path} holds {missing} in every dataset, and the new inputs do not have them"
        raise IncompatibleDatasetsError(msg)
    differ = [p for p in held if mine[p].describe() != held[p]]
    if differ:
        msg = f"{differ} of the new inputs differ in kind, dtype or shape from the collection {path}'s"
        raise IncompatibleDatasetsError(msg)
    extra = [p for p in mine if p not in held]
    if extra:
        warnings.warn(
            f"{extra} of the new inputs are not in the collection {path} and are not carried",
            UserWarning,
            stacklevel=4,
        )
    return [mine[p] for p in held]


def _check_groupby(inputs: Sequence[Input], columns: list[str]) -> None:
    """Every input has the groupby columns, and categorical ones have the same categories."""
    for column in columns:
        categories: tuple[pd.Index, str] | None = None
        for inp in inputs:
            if column not in inp.obs.columns:
                msg = f"groupby column {column!r} is not in the obs of {inp.name}; every input needs it"
                raise InvalidArgumentError(msg)
            values = inp.obs.column(column)
            if not isinstance(values.dtype, pd.CategoricalDtype):
                continue
            if categories is None:
                categories = (values.cat.categories, inp.name)
            elif not values.cat.categories.equals(categories[0]):
                msg = (
                    f"groupby column {column!r} has categories {list(values.cat.categories)[:10]} "
                    f"in {inp.name} but {list(categories[0])[:10]} in {categories[1]}; give it the "
                    "same categories in every input"
                )
                raise InvalidArgumentError(msg)


def merged_var(inputs: Sequence[Input], var_names: pd.Index, merge: str) -> pd.DataFrame:
    """The inputs' var columns combined by anndata's ``merge`` strategy, on ``var_names``
    (genes an input lacks count as missing there, as in an outer join)."""
    frames = []
    for inp in inputs:
        var = inp.read_var() if inp.read_var is not None else pd.DataFrame(index=inp.var_names)
        var = var.copy()
        var.index = var.index.astype(str)
        frames.append(ad.AnnData(var=var, obs=pd.DataFrame(index=pd.Index([], dtype=object))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notes on index names and dtypes
        joined = ad.concat(frames, axis=0, join="outer", merge=merge)
    var = joined.var.reindex(var_names)
    var.index.name = None
    for column in var.columns:  # strings with gaps: pandas' nullable strings keep them missing
        values = var[column]
        if values.dtype == object and values.dropna().map(type).eq(str).all():
            var[column] = values.astype(pd.StringDtype())
    return var
