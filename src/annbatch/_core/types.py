"""Type aliases shared by the pipeline stages."""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import scipy.sparse as sp

Block: TypeAlias = np.ndarray | sp.csr_matrix
"""Rows held in memory: dense rows, or CSR rows."""
