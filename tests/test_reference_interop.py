"""Collections shared with the reference annbatch library (issue 25 item 3).

Ours carry the reference's root encoding (``annbatch.io.V1_ENCODING``) once complete; a
collection in the reference's layout (that encoding on the root, ``dataset_<n>`` AnnData groups
under it) reads in our ``DatasetCollection`` and Loader; iterating a collection yields its
groups in the collection's mode.

The tests marked ``needs_reference`` run the reference library itself, as a black box, in a
Python 3.12 virtual environment (``ANNBATCH_REFERENCE_PYTHON``, else ``.venv-reference`` in the
repository; ``.ci/run`` makes it): it builds a collection our Loader must read, and reads ours.
Without that environment they are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import annbatch
import annbatch.collection._build as build_module
from annbatch import DatasetCollection, Loader
from annbatch.errors import CollectionPathError

V1 = {"encoding-type": "annbatch-preshuffled", "encoding-version": "0.1.0"}
_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PYTHON = Path(
    os.environ.get("ANNBATCH_REFERENCE_PYTHON", _ROOT / ".venv-reference" / "bin" / "python")
)
needs_reference = pytest.mark.skipif(
    not REFERENCE_PYTHON.exists(),
    reason=f"no Python with the reference annbatch at {REFERENCE_PYTHON} (set ANNBATCH_REFERENCE_PYTHON)",
)


def _inputs(tmp_path: Path, *, sparse: bool, counts: bool, n: int = 2) -> list[str]:
    """``n`` h5ad files of 40 rows and 12 genes (integer-valued counts, or not), with a
    layer, an obsm entry and a categorical obs column."""
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        x = sp.random(40, 12, density=0.3, format="csr", dtype=np.float32, random_state=i)
        x.data = np.round(x.data * 300) + 1 if counts else x.data + 0.25
        adata = ad.AnnData(
            X=x if sparse else x.toarray(),
            obs=pd.DataFrame(
                {"cell_type": pd.Categorical(rng.choice(["B", "T"], 40))},
                index=[f"cell{i}_{j}" for j in range(40)],
            ),
            var=pd.DataFrame(index=[f"gene{k}" for k in range(12)]),
        )
        adata.obsm["pca"] = rng.normal(size=(40, 3)).astype(np.float32)
        path = tmp_path / f"input{i}.h5ad"
        adata.write_h5ad(path)
        paths.append(str(path))
    return paths


def _our_epoch(collection: DatasetCollection) -> tuple[np.ndarray, np.ndarray]:
    """Rows (dense float64, in row order) and src_path of every row, through our Loader."""
    loader = Loader(batch_size=7, chunk_size=4, preload_nchunks=4, to=None, return_index=True)
    loader.use_collection(collection)
    n = loader.n_obs
    x, src = np.zeros((n, loader.n_var)), np.empty(n, dtype=object)
    seen = np.zeros(n, dtype=int)
    for batch in loader:
        rows = batch["X"].toarray() if sp.issparse(batch["X"]) else batch["X"]
        x[batch["index"]] = rows
        src[batch["index"]] = batch["obs"]["src_path"].to_numpy()
        seen[batch["index"]] += 1
    assert (seen == 1).all()
    return x, src


# ------------------------------------------------------------------- the root's encoding
def test_v1_encoding_is_exported():
    assert annbatch.io.V1_ENCODING == V1


@pytest.mark.parametrize("layout", [{}, {"compression": "none"}, {"n_obs_per_chunk": 8}])
def test_a_collection_carries_the_encoding_only_once_complete(tmp_path, layout):
    seen: list[tuple[str, bool]] = []
    root_path = tmp_path / "atlas.zarr"

    def look(step: str) -> None:
        if (root_path / "zarr.json").exists():
            attrs = json.loads((root_path / "zarr.json").read_text())["attributes"]
            state = attrs.get("annbatch-collection", {}).get("state")
            seen.append((state, all(attrs.get(k) == v for k, v in V1.items())))

    build_module.crash_hook = look
    try:
        collection = DatasetCollection(root_path).add_adatas(
            _inputs(tmp_path, sparse=True, counts=True), dataset_size=30, progress=False, **layout
        )
    finally:
        build_module.crash_hook = None
    assert seen  # the build's steps were observed
    assert all(has == (state == "complete") for state, has in seen)
    attrs = zarr.open_group(root_path, mode="r").attrs
    assert {k: attrs[k] for k in V1} == V1
    assert collection.is_complete


def test_appending_to_an_older_collection_adds_the_encoding(tmp_path):
    first, second = _inputs(tmp_path, sparse=True, counts=True)
    path = tmp_path / "atlas.zarr"
    DatasetCollection(path).add_adatas([first], dataset_size=30, progress=False)
    root = zarr.open_group(path, mode="r+")  # as written before collections carried it
    root.attrs.put({k: v for k, v in root.attrs.asdict().items() if k not in V1})
    assert "encoding-type" not in zarr.open_group(path, mode="r").attrs
    DatasetCollection(path).add_adatas([second], dataset_size=30, append=True, progress=False)
    attrs = zarr.open_group(path, mode="r").attrs
    assert {k: attrs.get(k) for k in V1} == V1
    assert DatasetCollection(path).n_obs == 80


@pytest.mark.parametrize(("mode", "read_only"), [("r", True), ("r+", False), ("a", False)])
def test_iteration_yields_groups_in_the_collections_mode(tmp_path, mode, read_only):
    path = tmp_path / "atlas.zarr"
    DatasetCollection(path).add_adatas(
        _inputs(tmp_path, sparse=True, counts=False), dataset_size=30, progress=False
    )
    collection = DatasetCollection(path, mode=mode)
    groups = list(collection)
    assert [g.basename for g in groups] == collection.dataset_names
    assert [g.store.read_only for g in groups] == [read_only] * len(groups)
    if not read_only:  # what a user of the reference may do with a dataset's group
        groups[0].attrs["note"] = "checked"
        assert zarr.open_group(path / groups[0].basename, mode="r").attrs["note"] == "checked"


# ---------------------------------------- a collection in the reference's layout, no reference
def _reference_layout(tmp_path: Path, *, sparse: bool, n_datasets: int = 11) -> Path:
    """A collection as the reference lays one out: the encoding on the root, and AnnData groups
    ``dataset_0``, ``dataset_1``, ... (written by anndata) without annbatch's manifest."""
    path = tmp_path / "reference.zarr"
    root = zarr.open_group(path, mode="w", zarr_format=3, attributes=V1)
    for i in range(n_datasets):
        x = np.full((3 + i % 2, 5), float(i), dtype=np.float32)
        obs = pd.DataFrame(
            {"src_path": [f"input{i}.h5ad"] * x.shape[0]},
            index=[f"d{i}_{j}" for j in range(x.shape[0])],
        )
        adata = ad.AnnData(
            X=sp.csr_matrix(x) if sparse else x,
            obs=obs,
            var=pd.DataFrame(index=[f"gene{k}" for k in range(5)]),
        )
        ad.io.write_elem(root, f"dataset_{i}", adata)
    return path


