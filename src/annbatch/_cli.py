"""Command line: ``annbatch build`` writes a collection, ``annbatch info`` describes one,
``annbatch verify`` scrubs a store or a collection."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="annbatch",
        description="Build and inspect annbatch collections (AnnData rows shuffled across files).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="write a collection from AnnData files",
        description=(
            "Combine AnnData files (.h5ad or .zarr) into a collection: every row goes to a random "
            "dataset and a random place in it, written as sharded zarr v3. Running it again after "
            "an interruption resumes the build; running it again on a finished collection writes "
            "nothing; --append adds new inputs to a finished collection."
        ),
    )
    build.add_argument(
        "out",
        help="the collection's folder (new, or an existing collection), or its URL in object "
        "storage (s3://bucket/atlas.zarr; credentials from the environment)",
    )
    build.add_argument(
        "inputs", type=Path, nargs="+", help="AnnData files: .h5ad files or .zarr stores"
    )
    build.add_argument(
        "--genes",
        type=Path,
        help="text file with one gene name per line: keep these genes in this order (missing ones are "
        "zeros). Default: every gene of any input",
    )
    build.add_argument(
        "--dataset-size",
        type=int,
        default=1_048_576,
        help="most rows per dataset (default: %(default)s)",
    )
    build.add_argument(
        "--memory-budget",
        default="2GB",
        help="about how much memory the build may use, e.g. 512MB or 8GB (default: %(default)s); "
        "datasets are made smaller if one would not fit",
    )
    build.add_argument(
        "--seed", type=int, default=0, help="seed of the shuffle (default: %(default)s)"
    )
    build.add_argument(
        "--compression",
        # the layouts of annbatch.collection._layout (not imported here: it pulls in anndata;
        # tests/test_collection.py checks that the two agree)
        choices=["packed-lz4", "packed", "none", "lz4", "zstd"],
        default="packed-lz4",
        help="layout of X (default: %(default)s). packed: counts in the narrowest exact integer "
        "type and uint16 gene indices, uncompressed (half of none's size on counts); "
        "packed-lz4: that, with the counts LZ4-compressed (a third of none's size, about as "
        "fast); none: the inputs' types, uncompressed; lz4, zstd: the inputs' types, compressed",
    )
    build.add_argument(
        "--append",
        action="store_true",
        help="add the inputs to a finished collection (in new datasets)",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="add inputs whose data the collection already holds, or that are named twice",
    )
    build.add_argument(
        "--scratch-dir",
        type=Path,
        help="for a URL: the local folder for the rows distributed but not yet uploaded "
        "(default: one named after the URL in the system's temporary folder)",
    )
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    info = commands.add_parser(
        "info",
        help="describe a collection",
        description="Print a collection's datasets: rows, genes, dtype, codec, chunking and size on disk.",
    )
    info.add_argument("store", help="the collection's folder, or its URL (s3://, gs://, az://)")
    verify = commands.add_parser(
        "verify",
        help="read and check every chunk of a store or a collection",
        description=(
            "Read every chunk of every array of a zarr store (an AnnData store or a "
            "collection) or an h5ad file: decode it, verify its CRC32C checksum where it has "
            "one, check shard indexes and CSR structure (indptr, column indices). Prints every "
            "bad chunk (array, chunk, what is wrong); exits 1 if there is any."
        ),
    )
    verify.add_argument(
        "store", help="a .zarr folder, a collection or a .h5ad file, or a zarr store's URL"
    )
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("annbatch")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _human(n_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024:
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TB"


def _verify(store: str) -> int:
    from annbatch._scrub import verify

    problems = verify(store)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{store}: {len(problems)} bad chunks or arrays", file=sys.stderr)
        return 1
    print(f"{store}: every chunk read and checked, no problems")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (130 after Ctrl-C)."""
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            status = _run(args)
        for w in caught:  # annbatch's own notes as one line each; others as Python shows them
            if issubclass(w.category, UserWarning) and "annbatch" in Path(w.filename).parts:
                print(f"annbatch {args.command}: {w.message}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.command == "build" else ""
        print(f"annbatch {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return status


def _run(args: argparse.Namespace) -> int:
    from annbatch._stores import is_url
    from annbatch.collection import DatasetCollection
    from annbatch.errors import AnnbatchError

    try:
        if args.command == "verify":
            return _verify(args.store)
        if args.command == "build":
            genes = None
            if args.genes is not None:
                genes = [
                    line.strip() for line in args.genes.read_text().splitlines() if line.strip()
                ]
            remote = {} if args.scratch_dir is None else {"scratch_dir": args.scratch_dir}
            collection = DatasetCollection(args.out, **remote).add_adatas(
                [str(p) for p in args.inputs],
                var_names=genes,
                dataset_size=args.dataset_size,
                memory_budget=args.memory_budget,
                rng=args.seed,
                progress=not args.quiet,
                compression=args.compression,
                append=args.append,
                force=args.force,
            )
            print(collection)
            return 0
        if not is_url(args.store) and not Path(args.store).exists():
            print(f"annbatch info: error: {args.store} does not exist", file=sys.stderr)
            return 1
        info = DatasetCollection(args.store).info()
    except (AnnbatchError, OSError) as e:
        print(f"annbatch {args.command}: error: {e}", file=sys.stderr)
        return 1
    kind = " (h5ad files)" if info.get("format") == "h5ad" else ""
    print(
        f"{info['path']}{kind}: {info['n_datasets']} datasets, {info['n_obs']:,} rows x {info['n_var']:,} genes, {_human(info['bytes'])} on disk"
    )
    width = max([16, *(len(d["name"]) for d in info["datasets"])])
    print(
        f"{'dataset':<{width}} {'rows':>12} {'dtype':>8} {'stored as':>24} {'X':>11} {'codec':>12} "
        f"{'chunks':>10} {'shards':>10} {'size':>10} {'B/nnz':>6}"
    )
    for d in info["datasets"]:
        chunks = "x".join(str(c) for c in d["chunks"]) or "-"
        shards = "x".join(str(c) for c in d["shards"]) if d["shards"] else "-"
        # bytes per stored nonzero of the whole dataset (obs and var included): what a row costs
        per_nnz = f"{d['bytes'] / d['nnz']:.2f}" if d.get("nnz") else "-"
        print(
            f"{d['name']:<{width}} {d['n_obs']:>12,} {d['dtype'] or '-':>8} {d.get('stored', '-'):>24} "
            f"{d['encoding']:>11} {d['codec']:>12} {chunks:>10} {shards:>10} "
            f"{_human(d['bytes']):>10} {per_nnz:>6}"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
