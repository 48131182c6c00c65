"""Samplers: which rows are read together, and in which batches they are yielded."""

from __future__ import annotations

from annbatch.samplers._chunk import ChunkSampler

__all__ = ["ChunkSampler"]
