"""Collections: many AnnData inputs written once, rows shuffled across them, for fast reading."""

from __future__ import annotations

from annbatch.collection._collection import DatasetCollection
from annbatch.collection._inputs import SOURCE_COLUMN

__all__ = ["SOURCE_COLUMN", "DatasetCollection"]
