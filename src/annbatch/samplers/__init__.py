"""Samplers: which rows are read together, and in which batches they are yielded.

:class:`ChunkSampler` and :class:`WeightedSampler` are annbatch's own; :class:`RandomSampler`,
:class:`SequentialSampler`, :class:`DistributedSampler`, :class:`ClassSampler` and
:class:`WeightedClassSampler` are the reference library's current samplers, built on the same
engine (epochs as a function of a seed, resume, DataLoader workers).
"""

from __future__ import annotations

from annbatch.samplers._chunk import ChunkSampler
from annbatch.samplers._chunks_reference import RandomSampler, SequentialSampler
from annbatch.samplers._class import ClassSampler, WeightedClassSampler
from annbatch.samplers._distributed import DistributedSampler
from annbatch.samplers._weighted import WeightedSampler

__all__ = [
    "ChunkSampler",
    "ClassSampler",
    "DistributedSampler",
    "RandomSampler",
    "SequentialSampler",
    "WeightedClassSampler",
    "WeightedSampler",
]
