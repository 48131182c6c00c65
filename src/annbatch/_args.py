"""Checks of user arguments shared across annbatch (Loader, samplers, collections, quality)."""

from __future__ import annotations

import re

import numpy as np

from annbatch.errors import InvalidArgumentError


def parse_int(value: object, name: str, *, minimum: int, numpy: bool = True, hint: str = "") -> int:
    """Return ``value`` as an int, or raise naming ``name`` if it is not an integer of at least
    ``minimum`` (1: "positive", 0: "non-negative"); ``numpy`` also accepts numpy integers, and
    ``hint`` says what the argument means."""
    kinds = int | np.integer if numpy else int
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative" if minimum == 0 else f">= {minimum}"
        msg = f"{name} must be a {kind} integer{hint}, got {value!r}"
        raise InvalidArgumentError(msg)
    return int(value)


def parse_positive_int(value: object, name: str) -> int:
    """Return ``value`` (a Python or numpy integer >= 1) as an int, or raise naming ``name``."""
    return parse_int(value, name, minimum=1)


def parse_rng(rng: object) -> np.random.Generator:
    """Return ``rng``, or a fresh generator when it is None."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        msg = f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}"
        raise InvalidArgumentError(msg)
    return rng


def parse_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool | np.bool_):
        msg = f"{name} must be a bool, got {value!r}"
        raise InvalidArgumentError(msg)
    return bool(value)


def parse_mask(mask: object) -> slice | np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, slice):
        if (
            mask.step not in (None, 1)
            or (mask.start or 0) < 0
            or (mask.stop is not None and mask.stop < 0)
        ):
            msg = f"a mask slice must have non-negative bounds and step 1, got {mask!r}"
            raise InvalidArgumentError(msg)
        if mask.stop is not None and mask.stop <= (mask.start or 0):
            msg = f"a mask slice must hold rows (start < stop), got {mask!r}"
            raise InvalidArgumentError(msg)
        return mask
    array = np.asarray(mask)
    if array.dtype != np.bool_ or array.ndim != 1:
        msg = (
            f"mask must be a slice or a 1-D boolean array, got {array.dtype} of shape {array.shape}"
        )
        raise InvalidArgumentError(msg)
    return array


_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "T": 2**40,
    "TB": 2**40,
}


def parse_size(value: object, name: str) -> int:
    """Bytes from ``123``, ``"512MB"`` or ``"2GB"`` (binary units); at least 1 byte."""
    if isinstance(value, bool):
        msg = f"{name} must be a number of bytes or a size like '2GB', got {value!r}"
        raise InvalidArgumentError(msg)
    if isinstance(value, int):
        number = value
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?B?)\s*", str(value).upper())
        if match is None:
            msg = f"{name} must be a number of bytes or a size like '2GB', got {value!r}"
            raise InvalidArgumentError(msg)
        number = int(float(match.group(1)) * _UNITS[match.group(2)])
    if number < 1:
        msg = f"{name} must be at least 1 byte, got {value!r}"
        raise InvalidArgumentError(msg)
    return number
