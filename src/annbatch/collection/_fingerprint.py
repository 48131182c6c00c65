"""Fingerprints of a build's inputs: what says whether two inputs hold the same data.

Two digests per input:

- the **quick** fingerprint (:func:`quick_fingerprint`): shape, dtype, obs and gene names and
  the first and last rows of X, read when the input is opened. Different quick fingerprints
  mean different data; equal ones mean nothing on their own (a regenerated input, or three
  donors whose cells are all named "0".."n-1", share them).
- the **content** fingerprint (:class:`ContentDigest`): SHA-256 over every value the build
  takes from the input: X, each carried layer and obsm array (values, dtype, shape, sparse
  structure), obs (the names, every column's values, type and categories) and var (names and
  columns). A build computes it while it reads the input anyway (pass 1 of
  :mod:`annbatch.collection._build`); nothing is read twice for it.

Only equal content fingerprints say "the same data". :class:`Fingerprints` answers that
question for a call's inputs: it compares quick fingerprints first and reads an input whole
(hashing only, nothing written) only when its quick fingerprint matches the one it is
compared with, so a new input is never read before its build reads it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from annbatch.collection._inputs import SOURCE_COLUMN
from annbatch.collection._obs import encode_strings, observe

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch.collection._inputs import Input

X = "X"
"""The name :class:`ContentDigest` gives X among the input's row-indexed arrays."""


def quick_fingerprint(inp: Input) -> str:
    """A digest of an input's shape, dtype, obs and gene names and its first and last rows'
    values (of X; without X, of its first element). Cheap, and only a pre-check: inputs
    whose quick fingerprints differ hold different data; equal ones may not hold the same."""
    digest = hashlib.sha256()
    n_obs, n_var = inp.n_obs, len(inp.var_names)
    dtype = "-" if inp.dtype is None else inp.dtype.str
    digest.update(f"{n_obs} {n_var} {dtype} {inp.sparse}".encode())
    for names in (inp.obs.index(), inp.var_names.astype(str)):
        digest.update("\n".join(names).encode())
        digest.update(b"\0")
    values = inp.x if inp.has_x else inp.elements[min(inp.elements)]
    if not inp.has_x:
        digest.update(min(inp.elements).encode())
    k = min(n_obs, 16)
    for rows in (values[:k], values[n_obs - k :]):
        if sp.issparse(rows):
            rows = sp.csr_matrix(rows)
            arrays = [
                (rows.indptr - rows.indptr[0]).astype(np.int64),
                rows.indices.astype(np.int64),
                rows.data,
            ]
        else:
            arrays = [np.asarray(rows)]
        for array in arrays:
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _bytes(array: np.ndarray) -> memoryview:
    """An array's raw bytes, without a copy where it is contiguous already."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


class _ArrayDigest:
    """One row-indexed array (X, a layer, an obsm array), fed a block of rows at a time. Each
    component (dense values; or CSR row lengths, column indices and values) has its own
    running hash, so the digest does not depend on where the blocks begin."""

    def __init__(self) -> None:
        self.n_rows = 0
        self.kinds: set[str] = set()
        """``dense <dtype> <shape after rows>`` or ``csr <dtype> <columns>``, of every block."""
        self.parts = [hashlib.sha256() for _ in range(3)]

    def update(self, rows: Any) -> None:
        if sp.issparse(rows):
            rows = sp.csr_matrix(rows)
            n_cols = rows.shape[1]
            # Column indices as int32 whenever they fit: the same bytes however they are stored.
            index_type = np.int32 if n_cols <= np.iinfo(np.int32).max else np.int64
            self.kinds.add(f"csr {rows.data.dtype.str} {n_cols}")
            arrays = [
                np.diff(rows.indptr).astype(np.int64),
                rows.indices.astype(index_type, copy=False),
                rows.data,
            ]
        else:
            rows = np.asarray(rows)
            self.kinds.add(f"dense {rows.dtype.str} {rows.shape[1:]}")
            arrays = [rows]
        for part, array in zip(self.parts, arrays, strict=False):
            part.update(_bytes(array))
        self.n_rows += int(rows.shape[0])

    def digest(self) -> bytes:
        out = hashlib.sha256(f"{self.n_rows} {sorted(self.kinds)}".encode())
        for part in self.parts:
            out.update(part.digest())
        return out.digest()


def column_digest(values: pd.Series) -> bytes:
    """A digest of one obs or var column: its kind and dtype, categories, and every value
    (missing values apart from any value)."""
    values = pd.Series(values).reset_index(drop=True)
    out = hashlib.sha256()
    try:
        t = observe(values)
    except TypeError:  # a type a collection cannot store (it is refused at obs; var keeps it)
        out.update(f"other {values.dtype}".encode())
        for part in encode_strings([None if pd.isna(v) is True else repr(v) for v in values]):
            out.update(_bytes(part))
        return out.digest()
    if t.kind == "category":
        out.update(f"category {t.ordered}".encode())
        out.update(column_digest(pd.Series(t.categories)))
        out.update(_bytes(np.asarray(values.cat.codes, dtype=np.int64)))
    elif t.kind == "string":  # NA has length -1: never the same as any string
        out.update(b"string")
        for part in encode_strings(values):
            out.update(_bytes(part))
    elif t.kind == "datetime":
        out.update(f"datetime {t.tz}".encode())
        out.update(_bytes(pd.DatetimeIndex(values).as_unit("ns").asi8))
    else:
        mask = values.isna().to_numpy()
        out.update(f"{t.kind} {t.dtype.str} {t.nullable}".encode())
        out.update(_bytes(mask.view(np.uint8)))
        fill = np.nan if t.kind == "float" else 0
        out.update(_bytes(values.to_numpy(dtype=t.dtype, na_value=fill)))
    return out.digest()


def frame_digest(index: Any, frame: pd.DataFrame) -> bytes:
    """A digest of a data frame's names (``index``, strings) and each column, in order."""
    out = hashlib.sha256()
    for part in encode_strings(index):
        out.update(_bytes(part))
    for name in frame.columns:
        out.update(f"\0column {name}\0".encode())
        out.update(column_digest(frame[name]))
    return out.digest()


