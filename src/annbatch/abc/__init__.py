"""Abstract contracts that users can implement."""

from __future__ import annotations

from annbatch.abc._sampler import LoadRequest, Sampler

__all__ = ["LoadRequest", "Sampler"]