@pytest.mark.parametrize("sparse", [False, True])
def test_our_loader_reads_the_reference_layout(tmp_path, sparse):
    path = _reference_layout(tmp_path, sparse=sparse)
    collection = DatasetCollection(path, mode="r")
    assert not collection.is_empty
    assert collection.is_complete
    names = [f"dataset_{i}" for i in range(11)]  # in number order: dataset_10 last
    assert collection.dataset_names == names
    assert [g.basename for g in collection] == names
    assert collection.n_obs == sum(3 + i % 2 for i in range(11))
    assert list(collection.var_names) == [f"gene{k}" for k in range(5)]
    x, src = _our_epoch(collection)
    want = np.concatenate([np.full((3 + i % 2, 5), float(i)) for i in range(11)])
    np.testing.assert_array_equal(x, want)
    assert src.tolist() == collection.obs(["src_path"])["src_path"].tolist()
    assert src.tolist() == [f"input{i}.h5ad" for i in range(11) for _ in range(3 + i % 2)]


def test_appending_to_a_reference_collection_is_refused(tmp_path):
    path = _reference_layout(tmp_path, sparse=True, n_datasets=2)
    before = sorted(p.relative_to(path) for p in path.rglob("*"))
    extra = _inputs(tmp_path, sparse=True, counts=False, n=1)
    with pytest.raises(CollectionPathError, match="built by the reference annbatch library"):
        DatasetCollection(path).add_adatas(extra, append=True, progress=False)
    assert sorted(p.relative_to(path) for p in path.rglob("*")) == before


