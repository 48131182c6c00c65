"""What the Loader yields: ``to="torch" | "jax" | None`` (and the deprecated ``to_torch``)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from annbatch import Loader
from annbatch.errors import IncompatibleDatasetsError, InvalidArgumentError, ObsMismatchError

jax = pytest.importorskip("jax")
from jax.experimental import sparse as jax_sparse  # noqa: E402

N_OBS, N_VAR = 37, 9


def _data(sparse: bool):
    rng = np.random.default_rng(0)
    dense = ((rng.random((N_OBS, N_VAR)) < 0.4) * rng.integers(1, 9, (N_OBS, N_VAR))).astype(
        np.float32
    )
    return (sp.csr_matrix(dense) if sparse else dense), dense


def _batches(x, **kwargs):
    loader = Loader(
        batch_size=5, chunk_size=4, preload_nchunks=3, shuffle=True, return_index=True, **kwargs
    )
    return list(loader.add_dataset(x))


def _dense(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return (x.to_dense() if x.layout != torch.strided else x).numpy()
    if isinstance(x, jax_sparse.BCSR):
        return np.asarray(x.todense())
    if sp.issparse(x):
        return x.toarray()
    return np.asarray(x)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csr"])
@pytest.mark.parametrize(
    ("to", "dense_type", "sparse_type"),
    [
        ("torch", torch.Tensor, torch.Tensor),
        ("jax", jax.Array, jax_sparse.BCSR),
        (None, np.ndarray, sp.csr_matrix),
        ("numpy", np.ndarray, sp.csr_matrix),
    ],
)
def test_each_output_kind_yields_its_types_and_the_exact_rows(sparse, to, dense_type, sparse_type):
    x, dense = _data(sparse)
    batches = _batches(x, to=to)
    seen = []
    for batch in batches:
        assert isinstance(batch["X"], sparse_type if sparse else dense_type), type(batch["X"])
        if to == "torch" and sparse:
            assert batch["X"].layout == torch.sparse_csr
        np.testing.assert_array_equal(_dense(batch["X"]), dense[batch["index"]])
        seen.append(batch["index"])
    assert sorted(np.concatenate(seen).tolist()) == list(range(N_OBS))


def test_unset_to_means_torch_when_installed_and_to_torch_is_deprecated():
    assert Loader()._output == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Loader(to="torch")
        Loader(to=None)
    for flag, kind in ((True, "torch"), (False, "numpy")):
        with pytest.warns(DeprecationWarning, match="to_torch is deprecated"):
            assert Loader(to_torch=flag)._output == kind


@pytest.mark.parametrize("to_torch", [True, False])
@pytest.mark.parametrize("to", [None, "torch"])
def test_to_and_to_torch_together_are_an_error(to, to_torch):
    with pytest.raises(ValueError, match="not both"):  # an InvalidArgumentError, no warning first
        Loader(to=to, to_torch=to_torch)


@pytest.mark.parametrize("package", ["torch", "jax"])
def test_a_missing_backend_is_an_import_error_at_construction(monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # import of it now fails
    with pytest.raises(
        ImportError, match=f"to='{package}' needs the optional dependency '{package}'"
    ):
        Loader(to=package)


def test_preload_to_gpu_without_cupy_is_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(
        ImportError, match="preload_to_gpu=True needs the optional dependency 'cupy'"
    ):
        Loader(to=None, preload_to_gpu=True)


def test_the_unset_default_survives_copies_and_pickles():
    import copy
    import pickle

    from annbatch._loader_args import UNSET as _UNSET

    assert copy.deepcopy(_UNSET) is _UNSET
    assert pickle.loads(pickle.dumps(_UNSET)) is _UNSET
    assert Loader(to=copy.deepcopy(_UNSET))._output == "torch"


def test_jax_with_preload_to_gpu_is_refused():
    with pytest.raises(
        InvalidArgumentError, match="to='jax' cannot be combined with preload_to_gpu"
    ):
        Loader(to="jax", preload_to_gpu=True)


# ----------------------------------------------------------------------------------- var
def _var(n: int = N_VAR, tag: str = "g") -> pd.DataFrame:
    return pd.DataFrame(
        {"symbol": [f"S{j}" for j in range(n)]}, index=[f"{tag}{j}" for j in range(n)]
    )


def test_var_is_kept_and_yielded_with_every_batch():
    x, _ = _data(True)
    loader = Loader(batch_size=8, to=None).add_datasets([x, x], var=_var())
    pd.testing.assert_frame_equal(loader.var, _var())
    batches = list(loader)
    assert len(batches) == 10
    assert all(b["var"] is loader.var for b in batches)
    assert list(batches[0]) == ["X", "obs", "var", "index"]
    plain = Loader(batch_size=8, to=None).add_dataset(x)
    assert plain.var is None
    assert next(iter(plain))["var"] is None


def test_var_must_be_equal_and_fit_the_columns():
    x, _ = _data(False)
    loader = Loader(to=None).add_dataset(x, var=_var())
    with pytest.raises(IncompatibleDatasetsError, match="differs from the Loader's var"):
        loader.add_dataset(x, var=_var(tag="h"))
    with pytest.raises(ValueError, match="differs"):
        Loader(to=None).add_datasets([x, x], var=[_var(), _var().assign(symbol="other")])
    with pytest.raises(ObsMismatchError, match="has 3 rows; the dataset has 9 columns"):
        Loader(to=None).add_dataset(x, var=_var(3))
    assert loader.n_obs == N_OBS  # nothing was added by the failed calls


def test_anndata_var_and_collections():
    import anndata as ad

    x, _ = _data(True)
    adatas = [ad.AnnData(X=x, var=_var()), ad.AnnData(X=x, var=_var())]
    loader = Loader(to=None).add_adatas(adatas)
    pd.testing.assert_frame_equal(loader.var, _var())
    with pytest.raises(IncompatibleDatasetsError):
        Loader(to=None).add_adatas([adatas[0], ad.AnnData(X=x, var=_var(tag="h"))])


def test_use_collection_gives_no_var_unless_asked(tmp_path):
    import anndata as ad

    from annbatch import DatasetCollection, load_x_and_obs

    x, _ = _data(True)
    collection = DatasetCollection(tmp_path / "c.zarr").add_adatas(
        [ad.AnnData(X=x, var=_var())], dataset_size=10, progress=False
    )
    assert Loader(batch_size=8, to=None).use_collection(collection).var is None

    def with_var(group):
        adata = load_x_and_obs(group)
        return ad.AnnData(X=adata.X, obs=adata.obs, var=ad.io.read_elem(group["var"]))

    assert Loader(to=None).use_collection(collection, load_adata=with_var).var is None
    loader = Loader(batch_size=8, to=None).add_adatas([with_var(g) for g in collection])
    assert list(loader.var.index) == list(collection.var_names)
    assert next(iter(loader))["var"] is loader.var


def test_add_anndata_keeps_its_documented_behaviour_without_var():
    import anndata as ad

    x, _ = _data(True)
    loader = Loader(to=None).add_anndatas(
        [ad.AnnData(X=x, var=_var()), ad.AnnData(X=x, var=_var(tag="h"))]
    )
    assert loader.var is None
