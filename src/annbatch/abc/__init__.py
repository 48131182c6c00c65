"""Abstract contracts that users can implement.

:class:`Sampler` is the base class of every sampler. The one public load-request type is the
plain dict :class:`annbatch.types.LoadRequest`; ``annbatch.abc.LoadRequest`` is the deprecated
name of annbatch's internal request objects (still accepted from ``_sample``).
"""

from __future__ import annotations

import warnings
from typing import Any

from annbatch.abc._sampler import Sampler

__all__ = ["Sampler"]


def __getattr__(name: str) -> Any:
    if name == "LoadRequest":
        warnings.warn(
            "annbatch.abc.LoadRequest is deprecated: yield plain dicts "
            "(annbatch.types.LoadRequest: {'requests': [...], 'splits': [...]}) from _sample",
            DeprecationWarning,
            stacklevel=2,
        )
        from annbatch.abc._sampler import ChunkRequest

        return ChunkRequest
    msg = f"module 'annbatch.abc' has no attribute {name!r}"
    raise AttributeError(msg)
