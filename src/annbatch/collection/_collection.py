"""DatasetCollection: many AnnData inputs, rows shuffled across them, as sharded zarr datasets."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import zarr

from annbatch._args import parse_int
from annbatch.collection._build import (
    assign_datasets,
    distribute,
    plan_build,
    progress_bar,
    union_obs,
    write_datasets,
)
from annbatch.collection._inputs import open_inputs, union_var_names
from annbatch.collection._layout import (
    DEFAULT_COMPRESSION,
    Compression,
    describe_x,
    parse_compression,
)
from annbatch.errors import (
    CollectionPathError,
    IncompleteCollectionError,
    InvalidArgumentError,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator, Sequence

    import anndata as ad

ATTR = "annbatch-collection"
"""Root attribute holding the collection's state."""
SCRATCH = "_annbatch_build"
"""Folder inside the collection for the buckets of a build in progress."""
FORMAT_VERSION = 1
DEFAULT_DATASET_SIZE = 1_048_576
DEFAULT_MEMORY_BUDGET = 2 * 2**30

_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "T": 2**40,
    "TB": 2**40,
}


def parse_bytes(value: int | str) -> int:
    """A size in bytes from ``123``, ``"512MB"`` or ``"2GB"`` (binary units)."""
    if isinstance(value, bool):
        msg = f"memory_budget must be a number of bytes or a size like '2GB', got {value!r}"
        raise InvalidArgumentError(msg)
    if isinstance(value, int):
        number = value
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?B?)\s*", str(value).upper())
        if match is None:
            msg = f"memory_budget must be a number of bytes or a size like '2GB', got {value!r}"
            raise InvalidArgumentError(msg)
        number = int(float(match.group(1)) * _UNITS[match.group(2)])
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
    path
        The collection's folder. Nothing is written until :meth:`add_adatas`.

    Examples
    --------
    >>> collection = DatasetCollection("atlas.zarr").add_adatas(["a.h5ad", "b.h5ad"])  # doctest: +SKIP
    >>> loader = Loader(batch_size=4096).use_collection(collection)  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)

    def __repr__(self) -> str:
        state = self._state()
        if state is None:
            return f"DatasetCollection({str(self._path)!r}, empty)"
        return (
            f"DatasetCollection({str(self._path)!r}, {state['state']}, "
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
        if not self._path.exists() or (self._path.is_dir() and not any(self._path.iterdir())):
            return None
        try:
            root = zarr.open_group(self._path, mode="r")
        except Exception as e:
            msg = f"{self._path} exists and is not a collection; choose another path or delete it"
            raise CollectionPathError(msg) from e
        state = root.attrs.get(ATTR)
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            msg = f"{self._path} holds a zarr group that is not an annbatch collection; choose another path"
            raise CollectionPathError(msg)
        return state

    def _complete_state(self) -> dict[str, Any]:
        state = self._state()
        if state is None:
            msg = f"{self._path} holds no collection yet; build one with add_adatas"
            raise IncompleteCollectionError(msg)
        if state["state"] != "complete":
            msg = (
                f"the build of {self._path} did not finish; run the same add_adatas call (or "
                "`annbatch build`) again to resume it, or delete the folder"
            )
            raise IncompleteCollectionError(msg)
        return state

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
    def datasets(self) -> list[zarr.Group]:
        """The datasets, each an AnnData zarr group opened read-only."""
        root = zarr.open_group(self._path, mode="r")
        return [root[name] for name in self.dataset_names]  # type: ignore[misc]

    def __iter__(self) -> Iterator[zarr.Group]:
        return iter(self.datasets)

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
        """Datasets, rows, genes, dtype, codec and bytes on disk (what ``annbatch info`` prints)."""
        state = self._complete_state()
        datasets = []
        for group in self.datasets:
            entry = {"name": group.basename, **describe_x(group)}
            entry["bytes"] = _size_on_disk(self._path / group.basename)
            datasets.append(entry)
        return {
            "path": str(self._path),
            "n_datasets": len(datasets),
            "n_obs": sum(d["n_obs"] for d in datasets),
            "n_var": len(state["var_names"]),
            "bytes": sum(d["bytes"] for d in datasets),
            "datasets": datasets,
        }

    # ---------------------------------------------------------------------------- writing
    def add_adatas(
        self,
        inputs: Sequence[str | os.PathLike[str] | ad.AnnData],
        *,
        var_names: Sequence[str] | None = None,
        dataset_size: int = DEFAULT_DATASET_SIZE,
        memory_budget: int | str = DEFAULT_MEMORY_BUDGET,
        rng: np.random.Generator | int | None = None,
        progress: bool = True,
        compression: Compression = DEFAULT_COMPRESSION,
    ) -> Self:
        """Write ``inputs`` into the collection, their rows shuffled across datasets.

        On an empty path this builds the collection. On a complete collection it appends:
        the new rows are shuffled among themselves into new datasets, aligned to the
        collection's genes (genes it lacks are dropped, with a warning); existing datasets
        are not rewritten, so old and new rows mix only when the Loader reads chunks of both
        into one window. To mix everything, build a new collection from all inputs. After an
        interrupted build, the same call resumes it. Inputs are only read, never modified.

        Parameters
        ----------
        inputs
            Paths to ``.h5ad`` files or zarr AnnData stores, or AnnData objects (in memory
            or backed). X must be dense in all of them or CSR in all, with one dtype.
        var_names
            The genes to keep, in this order (missing ones are zeros). Default: every gene of
            any input, in order of first appearance.
        dataset_size
            Most rows per dataset; the memory budget may make datasets smaller.
        memory_budget
            Bytes (or a size such as ``"2GB"``) the build may hold in memory at once, about.
        rng
            Seed or generator for the shuffle. The same seed and inputs give the same
            collection.
        progress
            Show a progress bar with rows per second.
        compression
            Codec of the new datasets' X: ``"none"`` (default), ``"lz4"`` or ``"zstd"``.
            Uncompressed datasets are the fastest to read by far, because the Loader reads
            exactly the bytes of the rows it wants and decodes nothing (measured: 1.8-2.6x the
            rows/s of LZ4 at ``chunk_size=256``, 2.8-3.0x at 32); they are also the largest
            (3.3x LZ4 on random-valued counts; on real data it depends on how well it
            compresses). Choose ``"lz4"`` where disk space or a slow disk matters more,
            ``"zstd"`` for the smallest store (it decodes about half as fast as LZ4).

        Returns
        -------
        The collection, to chain ``Loader().use_collection(...)``.
        """
        parse_int(dataset_size, "dataset_size", minimum=1, numpy=False)
        budget = parse_bytes(memory_budget)
        compression = parse_compression(compression)
        genes = None if var_names is None else pd.Index(list(var_names), dtype=object)
        if genes is not None and (not genes.is_unique or len(genes) == 0):
            msg = "var_names must be a non-empty list of unique gene names"
            raise InvalidArgumentError(msg)
        state = self._state()  # raises if the path holds something else
        opened = open_inputs(inputs)
        try:
            self._build(
                opened, state, genes, dataset_size, budget, rng, compression, progress=progress
            )
        finally:
            for inp in opened:
                inp.close()
        return self

    def _build(
        self,
        inputs: list[Any],
        state: dict[str, Any] | None,
        var_names: pd.Index | None,
        dataset_size: int,
        budget: int,
        rng: np.random.Generator | int | None,
        compression: Compression,
        *,
        progress: bool,
    ) -> None:
        names = [inp.name for inp in inputs]
        spec: dict[str, Any] = {
            "inputs": names,
            "dataset_size": dataset_size,
            "memory_budget": budget,
            "var_names": None if var_names is None else list(var_names),
            "compression": compression,
        }
        if state is not None and state["state"] != "complete":
            build = state["build"]
            # Builds begun before the compression option wrote LZ4.
            same = {
                k: build.get(k, "lz4" if k == "compression" else None) for k in spec
            } == spec and all(not name.startswith("AnnData ") for name in names)
            if not same:
                msg = (
                    f"an interrupted build of other inputs or arguments is in {self._path}; run it "
                    "again with the same paths and arguments to resume, or delete the folder"
                )
                raise CollectionPathError(msg)
            seed = build["seed"]
        else:
            seed = int(np.random.default_rng(rng).integers(2**63))
        done: list[dict[str, Any]] = [] if state is None else list(state["datasets"])
        if state is not None and state["state"] == "complete":  # appending
            existing = pd.Index(state["var_names"], dtype=object)
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
        elif state is not None:  # resuming: the genes were fixed when the build began
            var_names = pd.Index(state["var_names"], dtype=object)
        elif var_names is None:
            var_names = union_var_names(inputs)
        first = (
            len(done) if state is None or state["state"] == "complete" else state["build"]["first"]
        )
        plan = plan_build(inputs, len(var_names), dataset_size, budget)
        dataset_names = [f"dataset_{first + k:06d}" for k in range(plan.n_datasets)]
        scratch = self._path / SCRATCH
        root = zarr.open_group(self._path, mode="a", zarr_format=3)
        resuming = state is not None and state["state"] != "complete"
        distributed = resuming and state["build"].get("distributed", False)  # type: ignore[index]
        # The collection's state, rewritten to the root's attributes at every step of the build.
        record: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "state": "building",
            "var_names": list(var_names),
            "datasets": done,
            "build": {**spec, "seed": seed, "first": first, "distributed": distributed},
        }
        root.attrs[ATTR] = record
        gen = np.random.default_rng(seed)
        assignment = assign_datasets(plan.n_obs, plan.rows_per_dataset, gen)
        if not distributed:
            shutil.rmtree(scratch, ignore_errors=True)
            with progress_bar(plan.n_obs, "distributing rows", show=progress) as bar:
                distribute(inputs, var_names, plan, assignment, scratch, bar.update)
            record["build"]["distributed"] = True
            root.attrs[ATTR] = record
        del assignment
        obs = union_obs(inputs)
        written = {d["name"] for d in done}
        with progress_bar(plan.n_obs, "writing datasets", show=progress) as bar:

            def on_written(name: str, n_obs: int) -> None:
                done.append({"name": name, "n_obs": n_obs})
                root.attrs[ATTR] = record
                bar.update(n_obs)

            write_datasets(
                root,
                dataset_names,
                obs,
                var_names,
                inputs[0].dtype,
                scratch,
                gen,
                on_written,
                sparse=inputs[0].sparse,
                skip=written,
                compression=compression,
            )
        shutil.rmtree(scratch, ignore_errors=True)
        record["state"] = "complete"
        del record["build"]
        root.attrs[ATTR] = record


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