class ContentDigest:
    """The content fingerprint of one input, fed as the build reads it: its obs names
    (:meth:`index`), each obs column (:meth:`column`), and the rows of X and of each carried
    element (:meth:`rows`) in blocks, in order; var is read (whole, it is small) at the end.
    :meth:`hexdigest` refuses to answer unless everything was fed.

    Parameters
    ----------
    inp
        The input.
    elements
        The paths of the layers and obsm arrays the build carries (``"layers/counts"``).
    """

    def __init__(self, inp: Input, elements: Sequence[str]) -> None:
        self._inp = inp
        self._index: bytes | None = None
        self._columns: dict[str, bytes] = {}
        self.arrays = [X] if inp.has_x else []
        """The row-indexed arrays to feed: ``"X"`` (when the input has X), then ``elements``
        (sorted: the digest does not depend on the order they are given in)."""
        self.arrays += sorted(elements)
        self._digests = {path: _ArrayDigest() for path in self.arrays}

    @property
    def columns(self) -> list[str]:
        """The obs columns to feed (all the input's but ``src_path``, which is not carried)."""
        return [c for c in self._inp.obs.columns if c != SOURCE_COLUMN]

    def index(self, encoded: Sequence[np.ndarray]) -> None:
        """The obs names, as :func:`~annbatch.collection._obs.encode_strings` gives them."""
        out = hashlib.sha256()
        for part in encoded:
            out.update(_bytes(part))
        self._index = out.digest()

    def column(self, name: str, values: pd.Series) -> None:
        self._columns[name] = column_digest(values)

    def rows(self, path: str, rows: Any) -> None:
        """The next block of rows of ``path`` (``"X"`` or an element's path), as read."""
        self._digests[path].update(rows)

    def hexdigest(self) -> str:
        inp = self._inp
        missing = [c for c in self.columns if c not in self._columns]
        short = [p for p, d in self._digests.items() if d.n_rows != inp.n_obs]
        if self._index is None or missing or short:
            msg = (
                f"the content fingerprint of {inp.name} was asked before all of it was read "
                f"(obs names read: {self._index is not None}; obs columns not read: {missing}; "
                f"arrays not read to the end: {short})"
            )
            raise RuntimeError(msg)
        out = hashlib.sha256()
        dtype = "-" if inp.dtype is None else inp.dtype.str
        out.update(f"annbatch content 1\0{inp.n_obs} {dtype} {inp.sparse}\0".encode())
        out.update(self._index)
        for name in self.columns:
            out.update(f"\0obs {name}\0".encode())
            out.update(self._columns[name])
        var = inp.read_var() if inp.read_var is not None else pd.DataFrame(index=inp.var_names)
        out.update(b"\0var\0")
        out.update(frame_digest(inp.var_names.astype(str), var))
        for path in self.arrays:
            out.update(f"\0{path}\0".encode())
            out.update(self._digests[path].digest())
        return out.hexdigest()


