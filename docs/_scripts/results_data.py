"""The benchmarks page's data, extracted from the tables of ``benchmarks/RESULTS.md``.

``python docs/_scripts/results_data.py`` rewrites every ``docs/_data/<name>.csv`` (one per entry
of DATASETS) from the RESULTS.md tables its extractor names; the benchmarks page plots those
files and fails the docs build if one no longer matches RESULTS.md (so does
``tests/test_docs.py``). Each row keeps the section and table it came from.

- ``throughput``: rows/s of our loader against the reference library's.
- ``shuffle_quality``: donor mixing and rows/s per sampler and chunk size.
- ``layouts``: X bytes per nonzero and rows/s relative to ``none`` per collection layout.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DATA = ROOT / "docs" / "_data"

_ROW = re.compile(r"^\|(.+)\|\s*$")
_RULE = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_NUMBERS = re.compile(r"([\d,]+) \(([\d,]+)-([\d,]+)\)")


# --- reading RESULTS.md ---


def _section(text: str, heading: str, sub: str | None = None) -> str:
    """The text under ``heading`` up to the next heading of its level (or above); with ``sub``,
    only the part under that subheading."""
    start = text.index(heading + "\n")
    level = heading.split(" ")[0]
    end = len(text)
    for m in re.finditer(r"^#+ ", text[start + len(heading) :], flags=re.M):
        if len(m.group(0).strip()) <= len(level):
            end = start + len(heading) + m.start()
            break
    body = text[start:end]
    if sub is not None:
        body = body[body.index(sub + "\n") :]
        nxt = re.search(r"^#{2,3} ", body[len(sub) :], flags=re.M)
        body = body[: len(sub) + nxt.start()] if nxt else body
    return body


def _tables(body: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``body``, each as its rows keyed by the header's cells (a name
    the header repeats gets " (2)", " (3)" ... from its second time on)."""
    tables: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in [*body.splitlines(), ""]:
        m = _ROW.match(line)
        if not m:
            header = None
            continue
        cells = [c.strip() for c in m.group(1).split("|")]
        if header is None:
            header = [
                c if cells[:i].count(c) == 0 else f"{c} ({cells[:i].count(c) + 1})"
                for i, c in enumerate(cells)
            ]
            tables.append([])
        elif not _RULE.match(line):
            tables[-1].append(dict(zip(header, cells, strict=True)))
    return tables


def _table(
    text: str, heading: str, sub: str | None = None, *, column: str, after: str | None = None
) -> list[dict[str, str]]:
    """The first table of a section (after the line starting with ``after``, if given) whose
    header has ``column``."""
    body = _section(text, heading, sub)
    if after is not None:
        body = body[body.index("\n" + after) :]
    for table in _tables(body):
        if table and column in table[0]:
            return table
    msg = f"no table with a {column!r} column under {heading!r}"
    raise LookupError(msg)


def _source(heading: str, sub: str | None = None) -> str:
    return heading.lstrip("# ") + (f" / {sub.lstrip('# ')}" if sub else "")


def _int(cell: str) -> str:
    return str(int(cell.replace(",", "")))


# --- throughput: our loader against the reference's ---

THROUGHPUT = [  # (section heading, table heading or None, what was read): the newest of each kind
    (
        "## 2026-12-01: read path integrity (issue 12), before and after",
        "### bench.py, issue stores (measured at ff917a3)",
        "anndata-written store",
    ),
    (
        "## 2026-12-02: packed layouts, a collection as small as zstd and as fast as raw bytes (issue 16)",
        None,
        "each library's own collection",
    ),
]


def _loader(name: str) -> str | None:
    if name.startswith("reference"):
        return "reference 0.3.1"
    if name.startswith("annbatch (ours)"):
        return "annbatch"
    return None  # the baseline (an earlier commit of ours) is left out


def throughput(text: str) -> list[dict[str, str]]:
    """Rows of every THROUGHPUT table that compare our loader with the reference's."""
    rows = []
    for heading, sub, data in THROUGHPUT:
        for row in _table(text, heading, sub, column="loader"):
            name = row["loader"]
            if (
                "on its collection" in name
                and "(packed-lz4)" not in name
                and "reference" not in name
            ):
                continue  # our default layout only
            loader = _loader(name)
            if loader is None:
                continue
            numbers = _NUMBERS.search(next(v for k, v in row.items() if k.startswith("rows/s")))
            assert numbers is not None, row
            med, lo, hi = (_int(v) for v in numbers.groups())
            rows.append(
                {
                    "source": _source(heading, sub),
                    "data": data,
                    "store": row.get("store", "sparse"),
                    "setting": row["chunk / preload"],
                    "loader": loader,
                    "rows_per_s": med,
                    "min": lo,
                    "max": hi,
                }
            )
    return rows


# --- shuffle quality: how well batches mix, by sampler and chunk size ---

SHUFFLE_QUALITY = ("## 2026-11-26: samplers, shuffle quality and speed (issue 5)", None)


def shuffle_quality(text: str) -> list[dict[str, str]]:
    """The newest shuffle_quality.py table: every sampler and chunk size it ran."""
    heading, sub = SHUFFLE_QUALITY
    rows = []
    for row in _table(text, heading, sub, column="donor mixing (1 = random)"):
        chunk, preload = (v.strip() for v in row["chunk / preload"].split("/"))
        rows.append(
            {
                "source": _source(heading, sub),
                "rows_from": row["rows from"],
                "sampler": row["sampler"],
                "chunk_size": _int(chunk),
                "preload_nchunks": _int(preload),
                "rows_per_s": _int(row["rows/s"]),
                "donor_mixing": row["donor mixing (1 = random)"],
                "batch_mates_again": row["batch-mates again"],
            }
        )
    return rows


# --- collection layouts: bytes per nonzero and speed relative to `none` ---

LAYOUTS = (
    "## 2026-12-02: packed layouts, a collection as small as zstd and as fast as raw bytes (issue 16)",
    None,
    "The final run, every layout as committed",  # the table after this line
)


def layouts(text: str) -> list[dict[str, str]]:
    """benchmarks/layout.py's final run of every layout as committed."""
    heading, sub, after = LAYOUTS
    rows = []
    for row in _table(text, heading, sub, column="X bytes per nonzero", after=after):
        rows.append(
            {
                "source": _source(heading, sub) + f" / {after}",
                "layout": row["layout"],
                "bytes_per_nonzero": row["X bytes per nonzero"],
                "chunk_256_rows_per_s": _int(row["chunk 256 / 64 rows/s"]),
                "chunk_256_vs_none": row["vs none"].removesuffix("x"),
                "chunk_32_rows_per_s": _int(row["chunk 32 / 512 rows/s"]),
                "chunk_32_vs_none": row["vs none (2)"].removesuffix("x"),
            }
        )
    return rows


# --- the CSVs ---

DATASETS: dict[str, Callable[[str], list[dict[str, str]]]] = {
    "throughput": throughput,
    "shuffle_quality": shuffle_quality,
    "layouts": layouts,
}


def extract(name: str) -> list[dict[str, str]]:
    """The rows of ``docs/_data/<name>.csv`` as RESULTS.md gives them now."""
    return DATASETS[name](RESULTS.read_text())


def read_csv(name: str) -> list[dict[str, str]]:
    with (DATA / f"{name}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    tables = {name: extract(name) for name in DATASETS}  # all or nothing
    DATA.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        path = DATA / f"{name}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path.relative_to(ROOT)} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
