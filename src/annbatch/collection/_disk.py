"""A full disk during a build: one :class:`~annbatch.errors.DiskFullError` that names the path.

The libraries a build writes through report a full disk each their own way: an ``OSError``
with ``errno`` ENOSPC (Python's files, zarr's local store), the same wrapped by anndata, or
HDF5's message with ``errno = 28`` in it (h5py, as a ``RuntimeError`` when a file is flushed).
:func:`naming` turns any of them, met inside its block, into a ``DiskFullError`` naming the
path being written; the build then says what became of the collection
(:func:`with_consequence`).
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

from annbatch.errors import DiskFullError

if TYPE_CHECKING:
    import os
    from collections.abc import Iterator

_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
"""errno of a full disk, with the words the message uses for it."""


def _reason(error: BaseException) -> int | None:
    """ENOSPC or EDQUOT if ``error`` itself says the disk is full, else None."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return error.errno
    if isinstance(error, OSError | RuntimeError):  # HDF5's text, carried by h5py
        text = str(error).lower()
        for code, words in _NO_SPACE.items():
            if f"errno = {code}," in text or words in text:
                return code
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then its causes and contexts (each once)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        suppressed = current.__suppress_context__  # raise ... from None
        current = current.__cause__ or (None if suppressed else current.__context__)


def full_disk_cause(error: BaseException) -> BaseException | None:
    """The error that says the disk is full, in ``error``'s chain; None if none does."""
    for link in _chain(error):
        if not isinstance(link, DiskFullError) and _reason(link) is not None:
            return link
    return None


def _error(path: str, cause: BaseException, consequence: str = "") -> DiskFullError:
    code = _reason(cause) or errno.ENOSPC
    tail = f"; {consequence}" if consequence else ""
    msg = f"disk full: cannot write {path} ({_NO_SPACE[code]}){tail}"
    error = DiskFullError(msg)
    error.errno = code
    error.path = path
    return error


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Raise a full disk met inside the block as a ``DiskFullError`` naming ``path`` (the
    innermost block names it: the file or folder being written)."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as e:
        cause = full_disk_cause(e)
        if cause is None:
            raise
        raise _error(str(path), cause) from cause


def with_consequence(error: BaseException, where: str, consequence: str) -> DiskFullError | None:
    """``error`` as the one-line ``DiskFullError`` a build raises (the path written, or else
    the collection ``where``, then ``consequence``), with the operating system's error as its
    cause; None if ``error`` is not a full disk."""
    cause = full_disk_cause(error)
    if cause is None:
        return None
    path = next((e.path for e in _chain(error) if isinstance(e, DiskFullError) and e.path), where)
    new = _error(path, cause, consequence)
    new.__cause__ = cause
    return new