def read_content(inp: Input, elements: Sequence[str], memory_budget: int) -> str:
    """The content fingerprint of an input, read whole for it alone (hashing only, nothing
    written), in blocks of about a quarter of ``memory_budget`` bytes."""
    digest = ContentDigest(inp, elements)
    digest.index(encode_strings(inp.obs.index()))
    for name in digest.columns:
        digest.column(name, inp.obs.column(name))
    arrays = {path: inp.x if path == X else inp.elements[path] for path in digest.arrays}
    row_bytes = 8.0 + sum(_row_bytes(a, inp.n_obs) for a in arrays.values())
    block = max(1, int(memory_budget / (4 * row_bytes)))
    for lo in range(0, inp.n_obs, block):
        hi = min(inp.n_obs, lo + block)
        for path, array in arrays.items():
            digest.rows(path, array[lo:hi])
    return digest.hexdigest()


def _row_bytes(array: Any, n_obs: int) -> float:
    """About how many bytes a row of ``array`` takes in memory once read."""
    itemsize = np.dtype(array.dtype).itemsize
    if hasattr(array, "group"):  # anndata's CSR dataset (or one read widened)
        nnz = int(array.group["indptr"][-1])
        return nnz / max(1, n_obs) * (itemsize + 8) + 8
    if sp.issparse(array) or getattr(array, "is_sparse", False):  # scipy, or a lazy CSR array
        nnz = int(array.nnz)
        return nnz / max(1, n_obs) * (itemsize + 8) + 8
    return float(np.prod(array.shape[1:], dtype=np.int64) * itemsize)


class Fingerprints:
    """The fingerprints of a call's inputs, and whether each holds the same data as a
    recorded one. Quick fingerprints are known at once; an input's content fingerprint is
    read (:func:`read_content`) the first time a comparison needs it, that is when its quick
    fingerprint matches.

    Parameters
    ----------
    inputs
        The opened inputs.
    elements
        The layers and obsm arrays the collection carries (paths); an input's content
        fingerprint covers those it has.
    memory_budget
        Bytes a read may hold at once, about.
    """

    def __init__(self, inputs: Sequence[Input], elements: Sequence[str], memory_budget: int):
        self.inputs = list(inputs)
        self.quick = [quick_fingerprint(inp) for inp in self.inputs]
        self._elements = list(elements)
        self._budget = memory_budget
        self._content: list[str | None] = [None] * len(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)

    def content(self, i: int) -> str:
        """Input ``i``'s content fingerprint, read now unless it was already."""
        known = self._content[i]
        if known is None:
            inp = self.inputs[i]
            carried = [p for p in self._elements if p in inp.elements]
            known = self._content[i] = read_content(inp, carried, self._budget)
        return known

    def contents(self) -> list[str]:
        return [self.content(i) for i in range(len(self))]

    def same(self, i: int, quick: str, content: str | None) -> bool:
        """Whether input ``i`` holds the data recorded as (``quick``, ``content``). A record
        without a content fingerprint (a collection built before they existed) is compared
        by its quick fingerprint alone, as it was then."""
        if self.quick[i] != quick:
            return False
        return content is None or self.content(i) == content

    def same_pair(self, i: int, j: int) -> bool:
        """Whether inputs ``i`` and ``j`` hold the same data."""
        return self.quick[i] == self.quick[j] and self.content(i) == self.content(j)


def recorded(entries: Sequence[dict[str, Any]]) -> list[tuple[str, str | None]]:
    """(quick, content) fingerprints of a manifest's ``inputs`` entries: entries written
    before content fingerprints hold the quick one only, as ``fingerprint``."""
    return [
        (e["quick"], e["fingerprint"]) if "quick" in e else (e["fingerprint"], None)
        for e in entries
    ]


def recorded_build(build: dict[str, Any]) -> tuple[list[str], list[str | None]]:
    """(quick, content) fingerprints of a manifest's build record (content: None for each
    input where unknown: a build not distributed yet, or recorded before content
    fingerprints)."""
    if "quick_fingerprints" in build:
        quick = list(build["quick_fingerprints"])
        content = build.get("fingerprints") or [None] * len(quick)
        return quick, list(content)
    quick = list(build.get("fingerprints") or [])
    return quick, [None] * len(quick)
