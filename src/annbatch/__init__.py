"""annbatch: stream on-disk AnnData stores into deep-learning training loops.

``import annbatch`` stays light: :class:`Loader` and :class:`DatasetCollection` (which pull
in zarr, anndata and, when installed, torch) are imported on first access.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from annbatch import abc, errors, samplers, types
from annbatch.samplers import ChunkSampler

if TYPE_CHECKING:
    from annbatch._anndata_io import load_x_and_obs
    from annbatch._loader import Loader
    from annbatch._scrub import verify
    from annbatch.collection import DatasetCollection
    from annbatch.io import write_sharded

__version__ = "0.4.0.dev0"

__all__ = [
    "ChunkSampler",
    "DatasetCollection",
    "Loader",
    "abc",
    "errors",
    "io",
    "load_x_and_obs",
    "samplers",
    "types",
    "verify",
    "write_sharded",
]

_LAZY = {
    "Loader": "annbatch._loader",
    "load_x_and_obs": "annbatch._anndata_io",
    "DatasetCollection": "annbatch.collection",
    "verify": "annbatch._scrub",
    "write_sharded": "annbatch.io",
}


def __getattr__(name: str) -> Any:
    if name == "io":
        module = import_module("annbatch.io")
        globals()["io"] = module
        return module
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'annbatch' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
