"""Writing AnnData for fast reading: :func:`write_sharded` (one AnnData) and
:class:`DatasetCollection` (many, rows shuffled across them); the module the reference
library's current API imports them from. :data:`V1_ENCODING` is the attributes a finished
collection's root group carries (the reference's encoding)."""

from __future__ import annotations

from annbatch.collection import DatasetCollection
from annbatch.collection._encoding import V1_ENCODING
from annbatch.io._sharded import write_sharded

__all__ = ["V1_ENCODING", "DatasetCollection", "write_sharded"]
