"""Abstract contracts that users can implement.

:class:`Sampler` is the base class of every sampler. The one public load-request type is the
plain dict :class:`annbatch.types.LoadRequest`; ``annbatch.abc.LoadRequest`` is the deprecated
name of annbatch's internal request objects (still accepted from ``_sample``), served by
:func:`annbatch._reference.abc_attribute`.
"""

from __future__ import annotations

from typing import Any

from annbatch._reference import abc_attribute
from annbatch.abc._sampler import Sampler

__all__ = ["Sampler"]


def __getattr__(name: str) -> Any:
    return abc_attribute(name)  # the deprecated LoadRequest
