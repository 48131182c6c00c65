"""Collection builds: idempotent, appends explicit and checked, obs types kept, legacy inputs,
CLI manners. (Crash safety at every write step: ``test_build_crash.py``.)"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from tests._adata_files import write_adata
from tests._legacy import write_legacy_h5ad

from annbatch import DatasetCollection, Loader, load_x_and_obs
from annbatch._cli import main as cli
from annbatch.collection import SOURCE_COLUMN
from annbatch.errors import (
    CollectionCompleteError,
    DuplicateInputError,
    IncompatibleDatasetsError,
)

GENES = [f"g{j}" for j in range(12)]


def _adata(
    i: int, n_obs: int, obs: dict | None = None, *, sparse: bool = True, dtype: str = "float32"
) -> ad.AnnData:
    rng = np.random.default_rng(i)
    dense = (rng.random((n_obs, len(GENES))) < 0.4) * rng.integers(1, 30, (n_obs, len(GENES)))
    x = sp.csr_matrix(dense.astype(dtype)) if sparse else dense.astype(dtype)
    frame = pd.DataFrame(obs or {}, index=[f"in{i}_cell{k}" for k in range(n_obs)])
    return ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=GENES))


_write = write_adata


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(folder)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _obs(collection: DatasetCollection) -> pd.DataFrame:
    return pd.concat([load_x_and_obs(g).obs for g in collection]).sort_index()


def _rows(collection: DatasetCollection) -> pd.DataFrame:
    frames = []
    for group in collection:
        adata = load_x_and_obs(group)
        x = adata.X[:] if not isinstance(adata.X, zarr.Array) else adata.X[...]
        x = x.toarray() if sp.issparse(x) else np.asarray(x)
        frames.append(pd.DataFrame(x, index=adata.obs_names, columns=collection.var_names))
    return pd.concat(frames).sort_index()


def _expected(adatas: list[ad.AnnData]) -> pd.DataFrame:
    frames = []
    for a in adatas:
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        frames.append(pd.DataFrame(x, index=a.obs_names, columns=a.var_names))
    return pd.concat(frames).sort_index()


# ------------------------------------------------------------------------------ idempotent
def test_the_same_call_on_a_finished_collection_writes_nothing(tmp_path):
    paths = [_write(_adata(i, 30), tmp_path / f"in{i}.h5ad") for i in range(2)]
    out = tmp_path / "out.zarr"
    collection = DatasetCollection(out).add_adatas(paths, rng=1, progress=False)
    before = _tree_digest(out)
    for _ in range(2):
        with pytest.warns(
            UserWarning, match="holds these inputs, added with these options; nothing was written"
        ):
            DatasetCollection(out).add_adatas(paths, rng=1, progress=False)
    assert _tree_digest(out) == before
    assert collection.n_obs == 60
    # Other options on the same inputs: an error, nothing written.
    with pytest.raises(CollectionCompleteError, match="other calls or with other options"):
        DatasetCollection(out).add_adatas(paths, progress=False, compression="zstd")
    # New inputs without append=True: an error, nothing written.
    extra = _write(_adata(2, 10), tmp_path / "in2.h5ad")
    with pytest.raises(CollectionCompleteError, match="append=True"):
        DatasetCollection(out).add_adatas([extra], progress=False)
    assert _tree_digest(out) == before


@pytest.mark.parametrize("h5ad_collection", [False, True], ids=["zarr", "h5ad"])
def test_a_rerun_with_other_options_is_refused_in_either_format(tmp_path, h5ad_collection):
    """One comparison of options for both formats: a repeat of the call writes nothing, the
    same inputs with other options are refused (an h5ad collection once ignored the options)."""
    paths = [_write(_adata(i, 30), tmp_path / f"in{i}.h5ad") for i in range(2)]
    out = tmp_path / ("out" if h5ad_collection else "out.zarr")
    options = {"rng": 1, "dataset_size": 40, "progress": False}
    DatasetCollection(out, is_collection_h5ad=h5ad_collection).add_adatas(paths, **options)
    before = _tree_digest(out)
    with pytest.warns(UserWarning, match="nothing was written"):
        DatasetCollection(out).add_adatas(paths, **options)
    for other in ({"dataset_size": 20}, {"compression": "zstd"}, {"shuffle": False}):
        with pytest.raises(CollectionCompleteError, match="other calls or with other options"):
            DatasetCollection(out).add_adatas(paths, **{**options, **other})
    assert _tree_digest(out) == before


def test_append_adds_new_inputs_once(tmp_path):
    adatas = [_adata(i, 25) for i in range(3)]
    paths = [_write(a, tmp_path / f"in{i}.h5ad") for i, a in enumerate(adatas)]
    out = tmp_path / "out.zarr"
    collection = DatasetCollection(out).add_adatas(paths[:2], progress=False)
    collection.add_adatas(paths[2:], append=True, progress=False)
    assert collection.n_obs == 75
    pd.testing.assert_frame_equal(_rows(collection), _expected(adatas), check_dtype=False)
    after = _tree_digest(out)
    # The same append again: nothing to do.
    with pytest.warns(UserWarning, match="nothing was written"):
        collection.add_adatas(paths[2:], append=True, progress=False)
    # An input already in, or a copy of one under another name.
    copy = tmp_path / "copy_of_in0.h5ad"
    copy.write_bytes(Path(paths[0]).read_bytes())
    for inputs in (
        paths[:1],
        [str(copy)],
        [paths[0], _write(_adata(7, 5), tmp_path / "n.h5ad")],
    ):
        with pytest.raises(DuplicateInputError, match="already holds the data"):
            collection.add_adatas(inputs, append=True, progress=False)
    assert _tree_digest(out) == after
    # The same data under one name twice in a call.
    with pytest.raises(DuplicateInputError, match="same data as"):
        DatasetCollection(tmp_path / "twice.zarr").add_adatas([paths[0], str(copy)], progress=False)
    assert not (tmp_path / "twice.zarr").exists()
    # Forced: the rows are there twice.
    collection.add_adatas(paths[2:], append=True, force=True, progress=False)
    assert collection.n_obs == 100


def test_in_memory_anndata_is_recognised_again(tmp_path):
    adatas = [_adata(i, 20) for i in range(2)]
    out = tmp_path / "out.zarr"
    DatasetCollection(out).add_adatas(adatas, progress=False)
    with pytest.warns(UserWarning, match="nothing was written"):
        DatasetCollection(out).add_adatas([a.copy() for a in adatas], progress=False)
    with pytest.raises(DuplicateInputError):
        DatasetCollection(out).add_adatas(adatas[:1], append=True, progress=False)


# -------------------------------------------------------------------------- appends checked
@pytest.mark.parametrize(
    ("new", "match"),
    [
        (lambda: _adata(5, 10, dtype="float64"), "dtype float64 .* holds float32"),
        (lambda: _adata(5, 10, sparse=False), "X is dense .* holds sparse CSR"),
        (
            lambda: _adata(5, 10, {"label": np.arange(10)}),
            "'label' is .* in the collection .* int64",
        ),
    ],
    ids=["dtype", "dense-into-sparse", "obs-type"],
)
def test_appends_that_do_not_fit_fail_before_anything_is_written(tmp_path, new, match):
    base = _adata(0, 30, {"label": pd.Categorical(["a", "b", "c"] * 10)})
    out = tmp_path / "out.zarr"
    collection = DatasetCollection(out).add_adatas(
        [_write(base, tmp_path / "base.h5ad")], progress=False
    )
    before = _tree_digest(out)
    with pytest.raises(IncompatibleDatasetsError, match=match):
        collection.add_adatas([_write(new(), tmp_path / "new.h5ad")], append=True, progress=False)
    assert _tree_digest(out) == before
    assert collection.is_complete
    next(iter(Loader(batch_size=8, chunk_size=4, preload_nchunks=2).use_collection(collection)))


def test_append_fills_columns_the_new_inputs_lack(tmp_path):
    base = _adata(0, 20, {"flag": np.arange(20) % 2 == 0, "n": np.arange(20, dtype=np.int32)})
    out = tmp_path / "out.zarr"
    collection = DatasetCollection(out).add_adatas([base], progress=False)
    collection.add_adatas(
        [_adata(1, 10, {"n": np.arange(10, dtype=np.int32)})], append=True, progress=False
    )
    obs = _obs(collection)
    new = obs[obs[SOURCE_COLUMN] == "AnnData 0"]  # the appended input was the first of its call
    assert len(new) == 30  # both builds name their first in-memory input "AnnData 0"
    appended = obs.loc[[f"in1_cell{k}" for k in range(10)]]
    assert appended["flag"].isna().all()
    assert str(appended["flag"].dtype) == "boolean"
    assert (appended["n"].to_numpy() == np.arange(10)).all()


# ---------------------------------------------------------------------------- obs types kept
COLUMNS = {
    "bool": lambda n: np.arange(n) % 3 == 0,
    "int": lambda n: np.arange(n, dtype=np.int32) - 5,
    "float": lambda n: np.linspace(-1, 1, n),
    "str": lambda n: np.array([f"s{k}" for k in range(n)], dtype=object),
    "categorical": lambda n: pd.Categorical(np.array(["x", "y", "z"])[np.arange(n) % 3]),
    "nullable-int": lambda n: pd.array(
        [None if k % 4 == 0 else k for k in range(n)], dtype="Int16"
    ),
    "nullable-bool": lambda n: pd.array(
        [None if k % 4 == 0 else k % 2 == 0 for k in range(n)], dtype="boolean"
    ),
    "nullable-str": lambda n: pd.array(
        [None if k % 4 == 0 else f"t{k}" for k in range(n)], dtype="string"
    ),
    "datetime": lambda n: pd.date_range("2024-02-29 12:00:00.123456789", periods=n, freq="37min"),
    "datetime-tz": lambda n: pd.date_range("2024-03-31", periods=n, freq="1h", tz="Europe/Berlin"),
}
EXPECTED_WHERE_MISSING = {
    "bool": "boolean",
    "int": "Int32",
    "float": "float64",
    "str": "string",
    "categorical": "category",
    "nullable-int": "Int16",
    "nullable-bool": "boolean",
    "nullable-str": "string",
    "datetime": "datetime64[ns]",
    "datetime-tz": "datetime64[ns, Europe/Berlin]",
}


@pytest.mark.parametrize("in_all", [True, False], ids=["in-all-inputs", "in-some"])
@pytest.mark.parametrize("kind", sorted(COLUMNS))
def test_obs_columns_keep_their_type(tmp_path, kind, in_all):
    make = COLUMNS[kind]
    adatas = [
        _adata(0, 13, {"c": make(13)}),
        _adata(1, 8, {"c": make(8)} if in_all else {}),
    ]
    # datetimes cannot be written by anndata: those inputs stay in memory
    inputs = (
        adatas
        if kind.startswith("datetime")
        else [_write(a, tmp_path / f"in{i}.h5ad") for i, a in enumerate(adatas)]
    )
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(inputs, progress=False)
    # What the inputs hold as anndata reads them (anndata writes str columns as categoricals).
    read = [a.obs if isinstance(a, ad.AnnData) else ad.read_h5ad(a).obs for a in inputs]
    column = _obs(collection)["c"]
    if in_all:
        expected = pd.concat([_values(r["c"]) for r in read]).sort_index()
        dtypes = {str(r["c"].dtype) for r in read}
        assert str(column.dtype) == ("category" if "category" in dtypes else dtypes.pop())
        pd.testing.assert_series_equal(_values(column), expected, check_names=False)
    else:
        first = read[0]["c"]
        assert str(column.dtype) == (
            "category" if str(first.dtype) == "category" else EXPECTED_WHERE_MISSING[kind]
        )
        assert column.loc[adatas[1].obs_names].isna().all()
        present = column.loc[adatas[0].obs_names]
        pd.testing.assert_series_equal(_values(present), _values(first), check_names=False)


def _values(column: pd.Series) -> pd.Series:
    """Values as objects, every NA as None (pandas' versions differ in which NA they give)."""
    values = column.astype(object)
    return values.where(column.notna().to_numpy(), None)


def test_types_merge_across_inputs(tmp_path):
    adatas = [
        _adata(
            0,
            6,
            {
                "num": np.arange(6, dtype=np.int8),
                "cat": pd.Categorical(list("aabbcc")),
                "strcat": pd.Categorical(list("pqpqpq")),
            },
        ),
        _adata(
            1,
            4,
            {
                "num": np.array([0.5, 1.5, 2.5, 3.5]),
                "cat": pd.Categorical(list("ddcc")),
                "strcat": np.array(["u", "v", "w", "x"], dtype=object),
            },
        ),
    ]
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(adatas, progress=False)
    obs = _obs(collection)
    assert obs["num"].dtype == np.float64
    assert list(obs["cat"].cat.categories) == ["a", "b", "c", "d"]
    assert list(obs["strcat"].cat.categories) == ["p", "q", "u", "v", "w", "x"]
    assert obs.loc["in1_cell1", "num"] == 1.5
    assert obs.loc["in1_cell0", "strcat"] == "u"


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.arange(5), np.array(list("abcde"), dtype=object), "'c' is int64 in .*in0.h5ad but"),
        (np.arange(5) % 2 == 0, np.arange(5), "'c' is bool in"),
        (
            pd.Categorical(list("abcde"), ordered=True),
            pd.Categorical(list("abcdf"), ordered=True),
            "ordered categorical",
        ),
    ],
    ids=["int-str", "bool-int", "ordered-categories"],
)
def test_conflicting_obs_types_fail_before_anything_is_written(tmp_path, a, b, match):
    paths = [_write(_adata(i, 5, {"c": v}), tmp_path / f"in{i}.h5ad") for i, v in enumerate((a, b))]
    out = tmp_path / "out.zarr"
    with pytest.raises(IncompatibleDatasetsError, match=match):
        DatasetCollection(out).add_adatas(paths, progress=False)
    assert not out.exists()


