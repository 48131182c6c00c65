"""Statements of the reference's current API (``REFERENCE_CURRENT_API.md``) that no other test
covered: its names, keyword-only arguments, the built-in exception classes its users catch,
request slices of at most ``chunk_size`` rows, validation when iteration starts, and a client
that reads a collection's var by iterating its zarr groups (issue 25 item 4).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from annbatch import DatasetCollection, Loader
from annbatch.abc import Sampler
from annbatch.errors import AnnbatchError
from annbatch.samplers import (
    ChunkSampler,
    ClassSampler,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    WeightedClassSampler,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

X = np.arange(60 * 2, dtype=np.float32).reshape(60, 2)
CLASSES = pd.Categorical(np.repeat(["a", "b"], 30))


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("annbatch", "Loader"),
        ("annbatch", "DatasetCollection"),
        ("annbatch", "write_sharded"),
        ("annbatch.io", "DatasetCollection"),
        ("annbatch.io", "write_sharded"),
        ("annbatch.io", "V1_ENCODING"),
        ("annbatch.samplers", "RandomSampler"),
        ("annbatch.samplers", "SequentialSampler"),
        ("annbatch.samplers", "DistributedSampler"),
        ("annbatch.samplers", "ClassSampler"),
        ("annbatch.samplers", "WeightedClassSampler"),
        ("annbatch.samplers", "ChunkSampler"),
        ("annbatch.abc", "Sampler"),
        ("annbatch.types", "LoadRequest"),
        ("annbatch.types", "LoaderOutput"),
    ],
)
def test_the_reference_names_import(module, name):
    value = getattr(importlib.import_module(module), name)
    assert value is not None
    assert name in importlib.import_module(module).__all__


def _sampler_calls() -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("Loader", lambda: Loader(None)),  # type: ignore[misc]
        ("SequentialSampler", lambda: SequentialSampler(4, 2, 4, False)),  # type: ignore[misc]
        ("RandomSampler", lambda: RandomSampler(4, 2, 4, True)),  # type: ignore[misc]
        ("ClassSampler", lambda: ClassSampler(4, 2, 4, CLASSES, 8)),  # type: ignore[misc]
        ("WeightedClassSampler", lambda: WeightedClassSampler(4, 2, 4, CLASSES, 8)),  # type: ignore[misc]
        ("DistributedSampler", lambda: DistributedSampler(SequentialSampler(4, 2, 4), "torch")),  # type: ignore[misc]
    ]


@pytest.mark.parametrize(("name", "call"), _sampler_calls(), ids=[n for n, _ in _sampler_calls()])
def test_arguments_past_the_documented_positional_ones_are_keyword_only(name, call):
    with pytest.raises(TypeError, match="positional argument"):
        call()


class _Refuses(Sampler):
    """A sampler whose validate always refuses (as for a configuration that cannot work)."""

    batch_size = 2
    shuffle = False

    def __init__(self) -> None:
        self.validated = 0

    def validate(self, n_obs: int) -> None:
        self.validated += 1
        msg = f"cannot serve {n_obs} rows"
        raise ValueError(msg)

    def _sample(self, n_obs: int) -> Iterator[dict[str, Any]]:
        raise AssertionError("_sample must not run after validate refused")  # pragma: no cover


def _errors() -> list[tuple[str, Callable[[], Any], type[Exception]]]:
    return [
        ("both to and to_torch", lambda: Loader(to=None, to_torch=True), ValueError),
        ("n_var without data", lambda: Loader().n_var, ValueError),
        (
            "datasets of other kinds",
            lambda: Loader(to=None).add_dataset(X).add_dataset(sp.csr_matrix(X)),
            ValueError,
        ),
        (
            "unequal var",
            lambda: (
                Loader(to=None)
                .add_dataset(X, var=pd.DataFrame(index=["a", "b"]))
                .add_dataset(X, var=pd.DataFrame(index=["a", "c"]))
            ),
            ValueError,
        ),
        (
            "mask with a step",
            lambda: setattr(RandomSampler(4, 2, 4), "mask", slice(0, 9, 2)),
            ValueError,
        ),
        ("empty mask", lambda: setattr(RandomSampler(4, 2, 4), "mask", slice(5, 5)), ValueError),
        (
            "num_samples past the rows",
            lambda: list(RandomSampler(4, 2, 4, num_samples=61).sample(60)),
            ValueError,
        ),
        (
            "unknown dist_info",
            lambda: DistributedSampler(SequentialSampler(4, 2, 4), dist_info="mpi"),
            ValueError,
        ),
        (
            "uninitialized torch.distributed",
            lambda: DistributedSampler(SequentialSampler(4, 2, 4), dist_info="torch"),
            RuntimeError,
        ),
        (
            "classes not categorical",
            lambda: ClassSampler(4, 2, 4, classes=np.array(["a"] * 8), num_samples=8),
            TypeError,
        ),
        (
            "classes with NA",
            lambda: ClassSampler(
                4, 2, 4, classes=pd.Categorical(["a"] * 7 + [None]), num_samples=8
            ),
            ValueError,
        ),
        (
            "no positive class weight",
            lambda: ClassSampler(
                4, 2, 4, classes=CLASSES, num_samples=8, class_weights={"a": 0, "b": 0}
            ),
            ValueError,
        ),
        (
            "classes in short runs",
            lambda: ClassSampler(4, 2, 4, classes=pd.Categorical(["a", "b"] * 30), num_samples=8),
            ValueError,
        ),
        ("collection of another type", lambda: DatasetCollection(3), TypeError),  # type: ignore[arg-type]
        (
            "validate refuses",
            lambda: next(iter(Loader(batch_sampler=_Refuses(), to=None).add_dataset(X))),
            ValueError,
        ),
    ]


@pytest.mark.parametrize(("what", "call", "builtin"), _errors(), ids=[w for w, _, _ in _errors()])
def test_errors_are_the_builtins_the_reference_raises(what, call, builtin):
    with pytest.raises(builtin) as caught:
        call()
    # Both catch styles work: the built-in the reference raises, and annbatch's base class
    # (a user sampler's own ValueError stays what it is).
    assert isinstance(caught.value, AnnbatchError) or what == "validate refuses"


def test_the_loader_validates_the_sampler_when_iteration_starts():
    sampler = _Refuses()
    loader = Loader(batch_sampler=sampler, to=None).add_dataset(X)
    assert sampler.validated == 0  # not at construction, nor when data is added
    with pytest.raises(ValueError, match="cannot serve 60 rows"):
        next(iter(loader))
    assert sampler.validated == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: RandomSampler(7, 3, 5, rng=np.random.default_rng(0)),
        lambda: RandomSampler(
            7, 3, 5, replacement=True, num_samples=40, rng=np.random.default_rng(0)
        ),
        lambda: SequentialSampler(7, 3, 5, mask=slice(3, 57)),
        lambda: ChunkSampler(
            7, 3, 5, shuffle=True, random_offset=True, rng=np.random.default_rng(0)
        ),
        lambda: ClassSampler(
            5, 3, 5, classes=CLASSES, num_samples=40, rng=np.random.default_rng(0)
        ),
        lambda: WeightedClassSampler(
            5, 3, 5, classes=CLASSES, num_samples=40, rng=np.random.default_rng(0)
        ),
    ],
    ids=[
        "random",
        "random-replacement",
        "sequential-mask",
        "chunk-offset",
        "class",
        "weighted-class",
    ],
)
def test_request_slices_hold_at_most_chunk_size_rows_and_none_is_empty(make):
    sampler = make()
    chunk = 7 if isinstance(sampler, ChunkSampler) else 5  # the chunk_size each was built with
    for request in sampler.sample(60):
        for piece in request["requests"]:
            assert 0 < piece.stop - piece.start <= chunk


def test_a_client_reads_var_by_iterating_the_collections_groups(tmp_path):
    """scvi-tools opens a collection with ``zarr.open(path)`` and reads var from its groups."""
    inputs = []
    for i in range(2):
        adata = ad.AnnData(
            X=sp.random(30, 6, density=0.4, format="csr", dtype=np.float32, random_state=i),
            var=pd.DataFrame(
                {"symbol": [f"S{k}" for k in range(6)]}, index=[f"g{k}" for k in range(6)]
            ),
        )
        adata.write_h5ad(tmp_path / f"in{i}.h5ad")
        inputs.append(str(tmp_path / f"in{i}.h5ad"))
    path = tmp_path / "atlas.zarr"
    collection = DatasetCollection(path).add_adatas(
        inputs, dataset_size=25, merge="same", progress=False
    )
    root = zarr.open(path, mode="r")
    assert isinstance(root, zarr.Group)
    names = sorted(name for name, _ in root.groups())
    assert names == collection.dataset_names
    for _, group in root.groups():
        var = ad.io.read_elem(group["var"])
        assert list(var.index) == [f"g{k}" for k in range(6)]
        assert list(var["symbol"]) == [f"S{k}" for k in range(6)]
