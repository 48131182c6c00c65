"""The Loader's arguments, checked: its sampler (given, or built from the sampler arguments),
what it yields (``to``, ``dense``, ``preload_to_gpu``, checked again where an epoch begins)
and its flags."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import numpy as np

from annbatch._args import parse_rng
from annbatch._compat import import_optional
from annbatch._core import gpu
from annbatch._core.reader import common_dtype
from annbatch._core.workers import current_shard
from annbatch._reference import output_of_to_torch
from annbatch.abc import Sampler
from annbatch.errors import GPUUnavailableError, InvalidArgumentError
from annbatch.samplers import RandomSampler, SequentialSampler

if TYPE_CHECKING:
    from collections.abc import Sequence

    from annbatch._core.convert import OutputKind
    from annbatch._core.sources import RowSource

_OUTPUTS = ("numpy", "torch", "jax")


class _Unset(enum.Enum):
    """Default of ``to``: not given (``to=None`` means no conversion). An enum member, so
    copies and pickles stay the same object."""

    UNSET = "unset"

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset.UNSET


def parse_sampler(
    batch_sampler: object,
    *,
    chunk_size: int | None,
    preload_nchunks: int | None,
    batch_size: int | None,
    shuffle: bool | None,
    drop_last: bool | None,
    rng: np.random.Generator | None,
) -> Sampler:
    """``batch_sampler``, checked, when given (then no sampler argument may be); else a
    :class:`RandomSampler` (``shuffle``) or :class:`SequentialSampler` from the sampler
    arguments, with the Loader's defaults for those not given."""
    sampler_args = {
        "chunk_size": chunk_size,
        "preload_nchunks": preload_nchunks,
        "batch_size": batch_size,
        "shuffle": shuffle,
        "drop_last": drop_last,
        "rng": rng,
    }
    given = [name for name, value in sampler_args.items() if value is not None]
    if batch_sampler is not None:
        if given:
            msg = f"batch_sampler is given, so {', '.join(given)} must not be: the sampler controls them"
            raise InvalidArgumentError(msg)
        if not isinstance(batch_sampler, Sampler):
            msg = (
                f"batch_sampler must be an annbatch.abc.Sampler, got {type(batch_sampler).__name__}"
            )
            raise InvalidArgumentError(msg)
        return batch_sampler
    chunking = (
        512 if chunk_size is None else chunk_size,
        32 if preload_nchunks is None else preload_nchunks,
        1 if batch_size is None else batch_size,
    )
    if shuffle is not None and not isinstance(shuffle, bool | np.bool_):
        msg = f"shuffle must be a bool, got {shuffle!r}"
        raise InvalidArgumentError(msg)
    drop = False if drop_last is None else drop_last
    if shuffle:
        return RandomSampler(*chunking, drop_last=drop, rng=rng)
    parse_rng(rng)  # checked as the samplers check it, though nothing is drawn
    return SequentialSampler(*chunking, drop_last=drop)


def parse_output(*, to_torch: bool | None, to: object) -> OutputKind:
    """The output kind from ``to`` (``"torch"``, ``"jax"``, ``"numpy"`` or None: no conversion)
    or, when ``to`` is not given, from the deprecated ``to_torch``."""
    if to is UNSET:
        return output_of_to_torch(to_torch)
    if to_torch is not None:
        msg = f"pass either to={to!r} or to_torch={to_torch!r}, not both (to_torch is deprecated)"
        raise InvalidArgumentError(msg)
    if to is not None and to not in _OUTPUTS:
        msg = f"to must be 'torch', 'jax', 'numpy' or None (no conversion), got {to!r}"
        raise InvalidArgumentError(msg)
    kind: OutputKind = "numpy" if to is None else to  # type: ignore[assignment]
    if kind != "numpy":
        import_optional(kind, purpose=f"to={kind!r}", extra=kind)  # ImportError now, not later
    return kind


def parse_preload_to_gpu(preload_to_gpu: object, output: OutputKind, *, dense: bool) -> bool:
    """``preload_to_gpu`` checked against the output (``to`` and ``dense``), and CuPy and a
    device looked for (before any data is added or read)."""
    if not isinstance(preload_to_gpu, bool):
        msg = f"preload_to_gpu must be a bool, got {preload_to_gpu!r}"
        raise InvalidArgumentError(msg)
    if preload_to_gpu and output == "jax":
        msg = "to='jax' cannot be combined with preload_to_gpu; use to='torch' or to=None there"
        raise InvalidArgumentError(msg)
    if preload_to_gpu and dense:
        # Densifying belongs to the CPU path's read threads; on the GPU path the consumer cuts
        # each batch on the device, where densifying it is fast anyway.
        msg = (
            "dense=True cannot be combined with preload_to_gpu=True: batches are cut on the GPU "
            "there; make them dense on the device instead (batch['X'].to_dense() for torch, "
            ".toarray() for CuPy)"
        )
        raise InvalidArgumentError(msg)
    if preload_to_gpu:
        gpu.check_available()
    return preload_to_gpu


def gpu_device(sources: Sequence[RowSource]) -> int:
    """The CUDA device an epoch with ``preload_to_gpu`` runs on (the consumer's: under DDP, the
    rank's), checked where the epoch begins: not in DataLoader workers, and (sparse data) a
    dtype CuPy can hold after promotion."""
    if current_shard().count > 1:
        msg = (
            "preload_to_gpu=True cannot run inside DataLoader worker processes (each "
            "would hold its own CUDA context and windows); iterate the Loader in the "
            "main process (num_workers=0), or use preload_to_gpu=False with workers"
        )
        raise GPUUnavailableError(msg)
    if sources[0].is_sparse:
        gpu.device_sparse_dtype(common_dtype(sources))
    return gpu.current_device()


def parse_flag(value: object, name: str) -> bool:
    """``value`` if it is a Python bool (numpy's are refused, unlike the samplers' flags)."""
    if not isinstance(value, bool):
        msg = f"{name} must be a bool, got {value!r}"
        raise InvalidArgumentError(msg)
    return value