# ----------------------------------------------------------------------------- legacy inputs
def _legacy(tmp_path: Path, i: int, *, sparse: bool) -> tuple[str, ad.AnnData]:
    adata = _adata(
        i,
        17,
        {
            "kind": pd.Categorical(
                np.array(["B", "T", "NK"])[np.arange(17) % 3], categories=["T", "B", "NK"]
            ),
            "count": np.arange(17, dtype=np.int64),
            "score": np.linspace(0, 1, 17).astype(np.float32),
            "name": [f"n{k}" for k in range(17)],
        },
        sparse=sparse,
    )
    path = tmp_path / f"legacy{i}.h5ad"
    write_legacy_h5ad(path, adata.X, adata.obs, list(adata.var_names))
    with h5py.File(path) as f:
        assert "encoding-type" not in f["obs"].attrs  # really the old layout
    return str(path), adata


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
def test_legacy_anndata_files(tmp_path, sparse):
    path, adata = _legacy(tmp_path, 0, sparse=sparse)
    with h5py.File(path) as f:
        opened = load_x_and_obs(f)
        assert list(opened.obs["kind"].cat.categories) == ["T", "B", "NK"]
        pd.testing.assert_frame_equal(
            opened.obs.rename_axis(None), adata.obs, check_index_type=False
        )
        batches = list(
            Loader(
                batch_size=5,
                chunk_size=4,
                preload_nchunks=2,
                shuffle=True,
                return_index=True,
                to=None,
            ).add_anndata(opened)
        )
    x = adata.X.toarray() if sparse else adata.X
    for batch in batches:
        got = batch["X"].toarray() if sp.issparse(batch["X"]) else np.asarray(batch["X"])
        np.testing.assert_array_equal(got, x[batch["index"]])
    assert sorted(np.concatenate([b["index"] for b in batches])) == list(range(17))
    other = _adata(1, 9, {"kind": pd.Categorical(["T"] * 9)}, sparse=sparse)
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas([path, other], progress=False)
    pd.testing.assert_frame_equal(_rows(collection), _expected([adata, other]), check_dtype=False)
    obs = _obs(collection)
    assert obs.loc[adata.obs_names, "kind"].tolist() == adata.obs["kind"].tolist()
    assert str(obs["count"].dtype) == "Int64"  # missing from the second input


