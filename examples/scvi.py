"""Train scVI from an annbatch collection through scvi-tools' own integration.

scvi-tools (1.5 and later) builds a :class:`annbatch.DatasetCollection` from h5ad files with
``SCVI.setup_annbatch(paths=...)`` and streams it through an :class:`annbatch.Loader` wrapped
in its ``AnnbatchDataModule``. This script runs that path on this package:

1. writes synthetic counts as a few h5ad files (one per batch, rows sorted by cell type), with
   a categorical and a continuous covariate and the counts also in a layer;
2. ``SCVI.setup_annbatch(paths, batch_key=, labels_key=, layer=, covariates...)`` builds the
   collection (X read lazily, as dask arrays, by scvi-tools' ``load_adata``, under the zarrs
   codec pipeline that scvi-tools sets);
3. trains ``SCVI(registry=dm.registry)`` with ``train_size=0.8`` (its train and validation
   loaders are copies of the Loader with masked samplers), then computes the latent
   representation and the ELBO, saves the model and loads it back;
4. with ``--compare``, trains the same model on the same data through scvi-tools' in-memory
   ``setup_anndata`` path, and prints both side by side.

scvi-tools needs Python >= 3.12. Set up an environment for it (our CI does the same; torch is
pinned to the build our machines carry, any torch >= 2.4 works)::

    python3.12 -m venv .venv312            # e.g. $(pyenv root)/versions/3.12.*/bin/python3.12
    .venv312/bin/pip install torch==2.13.0
    .venv312/bin/pip install "scvi-tools>=1.5,<1.6" -e ".[zarrs]"
    .venv312/bin/python examples/scvi.py --epochs 1

Installing this package after scvi-tools (or with it) keeps it: its version (0.4.0.dev0)
satisfies scvi-tools' ``annbatch[zarrs]>=0.2``.

Usage: python examples/scvi.py [--dir DIR] [--cells N] [--genes N] [--epochs N] [--compare]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

# This file is named like the package it drives: Python puts its folder first on sys.path, so
# `import scvi` would import this file. Take the folder off before importing scvi-tools.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

CELL_TYPES = ["B cell", "T cell", "NK cell", "monocyte", "platelet"]
BATCH_SIZE, CHUNK_SIZE, PRELOAD_NCHUNKS = 256, 64, 16  # 64 * 16 rows per window, 4 batches
SETUP: dict[str, Any] = {
    "batch_key": "batch",
    "labels_key": "cell_type",
    "layer": "counts",
    "categorical_covariate_keys": ["protocol"],
    "continuous_covariate_keys": ["percent_mito"],
}


def write_inputs(out: Path, n_cells: int, n_genes: int, n_files: int, seed: int) -> list[str]:
    """``n_files`` h5ad files of negative-binomial-like counts: a gene program per cell type,
    an effect per batch; rows sorted by cell type (as many published files are)."""
    rng = np.random.default_rng(seed)
    programs = rng.gamma(0.3, 2.0, (len(CELL_TYPES), n_genes))
    genes = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    paths = []
    for b in range(n_files):
        n = n_cells // n_files
        labels = np.sort(rng.integers(0, len(CELL_TYPES), n))
        rate = programs[labels] * rng.lognormal(0.0, 0.3, n_genes) * rng.lognormal(0, 0.4, (n, 1))
        counts = sp.csr_matrix(rng.poisson(rng.gamma(2.0, rate / 2.0)).astype(np.float32))
        obs = pd.DataFrame(
            {
                "batch": f"batch_{b}",
                "cell_type": pd.Categorical.from_codes(labels, CELL_TYPES),
                "protocol": pd.Categorical(rng.choice(["v2", "v3"], n)),
                "percent_mito": rng.uniform(0.0, 10.0, n),
            },
            index=[f"batch{b}_cell{i}" for i in range(n)],
        )
        adata = ad.AnnData(X=counts, obs=obs, var=genes, layers={"counts": counts.copy()})
        path = out / f"batch_{b}.h5ad"
        adata.write_h5ad(path)
        paths.append(str(path))
    return paths


class EpochTimer:
    """Wall time of each training epoch (its validation included), as a Lightning callback."""

    def __new__(cls) -> Any:
        from lightning.pytorch.callbacks import Callback

        class _Timer(Callback):
            def __init__(self) -> None:
                self.seconds: list[float] = []
                self._start = 0.0

            def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
                self._start = time.perf_counter()

            def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
                self.seconds.append(time.perf_counter() - self._start)

        return _Timer()


def _last(model: Any, key: str) -> float:
    frame = model.history.get(key)
    return float("nan") if frame is None or len(frame) == 0 else float(frame.iloc[-1, 0])


def train_annbatch(paths: list[str], out: Path, epochs: int) -> dict[str, Any]:
    """scVI through ``setup_annbatch``: collection, training, latent, ELBO, save and load."""
    import scvi

    dm = scvi.model.SCVI.setup_annbatch(
        collection_path=str(out / "collection.zarr"),
        paths=paths,
        batch_size=BATCH_SIZE,
        chunk_size=CHUNK_SIZE,
        preload_nchunks=PRELOAD_NCHUNKS,
        preload_to_gpu=False,
        # Rows mixed across the files: scvi-tools validates on the collection's first rows,
        # which without it would be the first file's (one batch, never trained on).
        shuffle=True,
        **SETUP,
    )
    model = scvi.model.SCVI(registry=dm.registry)
    timer = EpochTimer()
    model.train(
        max_epochs=epochs,
        datamodule=dm,
        train_size=0.8,
        check_val_every_n_epoch=1,
        callbacks=[timer],
        accelerator="cpu",
        enable_progress_bar=False,
    )
    latent = model.get_latent_representation(dataloader=dm)
    if latent.shape != (dm.n_obs, model.module.n_latent) or not np.isfinite(latent).all():
        msg = f"latent representation of shape {latent.shape}, expected ({dm.n_obs}, n_latent)"
        raise RuntimeError(msg)
    elbo = float(model.get_elbo(dataloader=dm))
    model.save(str(out / "model"), overwrite=True, datamodule=dm)
    # Loaded from the registry saved with it: scvi-tools 1.5.1's `load(..., datamodule=dm)`
    # hands the datamodule on to the module's constructor, which refuses it (not ours to fix).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no saved anndata": there is none, by design
        loaded = scvi.model.SCVI.load(str(out / "model"))
    again = loaded.get_latent_representation(dataloader=dm)
    if not np.allclose(again, latent, atol=1e-5):
        msg = "the saved and loaded model gives another latent representation"
        raise RuntimeError(msg)
    return {
        "path": "setup_annbatch (this package)",
        "cells": dm.n_obs,
        "elbo_train": _last(model, "elbo_train"),
        "elbo_validation": _last(model, "elbo_validation"),
        "elbo_all": elbo,
        "seconds": timer.seconds,
    }


def train_in_memory(paths: list[str], epochs: int) -> dict[str, Any]:
    """scVI through scvi-tools' in-memory ``setup_anndata`` path, on the same files."""
    import scvi

    adata = ad.concat([ad.read_h5ad(p) for p in paths])
    scvi.model.SCVI.setup_anndata(adata, **SETUP)
    model = scvi.model.SCVI(adata)
    timer = EpochTimer()
    model.train(
        max_epochs=epochs,
        train_size=0.8,
        batch_size=BATCH_SIZE,
        check_val_every_n_epoch=1,
        callbacks=[timer],
        accelerator="cpu",
        enable_progress_bar=False,
    )
    return {
        "path": "setup_anndata (in memory)",
        "cells": adata.n_obs,
        "elbo_train": _last(model, "elbo_train"),
        "elbo_validation": _last(model, "elbo_validation"),
        "elbo_all": float(model.get_elbo()),
        "seconds": timer.seconds,
    }


