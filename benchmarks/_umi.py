"""Seeded UMI-like counts, drawn the way 10x single-cell data looks.

Gene means are log-normal (a few genes very high, most low); cell sizes are log-normal; a
cell's count of a gene is negative binomial (a gamma-Poisson mixture) around mean x size. Only
the detected genes (count > 0) are stored: about ``detected`` per cell, nearly all counts small
(the default parameters give ~3,200 detected genes of 20,000, and over 99.9% of values <= 255).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def umi_counts(
    n_obs: int,
    n_var: int = 20_000,
    *,
    detected: int = 3_200,
    seed: int = 0,
    dtype: type = np.float32,
    block: int = 2_000,
) -> sp.csr_matrix:
    """A CSR matrix of ``n_obs`` cells x ``n_var`` genes of UMI-like counts (sorted indices)."""
    rng = np.random.default_rng(seed)
    gene_mean = rng.lognormal(mean=-2.0, sigma=1.8, size=n_var)
    gene_mean /= gene_mean.sum()
    dispersion = 0.3  # negative binomial: var = mu + dispersion * mu^2
    parts = []
    for lo in range(0, n_obs, block):
        k = min(block, n_obs - lo)
        size = rng.lognormal(
            mean=np.log(_library_size(gene_mean, detected, dispersion)), sigma=0.35, size=k
        )
        mu = size[:, None] * gene_mean[None, :]
        lam = rng.gamma(shape=1 / dispersion, scale=mu * dispersion)
        counts = rng.poisson(lam)
        parts.append(sp.csr_matrix(counts.astype(dtype)))
    out = sp.vstack(parts, format="csr")
    out.sort_indices()
    return out


def _library_size(gene_mean: np.ndarray, detected: int, dispersion: float) -> float:
    """The total count per cell at which about ``detected`` genes are nonzero (bisection)."""
    lo, hi = 1.0, 1e7
    for _ in range(60):
        mid = np.sqrt(lo * hi)
        mu = mid * gene_mean
        p_zero = (1 + dispersion * mu) ** (-1 / dispersion)
        if (1 - p_zero).sum() < detected:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))