# scanpy's bundled files, and anndata 0.7's: tests/test_legacy.py (never skipped in CI).


# ------------------------------------------------------------------------------ CLI manners
def test_cli_version_missing_path_and_append(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("annbatch ")
    assert cli(["info", str(tmp_path / "nowhere.zarr")]) == 1
    assert "does not exist" in capsys.readouterr().err
    paths = [_write(_adata(i, 20), tmp_path / f"in{i}.h5ad") for i in range(2)]
    out = str(tmp_path / "out.zarr")
    assert cli(["build", out, paths[0], "--quiet"]) == 0
    capsys.readouterr()
    assert cli(["build", out, paths[0], "--quiet"]) == 0
    assert "nothing was written" in capsys.readouterr().err
    assert cli(["build", out, paths[1], "--quiet"]) == 1
    assert "--append" in capsys.readouterr().err
    assert cli(["build", out, paths[1], "--quiet", "--append"]) == 0
    assert "40 rows" in capsys.readouterr().out


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130_then_resumes(tmp_path):
    rng = np.random.default_rng(0)
    n_obs, n_var = 20_000, 500
    x = sp.random(n_obs, n_var, density=0.02, format="csr", dtype=np.float32, random_state=rng)
    path = _write(ad.AnnData(X=x), tmp_path / "big.h5ad")
    out = tmp_path / "out.zarr"
    arguments = ["build", str(out), path, "--dataset-size", "2000", "--quiet"]
    # The real command line, slowed at each write step so that the signal lands mid-build;
    # Ctrl-C restored, for a test run whose SIGINT is ignored (a background job) passes that on.
    slowed = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "import sys, time; from annbatch.collection import _build; "
        "_build.crash_hook = lambda step: time.sleep(0.1); "
        "from annbatch._cli import main; sys.exit(main(sys.argv[1:]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", slowed, *arguments],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    deadline = time.monotonic() + 60
    while not (out / "_annbatch_build").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.strip().splitlines() == [
        "annbatch build: interrupted; run the same command again to resume"
    ]
    assert not DatasetCollection(out).is_complete
    command = [sys.executable, "-m", "annbatch", *arguments]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "20,000 rows" in done.stdout


