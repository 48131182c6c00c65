"""What a call may write to a collection: its arguments checked, the options a build records,
and the checks against what the collection holds (repeats, appends), before anything is written.

One comparison of options (:func:`same_options`) serves zarr and h5ad collections alike: the
same inputs with the same options write nothing, with other options they are refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from annbatch._args import parse_int, parse_size
from annbatch.collection._encoding import FOREIGN
from annbatch.collection._fingerprint import recorded, recorded_build
from annbatch.collection._layout import (
    COMPRESSIONS,
    DEFAULT_COMPRESSION,
    describe_x,
    parse_compression,
    parse_layout,
)
from annbatch.errors import (
    CollectionCompleteError,
    CollectionPathError,
    DuplicateInputError,
    IncompatibleDatasetsError,
    InvalidArgumentError,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    import zarr

    from annbatch.collection._fingerprint import Fingerprints
    from annbatch.collection._inputs import ElementSpec, Input
    from annbatch.collection._layout import Compression, XLayout

MERGES = (None, "same", "unique", "first", "only")
"""anndata.concat's strategies for combining the inputs' var columns."""
BASE_OPTIONS = ("var_names", "dataset_size", "memory_budget", "compression", "rng")
"""The options every build records (the others only when they differ from their default)."""
_DEFAULTS: dict[str, Any] = {
    "merge": None,
    "shuffle": True,
    "shuffle_chunk_size": 1,
    "groupby": None,
    "layout": None,
}


def parse_bytes(value: int | str) -> int:
    """A memory budget in bytes from ``123``, ``"512MB"`` or ``"2GB"`` (binary units)."""
    number = parse_size(value, "memory_budget")
    if number < 2**20:
        msg = f"memory_budget must be at least 1MB, got {value!r}"
        raise InvalidArgumentError(msg)
    return number


@dataclass(frozen=True, slots=True)
class Request:
    """The arguments of one ``add_adatas`` call, checked."""

    items: Sequence[Any]
    """The inputs (paths, groups or AnnData objects)."""
    genes: pd.Index | None
    """The genes to keep, in order; None: every gene of any input."""
    dataset_size: int | str
    """Most rows per dataset, or a size of X."""
    budget: int
    """The memory budget in bytes."""
    layout: XLayout | None
    """X's layout given as write_sharded's arguments; None: annbatch's."""
    compression: Compression
    """The layout given (or the default)."""
    compression_given: bool
    """Whether ``compression`` was given (else a collection keeps its own)."""
    merge: str | None
    """anndata.concat's strategy for var columns."""
    shuffle: bool
    """Whether rows are mixed across inputs."""
    block: int
    """Consecutive input rows moved together."""
    groupby: list[str]
    """obs columns each dataset's rows are sorted by."""

    def options(self, rng: object, state: dict[str, Any] | None) -> dict[str, Any]:
        """The options a build records and a repeat is compared by (:func:`same_options`)."""
        compression = self.compression
        if not self.compression_given and state is not None:
            # Without compression=, a collection keeps the layout it was built with (the
            # default has changed over releases): repeats match, appends stay alike.
            used = [b.get("compression") for b in state.get("builds", [])]
            used = [c for c in used if c in COMPRESSIONS]
            if used:
                compression = used[-1]
        options: dict[str, Any] = {
            "var_names": None if self.genes is None else list(self.genes),
            "dataset_size": self.dataset_size,
            "memory_budget": self.budget,
            "compression": compression,
            "rng": int(rng) if isinstance(rng, int | np.integer) else None,
        }
        # Recorded only when they differ from the defaults, so that collections built
        # before these options existed still match a repeat of their call.
        extra = {
            "merge": self.merge,
            "shuffle": self.shuffle,
            "shuffle_chunk_size": self.block,
            "groupby": self.groupby or None,
            "layout": None if self.layout is None else self.layout.describe(),
        }
        options.update({k: v for k, v in extra.items() if v != _DEFAULTS[k]})
        return options


