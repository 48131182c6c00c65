"""Optional dependencies, imported lazily.

``import annbatch`` must never fail, nor become slow, because an extra (torch, cupy, jax) is
missing; every access to one goes through this module.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType


@cache
def has_module(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # blocked by an import hook, or a None entry in sys.modules
        return False


def import_optional(name: str, *, purpose: str, extra: str) -> ModuleType:
    """Import ``name`` or raise an :class:`ImportError` that says how to get it.

    Parameters
    ----------
    name
        Module to import.
    purpose
        What the caller needs it for, e.g. ``"to_torch=True"``.
    extra
        The annbatch extra that installs it.
    """
    try:
        return importlib.import_module(name)
    except ImportError as e:
        msg = (
            f"{purpose} needs the optional dependency {name!r}; install it, or this package "
            f"with its {extra!r} extra from its checkout: `pip install -e '.[{extra}]'` (the "
            "annbatch on the package index is another project)."
        )
        raise ImportError(msg) from e


def torch_available() -> bool:
    """Whether torch is importable."""
    return has_module("torch")