# -------------------------------------------------------------- edge cases found in review
def test_obs_edge_values_round_trip(tmp_path):
    n = 8
    adatas = [
        _adata(
            0,
            n,
            {
                "short": np.array(["", "ab"] * 4, dtype=object),  # bytes == rows: not a hint
                "unicode": np.array(["é", "日本", "", "x"] * 2, dtype=object),
                "all_na_cat": pd.Categorical([None] * n, categories=["a"]).remove_categories("a"),
                "int_cat": pd.Categorical(np.array([1, 2] * 4, dtype=np.int8)),
                "obj_bool": np.array([True, None, False, True] * 2, dtype=object),
            },
        ),
        _adata(1, 5, {"int_cat": pd.Categorical(np.array([1000, 1, 1000, 7, 1], dtype=np.int64))}),
        _adata(2, 0),  # no rows at all
    ]
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas(adatas, progress=False)
    obs = _obs(collection)
    first = obs.loc[adatas[0].obs_names]
    assert first["short"].tolist() == ["", "ab"] * 4
    assert first["unicode"].tolist() == ["é", "日本", "", "x"] * 2
    assert obs["all_na_cat"].isna().all()
    assert sorted(obs["int_cat"].cat.categories) == [1, 2, 7, 1000]
    assert obs.loc[adatas[1].obs_names, "int_cat"].tolist() == [1000, 1, 1000, 7, 1]
    assert str(obs["obj_bool"].dtype) == "boolean"
    assert first["obj_bool"].isna().tolist() == [False, True, False, False] * 2
    with pytest.raises(IncompatibleDatasetsError, match="no one integer type"):
        DatasetCollection(tmp_path / "u.zarr").add_adatas(
            [
                _adata(0, 3, {"c": np.array([1, 2, 3], dtype=np.uint64)}),
                _adata(1, 3, {"c": np.array([-1, 2, 3], dtype=np.int64)}),
            ],
            progress=False,
        )


