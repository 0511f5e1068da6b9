"""Multi-scale perturbation (MSP): the views the self-supervised loss compares.

Downsampling by s and upsampling back keeps the anatomy (low frequencies) but resamples
the speckle differently at each scale, so the views share structure and differ in noise.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F

DEFAULT_SCALES = (1.0, 0.5, 0.25)
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")


def minmax_normalise(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Map each sample of (N, C, H, W) to [0, 1]; a constant sample becomes all zeros."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    span = hi - lo
    # A constant image has no contrast to stretch: return zeros rather than NaN.
    return torch.where(span > eps, (x - lo) / span.clamp_min(eps), torch.zeros_like(x))


def _resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align)


def multiscale_views(x: torch.Tensor, scales: Sequence[float] = DEFAULT_SCALES,
                     interpolation: str = "bilinear") -> List[torch.Tensor]:
    """One view per scale: down by s, back up to the input size, min-max normalised."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if x.dim() != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    views = []
    for s in scales:
        if not 0.0 < s <= 1.0:
            raise ValueError(f"scales must lie in (0, 1], got {s}")
        if s == 1.0:
            v = x
        else:
            small = (max(1, round(h * s)), max(1, round(w * s)))
            v = _resize(_resize(x, small, interpolation), (h, w), interpolation)
        views.append(minmax_normalise(v))
    return views


def resample_to_working_scale(x, working_scale: float):
    """Resample a (N, C, H, W) batch by ``working_scale`` (1: unchanged); area-average when shrinking."""
    if abs(working_scale - 1.0) < 1e-6:
        return x
    h, w = x.shape[-2:]
    size = (max(8, round(h * working_scale)), max(8, round(w * working_scale)))
    if working_scale < 1.0:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