def table(rows: list[dict[str, Any]], epochs: int, n_genes: int) -> str:
    """The runs as a markdown table."""
    lines = [
        "| model | data path | cells x genes | epochs | -ELBO train (last epoch) "
        "| -ELBO validation (last epoch) | ELBO, all cells (get_elbo) | s/epoch (median) "
        "| s/epoch (first) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| SCVI | {r['path']} | {r['cells']} x {n_genes} | {epochs} | {r['elbo_train']:.1f} "
            f"| {r['elbo_validation']:.1f} | {r['elbo_all']:.1f} "
            f"| {np.median(r['seconds']):.2f} | {r['seconds'][0]:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--cells", type=int, default=4000, help="cells in all")
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--files", type=int, default=4, help="input files (batches)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare", action="store_true", help="also train through setup_anndata (in memory)"
    )
    args = parser.parse_args()

    import scvi

    scvi.settings.seed = args.seed
    warnings.filterwarnings("ignore", module="lightning")  # its notes on workers and logging
    out = args.dir or Path(tempfile.mkdtemp(prefix="annbatch-scvi-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        paths = write_inputs(out, args.cells, args.genes, args.files, args.seed)
        rows = [train_annbatch(paths, out, args.epochs)]
        if args.compare:
            rows.append(train_in_memory(paths, args.epochs))
        print(table(rows, args.epochs, args.genes))
    finally:
        if args.dir is None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