def test_resume_with_paths_spelled_otherwise(tmp_path, monkeypatch):
    from annbatch.collection import _build

    monkeypatch.chdir(tmp_path)
    paths = [_write(_adata(i, 40), tmp_path / f"in{i}.h5ad") for i in range(2)]
    options = {"dataset_size": 20, "rng": 2, "progress": False}
    reference = DatasetCollection(tmp_path / "ref.zarr").add_adatas(paths, **options)

    def interrupt(step: str) -> None:
        if step.startswith("manifest: recorded dataset_000001"):
            raise KeyboardInterrupt

    monkeypatch.setattr(_build, "crash_hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        DatasetCollection(tmp_path / "out.zarr").add_adatas(paths, **options)
    monkeypatch.setattr(_build, "crash_hook", None)
    DatasetCollection("out.zarr").add_adatas([f"in{i}.h5ad" for i in range(2)], **options)
    assert set(_obs(DatasetCollection("out.zarr"))[SOURCE_COLUMN]) == set(paths)
    assert _tree_digest(tmp_path / "out.zarr") == _tree_digest(tmp_path / "ref.zarr")
    assert reference.is_complete


def test_a_failed_append_leaves_the_collection_as_it_was(tmp_path, monkeypatch):
    from annbatch.collection import _build

    out = tmp_path / "out.zarr"
    collection = DatasetCollection(out).add_adatas([_adata(0, 30)], progress=False)
    before = _tree_digest(out)

    def fail(step: str) -> None:
        if step.startswith("write obs and var"):
            raise OSError("disk full")

    monkeypatch.setattr(_build, "crash_hook", fail)
    with pytest.raises(OSError, match="disk full"):
        collection.add_adatas([_adata(1, 30)], append=True, progress=False)
    monkeypatch.setattr(_build, "crash_hook", None)
    assert collection.is_complete
    assert _tree_digest(out) == before
    collection.add_adatas([_adata(1, 30)], append=True, progress=False)
    assert collection.n_obs == 60


def test_append_sharing_no_gene_is_refused(tmp_path):
    out = tmp_path / "out.zarr"
    collection = DatasetCollection(out).add_adatas([_adata(0, 10)], progress=False)
    other = _adata(1, 5)
    other.var_names = [f"other{j}" for j in range(other.n_vars)]
    with pytest.raises(IncompatibleDatasetsError, match="shares no gene"):
        collection.add_adatas([other], append=True, progress=False)


def test_repeating_an_append_writes_nothing(tmp_path):
    out = tmp_path / "out.zarr"
    collection = DatasetCollection(out).add_adatas([_adata(0, 10)], progress=False)
    collection.add_adatas([_adata(1, 10)], append=True, progress=False)
    before = _tree_digest(out)
    with pytest.warns(UserWarning, match="nothing was written"):
        collection.add_adatas([_adata(1, 10)], append=True, progress=False)
    with pytest.raises(CollectionCompleteError, match="other calls or with other options"):
        DatasetCollection(out).add_adatas([_adata(0, 10), _adata(1, 10)], progress=False)
    # On the object that built it, a later call appends (the reference's API): held inputs
    # are refused all the same.
    with pytest.raises(DuplicateInputError, match="already holds the data of 2 of these inputs"):
        collection.add_adatas([_adata(0, 10), _adata(1, 10)], progress=False)
    assert _tree_digest(out) == before


def test_anndata_07_dataframes_keep_their_categories(tmp_path):
    """anndata 0.7 kept categories apart (``obs/__categories``), referenced from the codes."""
    path = tmp_path / "v07.h5ad"
    text = h5py.special_dtype(vlen=str)
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=np.arange(8, dtype=np.float32).reshape(4, 2))
        for name, index in (("obs", ["c0", "c1", "c2", "c3"]), ("var", ["g1", "g2"])):
            group = f.create_group(name)
            group.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.1.0"})
            group.attrs["_index"] = "_index"
            columns = ["cell_type"] if name == "obs" else []
            group.attrs["column-order"] = np.array(columns, dtype=text)
            group.create_dataset("_index", data=np.array(index, dtype=object), dtype=text)
        categories = f["obs"].create_group("__categories")
        names = categories.create_dataset(
            "cell_type", data=np.array(["B", "T"], dtype=object), dtype=text
        )
        f["obs"].create_dataset("cell_type", data=np.array([0, 1, 1, 0], np.int8))
        f["obs"]["cell_type"].attrs["categories"] = names.ref
    with h5py.File(path) as f:
        assert load_x_and_obs(f).obs["cell_type"].tolist() == ["B", "T", "T", "B"]
    collection = DatasetCollection(tmp_path / "out.zarr").add_adatas([str(path)], progress=False)
    obs = _obs(collection)
    assert obs["cell_type"].dtype == "category"
    assert obs["cell_type"].tolist() == ["B", "T", "T", "B"]


def test_a_resumed_build_counts_what_is_written(tmp_path, monkeypatch, capsys):
    from annbatch.collection import _build

    inputs = [_adata(i, 40) for i in range(2)]

    def interrupt(step: str) -> None:
        if step == "manifest: recorded dataset_000002":
            raise KeyboardInterrupt

    monkeypatch.setattr(_build, "crash_hook", interrupt)
    with pytest.raises(KeyboardInterrupt):
        DatasetCollection(tmp_path / "out.zarr").add_adatas(inputs, dataset_size=20)
    monkeypatch.setattr(_build, "crash_hook", None)
    capsys.readouterr()
    DatasetCollection(tmp_path / "out.zarr").add_adatas(inputs, dataset_size=20)
    err = capsys.readouterr().err
    assert "distributing rows" not in err  # pass 1 was finished
    first = err[err.index("writing datasets") :].split("\r")[0]
    assert "40.0/80.0" in first, err  # its first display: the 40 rows written before
