"""Samplers: which rows are read together, and in which batches they are yielded."""

from __future__ import annotations

from annbatch.samplers._chunk import ChunkSampler
from annbatch.samplers._weighted import WeightedSampler

__all__ = ["ChunkSampler", "WeightedSampler"]
