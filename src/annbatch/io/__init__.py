"""Writing AnnData for fast reading: :func:`write_sharded` (one AnnData) and
:class:`DatasetCollection` (many, rows shuffled across them); the module the reference
library's current API imports them from."""

from __future__ import annotations

from annbatch.collection import DatasetCollection
from annbatch.io._sharded import write_sharded

__all__ = ["DatasetCollection", "write_sharded"]
