"""Running one ``add_adatas`` call on a zarr collection: a build, an append or a resumed build,
its state written to the manifest at every step, and a failed append rolled back.

The two passes themselves are :mod:`annbatch.collection._build`'s; what may be written is
decided first by :mod:`annbatch.collection._policy`.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from typing import TYPE_CHECKING, Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd

from annbatch._core.frames import read_frame
from annbatch.collection import _policy as policy
from annbatch.collection._build import (
    RowOrder,
    assign_datasets,
    checkpoint,
    distribute,
    plan_build,
    progress_bar,
    write_datasets,
)
from annbatch.collection._disk import with_consequence
from annbatch.collection._fingerprint import Fingerprints, recorded_build
from annbatch.collection._inputs import SOURCE_COLUMN, element_specs, open_inputs, union_var_names
from annbatch.collection._obs import (
    ColumnType,
    ObsColumns,
    TypesOnly,
    build_schema,
    dataset_types,
    obs_bytes_per_row,
)
from annbatch.collection._store import BEFORE_APPEND, FORMAT_VERSION
from annbatch.errors import CollectionPathError, InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path

    import zarr

    from annbatch.collection._build import BuildPlan
    from annbatch.collection._inputs import ElementSpec, Input
    from annbatch.collection._layout import XLayout
    from annbatch.collection._obs import ObsSchema
    from annbatch.collection._policy import Request
    from annbatch.collection._store import CollectionStore


def add(
    store: CollectionStore,
    request: Request,
    rng: np.random.Generator | int | None,
    load_adata: Callable[[Any], ad.AnnData] | None,
    *,
    append: bool,
    force: bool,
    progress: bool,
) -> None:
    """Write the inputs of ``request`` into the zarr collection at ``store``: build it, resume
    its interrupted build, or append to it (what may be written is checked first)."""
    state = store.state()  # raises if the path holds something else
    policy.refuse_foreign(state, store.where)
    opened = open_inputs(request.items, load_adata)
    try:
        policy.check_groupby(opened, request.groupby)
        options = request.options(rng, state)
        complete = state is not None and state["state"] == "complete"
        specs = [] if complete else element_specs(opened)
        # The layers and obsm a content fingerprint covers: those the collection (or the
        # build in progress) carries, else those this build will carry.
        carried = [s.path for s in specs] if state is None else list(state.get("elements", {}))
        prints = Fingerprints(opened, carried, request.budget)
        if state is not None and complete:
            repeat = policy.is_repeat(
                state, prints, options, store.where, append=append, force=force, stacklevel=3
            )
            if repeat:
                return
        if not force:
            policy.refuse_repeats(prints, state if complete else None)
        if state is not None and complete:
            specs = element_specs(opened)
            policy.check_append(opened, state, store.where, store.root())
            specs = policy.elements_for_append(specs, state, store.where, stacklevel=4)
        Runner(store, specs, request.layout).run(
            opened, prints, state, options, rng, progress=progress
        )
    finally:
        for inp in opened:
            inp.close()


class Runner:
    """One build (or append, or resumed build) of a zarr collection.

    Parameters
    ----------
    store
        The collection.
    elements
        The layers and obsm the build carries.
    layout
        X's layout (write_sharded's arguments); None: annbatch's.
    """

    def __init__(
        self, store: CollectionStore, elements: list[ElementSpec], layout: XLayout | None
    ) -> None:
        self._store = store
        self._elements = elements
        self._layout = layout
        self._var: pd.DataFrame | None = None  # var columns of the build

    def run(
        self,
        inputs: list[Input],
        prints: Fingerprints,
        state: dict[str, Any] | None,
        options: dict[str, Any],
        rng: np.random.Generator | int | None,
        *,
        progress: bool,
    ) -> None:
        """Build, resume or append (as ``state`` says), then record the finished collection."""
        where = self._store.where
        names = [inp.name for inp in inputs]
        var_names = None if options["var_names"] is None else pd.Index(options["var_names"])
        appending = state is not None and state["state"] == "complete"
        resuming = state is not None and not appending
        if resuming:
            build = state["build"]  # type: ignore[index]
            elements = {e.path: e.describe() for e in self._elements}
            if (
                recorded_build(build)[0] != prints.quick
                or not policy.same_options(build, options)
                or state.get("elements", {}) != elements  # type: ignore[union-attr]
            ):
                msg = (
                    f"an interrupted build of other inputs or arguments is in {where}; run it "
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
                    stacklevel=5,
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
            sources.append((f"the collection {where}", TypesOnly(prior)))
        sources += [(inp.name, inp.obs) for inp in inputs]
        schema = build_schema(sources, skip=SOURCE_COLUMN)
        columns = [f"{c}: {t.describe()}" for c, t in schema.types.items()]
        if resuming and state["build"].get("obs_columns", columns) != columns:  # type: ignore[index]
            # The buckets hold obs columns by position: other columns cannot resume them.
            msg = (
                f"an interrupted build with other obs columns is in {where}; run it again "
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
        root = None if state is None else self._store.root("r+")
        try:
            if root is None:
                root = self._store.create(record)
            elif not resuming:
                self._store.save(root, record, "begin append", keep_previous=True)
            elif redistribute:
                self._store.save(root, record, "redistribute")
            self._write(root, record, inputs, names, var_names, schema, plan, progress=progress)
        except Exception as e:
            if first > 0 and root is not None:  # a failed append: the collection as it was
                try:
                    self._roll_back(root, record, first)
                except Exception as undo:  # the first error stays the one raised
                    e.add_note(f"undoing the append of {where} failed too: {undo!r}")
                    raise e from e.__cause__
            full = with_consequence(e, where, after_full_disk(where, append=first > 0))
            if full is None:
                raise
            raise full from full.__cause__

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
            f"the interrupted build of {self._store.where} read (or it did not record what it read): "
            "the build reads its inputs again",
            UserWarning,
            stacklevel=6,
        )
        return None

    @contextlib.contextmanager
    def _finished_datasets(self, names: Sequence[str]) -> Iterator[list[Any]]:
        """The finished datasets ``names``, opened read-only: zarr groups, or, in the scratch
        collection of an append to an h5ad collection, the h5ad files of the folder above."""
        root = self._store.root("r")
        files: list[h5py.File] = []
        groups: list[Any] = []
        try:
            for name in names:
                if name in root:
                    groups.append(root[name])
                else:
                    files.append(h5py.File(self._store.path.parent / f"{name}.h5ad", "r"))
                    groups.append(files[-1])
            yield groups
        finally:
            for f in files:
                f.close()

    def _roll_back(self, root: zarr.Group, record: dict[str, Any], first: int) -> None:
        """Undo a failed append. The manifest goes back first, so that the collection reads as
        it was at every moment (:meth:`CollectionStore.restore`); then the append's datasets
        and scratch go."""
        current = self._store.state()
        if current is not None and current["state"] == "complete":
            if len(current["datasets"]) > first:
                return  # the append had finished: nothing to undo
        else:
            restored = {k: v for k, v in record.items() if k != "build"}
            restored["state"] = "complete"
            restored["datasets"] = record["datasets"][:first]
            self._store.restore(root, restored)
        for name in record["build"]["dataset_names"]:
            if name in root:
                del root[name]
        shutil.rmtree(self._store.scratch_folder, ignore_errors=True)

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
        first, done, scratch = build["first"], record["datasets"], self._store.scratch_folder
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
            self._store.save(root, record, "distributed")
        del assignment
        written = {d["name"] for d in done}
        offsets = np.cumsum([0] + [inp.n_obs for inp in inputs])[:-1]
        already = sum(d["n_obs"] for d in done[first:])
        with progress_bar(plan.n_obs, "writing datasets", show=progress, initial=already) as bar:

            def on_written(name: str, n_obs: int) -> None:
                done.append({"name": name, "n_obs": n_obs})
                self._store.save(root, record, f"recorded {name}")
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
        options = {k: build[k] for k in build.get("option_keys", policy.BASE_OPTIONS)}
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
        self._store.save(root, complete, "complete")
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


def _describe_x(inp: Input) -> dict[str, Any]:
    """X as the manifest records it (dtype and sparse both None: the inputs have no X)."""
    if not inp.has_x:
        return {"dtype": None, "sparse": None}
    return {"dtype": inp.dtype.str, "sparse": inp.sparse}  # type: ignore[union-attr]


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
