"""The main job: build a collection from several AnnData files, then train a cell-type classifier
streaming from it.

1. Writes synthetic count data as several input files, one per donor, each sorted by cell type
   (as atlases are) and each measuring a different subset of genes.
2. Builds a DatasetCollection from them (rows shuffled across files, genes outer-joined).
3. Trains a linear classifier on log1p counts with torch, streaming shuffled batches from the
   collection through annbatch.Loader, and reports rows/s and held-out accuracy.

Usage: python examples/train_classifier.py [--dir DIR] [--cells-per-donor N] [--epochs N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

import annbatch

CELL_TYPES = ["B cell", "T cell", "NK cell", "monocyte", "dendritic cell", "platelet"]


def make_donor(
    donor: int, n_cells: int, genes: list[str], programs: np.ndarray, rng: np.random.Generator
) -> ad.AnnData:
    """Counts of one donor: per cell type a gene program, per donor a batch effect, sequencing
    depth varying per cell; rows sorted by cell type, as in many published files."""
    labels = np.sort(rng.integers(0, len(CELL_TYPES), n_cells))
    donor_effect = rng.lognormal(0.0, 0.5, programs.shape[1])
    depth = rng.lognormal(0.0, 0.6, n_cells)[:, None]
    rate = programs[labels] * donor_effect * depth
    counts = rng.poisson(rate).astype(np.float32)
    keep = np.flatnonzero(np.isin(np.arange(len(genes)), _measured(donor, len(genes), rng)))
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical.from_codes(labels, CELL_TYPES), "donor": f"donor_{donor}"},
        index=[f"donor{donor}_cell{i}" for i in range(n_cells)],
    )
    return ad.AnnData(
        X=sp.csr_matrix(counts[:, keep]), obs=obs, var=pd.DataFrame(index=[genes[j] for j in keep])
    )


def _measured(donor: int, n_genes: int, rng: np.random.Generator) -> np.ndarray:
    """Each donor's panel misses a random 10% of the genes."""
    return np.sort(rng.choice(n_genes, int(n_genes * 0.9), replace=False))


def write_inputs(
    out: Path, n_donors: int, cells_per_donor: int, n_genes: int, seed: int
) -> list[Path]:
    rng = np.random.default_rng(seed)
    genes = [f"GENE{j:05d}" for j in range(n_genes)]
    base = rng.lognormal(-1.5, 1.0, n_genes)
    # Each cell type raises 3% of the genes 1.5 to 3-fold: a real signal, not a trivial one.
    programs = np.stack(
        [
            base * np.where(rng.random(n_genes) < 0.03, rng.uniform(1.5, 3.0, n_genes), 1.0)
            for _ in CELL_TYPES
        ]
    )
    paths = []
    for donor in range(n_donors):
        adata = make_donor(donor, cells_per_donor, genes, programs, rng)
        path = out / f"donor_{donor}.h5ad"
        adata.write_h5ad(path)
        paths.append(path)
    return paths


def held_out(index: torch.Tensor) -> torch.Tensor:
    """A fixed 10% of rows, chosen by row position, never trained on."""
    return (index * 2654435761) % 10 == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir",
        type=Path,
        help="where to write inputs and collection (default: a temporary folder)",
    )
    parser.add_argument("--donors", type=int, default=6)
    parser.add_argument("--cells-per-donor", type=int, default=8_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", module="anndata")
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        out = args.dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        paths = write_inputs(out, args.donors, args.cells_per_donor, args.genes, seed=0)
        print(
            f"wrote {len(paths)} donor files of {args.cells_per_donor:,} cells, sorted by cell type"
        )

        start = time.perf_counter()
        shutil.rmtree(out / "collection.zarr", ignore_errors=True)  # a new build, not an append
        collection = annbatch.DatasetCollection(out / "collection.zarr").add_adatas(
            paths,
            dataset_size=args.donors * args.cells_per_donor // 4,
            rng=0,
            progress=not args.quiet,
        )
        print(f"built {collection} in {time.perf_counter() - start:.1f} s")

        def cell_types_only(group):  # load only the obs column the model needs
            return ad.AnnData(
                X=ad.io.sparse_dataset(group["X"]), obs=ad.io.read_elem(group["obs"])[["cell_type"]]
            )

        loader = annbatch.Loader(
            batch_size=256,
            chunk_size=32,
            preload_nchunks=64,
            shuffle=True,
            return_index=True,
            rng=np.random.default_rng(0),
            dense=True,  # dense float32 tensors, made on the read threads
        ).use_collection(collection, load_adata=cell_types_only)
        model = torch.nn.Linear(loader.n_var, len(CELL_TYPES))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

        for epoch in range(args.epochs):
            seen, correct, total, rows, start = 0, 0, 0, 0, time.perf_counter()
            bar = tqdm(
                total=loader.n_obs, desc=f"epoch {epoch + 1}", unit=" cells", disable=args.quiet
            )
            for batch in loader:
                x = torch.log1p(batch["X"])
                codes = batch["obs"]["cell_type"].cat.codes.to_numpy()
                y = torch.from_numpy(codes.astype(np.int64))
                test = held_out(torch.as_tensor(batch["index"]))
                logits = model(x)
                if (~test).any():
                    loss = torch.nn.functional.cross_entropy(logits[~test], y[~test])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    seen += int((~test).sum())
                correct += int((logits[test].argmax(1) == y[test]).sum())
                total += int(test.sum())
                rows += x.shape[0]
                bar.update(x.shape[0])
            bar.close()
            seconds = time.perf_counter() - start
            print(
                f"epoch {epoch + 1}: {rows:,} cells in {seconds:.1f} s ({rows / seconds:,.0f} cells/s), "
                f"held-out accuracy {correct / max(1, total):.3f} on {total:,} cells"
            )


if __name__ == "__main__":
    main()
