"""Type aliases shared by the pipeline stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

Block: TypeAlias = np.ndarray | sp.csr_matrix
"""Rows held in memory: dense rows, or CSR rows."""


@dataclass(frozen=True, slots=True)
class ReadJob:
    """The work of reading some row ranges of one dataset, split into independent tasks.

    Run every task (in any order, on any threads), then call :meth:`result` once.
    """

    tasks: Sequence[Callable[[], None]]
    """Independent pieces of work; each releases the GIL while it decodes or reads files."""
    result: Callable[[], list[Block]]
    """The rows, after all tasks have run: the ranges one after another, in one or more blocks."""
