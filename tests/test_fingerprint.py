"""Content fingerprints: an input is "the same data" only if every value the build takes from
it is the same (X, layers, obsm, obs, var), never because its names, shape and first and last
rows match. Inputs whose cells are named "0".."n-1" (anndata's default) share all of those."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from tests._adata_files import write_adata

from annbatch import DatasetCollection
from annbatch.collection import SOURCE_COLUMN
from annbatch.errors import CollectionCompleteError, DuplicateInputError

N_OBS, GENES = 40, [f"g{j}" for j in range(8)]
INTERIOR = 20
"""A row far from the first and last 16."""


def _adata(seed: int = 0, donor: str = "d0", edge_seed: int = 99) -> ad.AnnData:
    """Cells named "0".."39" (anndata's default), sparse X, a layer, an obsm array, obs and
    var columns; every value derived from ``seed`` except the first and last 16 rows of X
    (from ``edge_seed``)."""
    rng = np.random.default_rng(seed)
    edge = np.random.default_rng(edge_seed)
    dense = (edge.random((N_OBS, len(GENES))) < 0.5) * edge.integers(1, 9, (N_OBS, len(GENES)))
    middle = slice(16, N_OBS - 16)
    dense[middle] = (rng.random(dense[middle].shape) < 0.5) * rng.integers(1, 9, (8, 8))
    obs = pd.DataFrame(
        {
            "donor": pd.Categorical([donor] * N_OBS, categories=["d0", "d1", "d2"]),
            "n_counts": dense.sum(axis=1).astype(np.int64),
        },
        index=[str(k) for k in range(N_OBS)],
    )
    var = pd.DataFrame({"gene_length": np.arange(len(GENES), dtype=np.float64)}, index=GENES)
    adata = ad.AnnData(X=sp.csr_matrix(dense.astype(np.float32)), obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(dense.astype(np.float32))
    adata.obsm["X_pca"] = np.arange(N_OBS * 3, dtype=np.float32).reshape(N_OBS, 3)
    return adata


def _change_x(a: ad.AnnData) -> None:
    x = a.X.toarray()
    x[INTERIOR, 3] += 1
    a.X = sp.csr_matrix(x)


def _change_layer(a: ad.AnnData) -> None:
    counts = a.layers["counts"].toarray()
    counts[INTERIOR, 3] += 1
    a.layers["counts"] = sp.csr_matrix(counts)


def _change_obs(a: ad.AnnData) -> None:
    a.obs.loc[str(INTERIOR), "n_counts"] += 1


def _change_obs_label(a: ad.AnnData) -> None:
    a.obs.loc[str(INTERIOR), "donor"] = "d1"


def _change_categories(a: ad.AnnData) -> None:
    a.obs["donor"] = a.obs["donor"].cat.add_categories(["d3"])


def _change_obsm(a: ad.AnnData) -> None:
    a.obsm["X_pca"][INTERIOR, 1] += 1


def _change_var(a: ad.AnnData) -> None:
    a.var.loc["g3", "gene_length"] += 1


CHANGES = {
    "X": _change_x,
    "layer": _change_layer,
    "obs-value": _change_obs,
    "obs-label": _change_obs_label,
    "obs-categories": _change_categories,
    "obsm": _change_obsm,
    "var": _change_var,
}


def _changed(change) -> ad.AnnData:
    adata = _adata()
    change(adata)
    return adata


def _datasets(collection: DatasetCollection) -> list[ad.AnnData]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Observation names are not unique", UserWarning)
        return [ad.read_zarr(collection.path / name) for name in collection.dataset_names]


def _values(collection: DatasetCollection, source: str) -> tuple[np.ndarray, pd.Series]:
    """X (dense, rows in obs-name order) and donor labels of one input's rows."""
    xs, labels = [], []
    for adata in _datasets(collection):
        keep = (adata.obs[SOURCE_COLUMN] == source).to_numpy()
        xs.append(pd.DataFrame(adata.X[keep].toarray(), index=adata.obs_names[keep]))
        labels.append(adata.obs["donor"][keep])
    frame = pd.concat(xs)
    order = np.argsort(frame.index.astype(int))
    return frame.to_numpy()[order], pd.concat(labels).iloc[order].astype(str)


def _sorted_rows(x: np.ndarray) -> np.ndarray:
    return x[np.lexsort(x.T[::-1])]


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_one_interior_value_makes_a_different_input(tmp_path, change):
    base = write_adata(_adata(), tmp_path / "base.h5ad")
    other = write_adata(_changed(change), tmp_path / "other.zarr")
    # In one call: two inputs, not one given twice.
    both = DatasetCollection(tmp_path / "both.zarr").add_adatas([base, other], progress=False)
    assert both.n_obs == 2 * N_OBS
    # Appended to a collection that holds the first: added, not "already holds".
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas([base], progress=False)
    collection.add_adatas([other], append=True, progress=False)
    assert collection.n_obs == 2 * N_OBS


def test_three_donors_with_the_same_cell_names_are_three_inputs(tmp_path):
    adatas = [_adata(seed=d, donor=f"d{d}") for d in range(3)]
    paths = [write_adata(a, tmp_path / f"donor{d}.h5ad") for d, a in enumerate(adatas)]
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(paths, progress=False)
    assert collection.n_obs == 3 * N_OBS
    for d, (adata, path) in enumerate(zip(adatas, paths, strict=True)):
        x, labels = _values(collection, path)
        np.testing.assert_array_equal(x, adata.X.toarray())
        assert (labels == f"d{d}").all()


def test_a_regenerated_input_is_not_already_built(tmp_path):
    path = tmp_path / "in.h5ad"
    write_adata(_adata(seed=0), path)
    out = tmp_path / "out.zarr"
    DatasetCollection(out).add_adatas([str(path)], rng=1, progress=False)
    regenerated = _adata(seed=1)  # same names, same first and last rows, other values
    write_adata(regenerated, path)
    # The same call: not "nothing was written" (that would leave the new values out).
    with pytest.raises(CollectionCompleteError, match=r"but other values.*append=True"):
        DatasetCollection(out).add_adatas([str(path)], rng=1, progress=False)
    # Appended: the new values are in.
    collection = DatasetCollection(out).add_adatas([str(path)], rng=1, append=True, progress=False)
    held = np.concatenate([a.X.toarray() for a in _datasets(collection)])
    expected = np.concatenate([_adata(seed=0).X.toarray(), regenerated.X.toarray()])
    np.testing.assert_array_equal(_sorted_rows(held), _sorted_rows(expected))
    # Now the collection holds it: the same append again writes nothing.
    with pytest.warns(UserWarning, match="nothing was written"):
        DatasetCollection(out).add_adatas([str(path)], rng=1, append=True, progress=False)
    with pytest.raises(DuplicateInputError, match="already holds the data"):
        DatasetCollection(out).add_adatas([str(path)], append=True, progress=False)


def _interrupted(out, paths) -> None:
    from annbatch.collection import _build

    def hook(step: str) -> None:
        if step.startswith("write dataset"):  # after every input was read into the buckets
            raise KeyboardInterrupt(step)

    _build.crash_hook = hook
    try:
        with pytest.raises(KeyboardInterrupt):
            DatasetCollection(out).add_adatas(paths, rng=1, progress=False)
    finally:
        _build.crash_hook = None


def test_an_interrupted_build_rerun_after_regeneration_builds_the_new_data(tmp_path):
    # Inputs that differ in their first rows too (so that a build before content
    # fingerprints accepts them as two), then one regenerated with the same first rows.
    paths = [write_adata(_adata(i, edge_seed=i), tmp_path / f"in{i}.h5ad") for i in range(2)]
    out = tmp_path / "out.zarr"
    _interrupted(out, paths)
    regenerated = _adata(7, edge_seed=1)
    write_adata(regenerated, tmp_path / "in1.h5ad")
    with pytest.warns(UserWarning, match="in1.h5ad holds other data than the interrupted build"):
        collection = DatasetCollection(out).add_adatas(paths, rng=1, progress=False)
    assert collection.n_obs == 2 * N_OBS
    x, _ = _values(collection, paths[1])
    np.testing.assert_array_equal(x, regenerated.X.toarray())
    # And it is recorded as such: the same call now writes nothing.
    with pytest.warns(UserWarning, match="nothing was written"):
        DatasetCollection(out).add_adatas(paths, rng=1, progress=False)


def test_identical_inputs_are_still_recognised(tmp_path):
    """No regression: the same data, wherever it is stored, is the same input."""
    adata = _adata()
    h5ad = write_adata(adata, tmp_path / "a.h5ad")
    zarr_copy = write_adata(adata, tmp_path / "a.zarr")
    with pytest.raises(DuplicateInputError, match="holds the same data as"):
        DatasetCollection(tmp_path / "twice.zarr").add_adatas([h5ad, zarr_copy], progress=False)
    assert not (tmp_path / "twice.zarr").exists()
    out = tmp_path / "out.zarr"
    DatasetCollection(out).add_adatas([h5ad], progress=False, memory_budget="1MB")
    with pytest.warns(UserWarning, match="already holds these inputs, added with these options"):
        DatasetCollection(out).add_adatas([h5ad], progress=False, memory_budget="1MB")
    for same in (zarr_copy, adata.copy()):
        with pytest.raises(DuplicateInputError, match="already holds the data"):
            DatasetCollection(out).add_adatas([same], append=True, progress=False)


def test_an_interrupted_build_of_unchanged_inputs_resumes(tmp_path):
    paths = [write_adata(_adata(i, edge_seed=i), tmp_path / f"in{i}.h5ad") for i in range(2)]
    out = tmp_path / "out.zarr"
    _interrupted(out, paths)
    collection = DatasetCollection(out).add_adatas(paths, rng=1, progress=False)  # no warning
    assert collection.n_obs == 2 * N_OBS


@pytest.mark.parametrize("suffix", [".h5ad", ".zarr"])
def test_content_fingerprint_does_not_depend_on_blocks_or_storage(tmp_path, suffix):
    from annbatch.collection._fingerprint import read_content
    from annbatch.collection._inputs import open_input

    adata = _adata()
    adata.X = adata.X.toarray()  # dense X too
    carried = ["layers/counts", "obsm/X_pca"]
    in_memory = read_content(open_input(adata, 0), carried, 2**30)
    inp = open_input(write_adata(adata, tmp_path / f"a{suffix}"), 0)
    try:
        for budget in (1, 4_000, 2**30):  # a row at a time, a few rows, all rows at once
            assert read_content(inp, carried, budget) == in_memory
        # Carrying less is fingerprinting less: another digest.
        assert read_content(inp, carried[:1], 2**30) != in_memory
    finally:
        inp.close()