# ------------------------------------------------------- the reference itself, as a black box
_READ = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np, scipy.sparse as sp
    warnings.simplefilter("ignore")
    from annbatch import DatasetCollection, Loader

    path, out = sys.argv[1], sys.argv[2]
    collection = DatasetCollection(path, mode="r")
    groups = list(collection)
    loader = Loader(chunk_size=4, preload_nchunks=4, batch_size=8, shuffle=False, to=None,
                    return_index=True).use_collection(collection)
    xs, index, src, dtypes = [], [], [], set()
    for batch in loader:
        x = batch["X"]
        dtypes.add(str(x.dtype))
        xs.append(x.toarray() if sp.issparse(x) else np.asarray(x))
        index.append(batch["index"])
        src.extend(batch["obs"]["src_path"].astype(str).tolist())
    np.savez(out, x=np.concatenate(xs).astype(np.float64), index=np.concatenate(index))
    with open(out + ".json", "w") as f:
        import annbatch
        json.dump({"module": annbatch.__file__, "empty": collection.is_empty, "groups": [g.basename for g in groups],
                   "read_only": [g.store.read_only for g in groups], "dtypes": sorted(dtypes),
                   "src": src}, f)
    """
)

_BUILD = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np
    warnings.simplefilter("ignore")
    from annbatch import DatasetCollection
    DatasetCollection(sys.argv[1]).add_adatas(
        sys.argv[2:], dataset_size=30, shuffle_chunk_size=5, rng=np.random.default_rng(0)
    )
    """
)


def _reference(script: str, *args: object) -> None:
    """Run ``script`` in the reference's Python (none of our paths on its sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(
        [str(REFERENCE_PYTHON), "-c", script, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _reference_epoch(path: Path, tmp_path: Path) -> tuple[np.ndarray, dict]:
    out = tmp_path / "reference_epoch.npz"
    _reference(_READ, path, out)
    got = np.load(out)
    x = np.zeros_like(got["x"])
    x[got["index"]] = got["x"]
    meta = json.loads(Path(f"{out}.json").read_text())
    # The reference's own package ran, not ours.
    assert not Path(meta["module"]).resolve().is_relative_to(_ROOT / "src")
    meta["src"] = np.array(meta["src"], dtype=object)[np.argsort(got["index"])]
    return x, meta


@needs_reference
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(
    ("layout", "narrow"),
    [
        ({}, True),  # packed-lz4, our default: counts stored as unsigned integers
        ({"compression": "packed"}, True),
        ({"compression": "none"}, False),
        ({"n_obs_per_chunk": 8}, False),  # write_sharded's layout
    ],
)
def test_the_reference_reads_our_collections(tmp_path, sparse, layout, narrow):
    path = tmp_path / "ours.zarr"
    ours = DatasetCollection(path).add_adatas(
        _inputs(tmp_path, sparse=sparse, counts=True), dataset_size=30, progress=False, **layout
    )
    want, src = _our_epoch(DatasetCollection(path, mode="r"))
    got, meta = _reference_epoch(path, tmp_path)
    assert not meta["empty"]
    assert meta["groups"] == ours.dataset_names
    assert meta["read_only"] == [True] * len(ours)
    np.testing.assert_array_equal(got, want)  # every value exact
    assert meta["src"].tolist() == src.tolist()
    # What the reference cannot do: widen our packed values back to the inputs' dtype. It
    # yields them in the narrow stored type (uint16 here); our Loader yields float32.
    if narrow:
        assert meta["dtypes"] == ["uint16"]
    else:
        assert meta["dtypes"] == ["float32"]


@needs_reference
@pytest.mark.parametrize("sparse", [True, False])
def test_our_loader_reads_a_collection_the_reference_built(tmp_path, sparse):
    path = tmp_path / "reference.zarr"
    _reference(_BUILD, path, *_inputs(tmp_path, sparse=sparse, counts=False, n=3))
    assert {k: zarr.open_group(path, mode="r").attrs[k] for k in V1} == V1
    want, meta = _reference_epoch(path, tmp_path)
    collection = DatasetCollection(path)
    assert collection.dataset_names == meta["groups"]
    assert collection.n_obs == 120
    assert list(collection.var_names) == [f"gene{k}" for k in range(12)]
    assert [g.store.read_only for g in collection] == [False] * len(collection)  # mode "a"
    got, src = _our_epoch(collection)
    np.testing.assert_array_equal(got, want)
    assert src.tolist() == meta["src"].tolist()
    assert {Path(s).name for s in src} == {"input0.h5ad", "input1.h5ad", "input2.h5ad"}
