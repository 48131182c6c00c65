"""Throughput against the reference library, extracted from ``benchmarks/RESULTS.md``.

``python docs/_scripts/throughput.py`` rewrites ``docs/_data/throughput.csv`` from the tables
named in SOURCES; the benchmarks page plots that file and fails the docs build if it no longer
matches RESULTS.md. Each row keeps the section and table it came from.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
CSV = ROOT / "docs" / "_data" / "throughput.csv"

# (section heading, table heading or None, what was read): the newest comparisons of each kind.
SOURCES = [
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
FIELDS = ["source", "data", "store", "setting", "loader", "rows_per_s", "min", "max"]
_ROW = re.compile(r"^\|(.+)\|\s*$")
_NUMBERS = re.compile(r"([\d,]+) \(([\d,]+)-([\d,]+)\)")


def _section(text: str, heading: str, sub: str | None) -> str:
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


def _loader(name: str) -> str | None:
    if name.startswith("reference"):
        return "reference 0.3.1"
    if name.startswith("annbatch (ours)"):
        return "annbatch"
    return None  # the baseline (an earlier commit of ours) is left out


def extract() -> list[dict[str, str]]:
    """Rows of every SOURCES table that compare our loader with the reference's."""
    text = RESULTS.read_text()
    rows = []
    for heading, sub, data in SOURCES:
        for line in _section(text, heading, sub).splitlines():
            m = _ROW.match(line)
            if not m:
                continue
            cells = [c.strip() for c in m.group(1).split("|")]
            if len(cells) < 4 or not _NUMBERS.search(line):
                continue
            if sub is None:  # | chunk / preload | loader | rows/s (min-max) | ...
                store, setting, name, numbers = "sparse", cells[0], cells[1], cells[2]
                if (
                    "on its collection" in name
                    and "(packed-lz4)" not in name
                    and "reference" not in name
                ):
                    continue  # our default layout only
            else:  # | store | chunk / preload | loader | rows/s (min-max) | ...
                store, setting, name, numbers = cells[0], cells[1], cells[2], cells[3]
            loader = _loader(name)
            if loader is None:
                continue
            med, lo, hi = (int(v.replace(",", "")) for v in _NUMBERS.search(numbers).groups())
            rows.append(
                {
                    "source": heading.lstrip("# ") + (f" / {sub.lstrip('# ')}" if sub else ""),
                    "data": data,
                    "store": store,
                    "setting": setting,
                    "loader": loader,
                    "rows_per_s": str(med),
                    "min": str(lo),
                    "max": str(hi),
                }
            )
    return rows


def read_csv() -> list[dict[str, str]]:
    with CSV.open(newline="") as f:
        return list(csv.DictReader(f))


def main() -> None:
    CSV.parent.mkdir(parents=True, exist_ok=True)
    with CSV.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(extract())
    print(f"wrote {CSV.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
