"""Region metrics only the benchmarks report: ENL, CNR and singular-value decay; paired
differences with a subject-level bootstrap interval.

The metrics the package itself reports (PSNR, SSIM, GLCM homogeneity, speckle SNR) are
:mod:`Speckle2SelfLib.metrics`; these use its input checks.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from Speckle2SelfLib.metrics import as_image, region_values


def enl(image: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Equivalent number of looks mean^2 / var over ``mask`` (whole image when None).

    For a Rayleigh amplitude it is 1 / (4 / pi - 1) = 3.66; for intensity (exponential) it is 1.
    """
    values = region_values(image, mask)
    var = values.var()
    return float("inf") if var == 0.0 else float(values.mean() ** 2 / var)


def cnr(image: np.ndarray, roi_a: np.ndarray, roi_b: np.ndarray) -> float:
    """Contrast-to-noise ratio |mean_a - mean_b| / sqrt(var_a + var_b) of two boolean regions."""
    a = region_values(image, roi_a, "roi_a")
    b = region_values(image, roi_b, "roi_b")
    spread = np.sqrt(a.var() + b.var())
    difference = abs(a.mean() - b.mean())
    if spread == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return float(difference / spread)


class SingularValueDecay(NamedTuple):
    """Singular values of a patch normalised by the largest, and the share of energy
    (sum of squared singular values) held by the first ``top_k``."""

    values: np.ndarray
    top_k_energy: float
    top_k: int


def singular_value_decay(patch: np.ndarray, top_k: int = 10) -> SingularValueDecay:
    """Singular-value spectrum of a 2D patch: the clean image is low rank, speckle is not, so a
    despeckled patch concentrates more energy in its first singular values (Speckle2Self's
    low-rank + sparse argument).
    """
    arr = as_image(patch, "patch").astype(np.float64)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    values = np.linalg.svd(arr, compute_uv=False)
    energy = values ** 2
    if values[0] == 0.0:
        raise ValueError("patch is all zeros; its singular values cannot be normalised")
    k = min(top_k, values.size)
    return SingularValueDecay(values=values / values[0], top_k_energy=float(energy[:k].sum() / energy.sum()),
                              top_k=k)


def paired_difference_ci(values: Sequence[float], reference: Sequence[float], groups: Sequence[str],
                         level: float = 0.95, resamples: int = 4000, seed: int = 0) -> Tuple[float, float, float]:
    """Mean of ``values - reference`` (paired per image) and its confidence interval from a
    bootstrap that resamples whole ``groups`` (subjects): images of one subject are correlated,
    so resampling images alone would give a falsely narrow interval."""
    diff = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    groups = np.asarray(groups)
    members = [np.nonzero(groups == g)[0] for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    means = [diff[np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])].mean()
             for _ in range(resamples)]
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(diff.mean()), float(lo), float(hi)