def parse_request(
    *,
    inputs: Sequence[Any],
    var_names: Sequence[str] | None,
    dataset_size: int | str,
    memory_budget: int | str,
    n_obs_per_chunk: int | None,
    shard_size: int | str | None,
    zarr_compressor: Any,
    compression: Compression | None,
    merge: str | None,
    shuffle: bool,
    shuffle_chunk_size: int | None,
    groupby: str | Sequence[str] | None,
) -> Request:
    """Check ``add_adatas``' arguments (each error names the argument)."""
    if isinstance(dataset_size, str):
        parse_size(dataset_size, "dataset_size")
    else:
        parse_int(dataset_size, "dataset_size", minimum=1, numpy=False)
    budget = parse_bytes(memory_budget)
    layout = parse_layout(n_obs_per_chunk, shard_size, zarr_compressor)
    if layout is not None and compression is not None:
        msg = "give compression (annbatch's layouts) or n_obs_per_chunk / shard_size / zarr_compressor, not both"
        raise InvalidArgumentError(msg)
    parsed = parse_compression(DEFAULT_COMPRESSION if compression is None else compression)
    if merge not in MERGES:
        msg = f"merge must be one of {MERGES} (as for anndata.concat), got {merge!r}"
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
    return Request(
        items=inputs,
        genes=genes,
        dataset_size=dataset_size,
        budget=budget,
        layout=layout,
        compression=parsed,
        compression_given=compression is not None,
        merge=merge,
        shuffle=shuffle,
        block=block,
        groupby=group_columns,
    )


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


def same_options(recorded: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether a recorded build had ``options`` (options missing from either have their
    default, which is never recorded)."""
    keys = set(options) | set(recorded.get("option_keys", BASE_OPTIONS))
    return all(recorded.get(k) == options.get(k) for k in keys)


# ------------------------------------------------------------------- a finished collection
def refuse_foreign(state: dict[str, Any] | None, where: str) -> None:
    """A collection the reference library built is read, never written to."""
    if state is not None and FOREIGN in state:
        msg = (
            f"the collection {where} was built by the reference annbatch library "
            "(it carries only the annbatch-preshuffled encoding, not annbatch's manifest): "
            "annbatch reads it, but cannot append to it; build a new collection from all "
            "the inputs instead"
        )
        raise CollectionPathError(msg)


def is_repeat(
    state: dict[str, Any],
    prints: Fingerprints,
    options: dict[str, Any],
    where: str,
    *,
    append: bool,
    force: bool,
    stacklevel: int,
) -> bool:
    """Whether this call (these inputs, these options) is the one that built or extended the
    finished collection ``state``: then it writes nothing and says so (``stacklevel`` points
    the warning at the user's call). Raise if it would add rows without ``append``."""
    if not force and _built_by(state, prints, options):
        warnings.warn(
            f"{where} is finished and already holds these inputs, added with these options; "
            "nothing was written",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        return True
    if not append:
        _refuse_without_append(state, prints, where)
    return False


def _built_by(state: dict[str, Any], prints: Fingerprints, options: dict[str, Any]) -> bool:
    """Whether a build (or append) of these inputs with these options made ``state``."""
    return any(
        same_options(build, options) and same_build(build, prints)
        for build in state.get("builds", [])
    )


def same_build(build: dict[str, Any], prints: Fingerprints) -> bool:
    """Whether the recorded ``build`` was of these inputs' data (quick fingerprints first;
    the inputs are read only if all of those match)."""
    quick, contents = recorded_build(build)
    if quick != prints.quick:
        return False
    return all(prints.same(i, q, c) for i, (q, c) in enumerate(zip(quick, contents, strict=True)))


def _held(state: dict[str, Any] | None) -> dict[str, list[tuple[str | None, str]]]:
    """The inputs a collection holds: (content fingerprint, name) by quick fingerprint."""
    entries = [] if state is None else state.get("inputs", [])
    held: dict[str, list[tuple[str | None, str]]] = {}
    for (quick, content), entry in zip(recorded(entries), entries, strict=True):
        held.setdefault(quick, []).append((content, entry["name"]))
    return held


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


def refuse_repeats(prints: Fingerprints, state: dict[str, Any] | None) -> None:
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


# ------------------------------------------------------------------------------ appends
def check_append(
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


def elements_for_append(
    specs: list[ElementSpec], state: dict[str, Any], path: str, *, stacklevel: int
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
            stacklevel=stacklevel + 1,
        )
    return [mine[p] for p in held]


def check_groupby(inputs: Sequence[Input], columns: list[str]) -> None:
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
