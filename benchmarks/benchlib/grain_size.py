"""Speckle grain of real images: how many pixels one speckle spot spans (benchmarks/grain.py).

The grain is the full width at half maximum of the speckle's autocorrelation (axial = rows,
lateral = columns), on textured tiles of the image after removing the anatomy's slow
variation. Inference matches the view difference instead (Speckle2SelfLib.engine.grain); this
estimate is what the grain benchmark reports beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from Speckle2SelfLib.engine.grain import MAX_FRAMES

TILE = 64                 # autocorrelation tile (pixels)
HIGHPASS_SIGMA = 12.0     # anatomy removal: larger than any speckle spot we expect to see


@dataclass(frozen=True)
class Grain:
    axial_px: float
    lateral_px: float
    tiles: int

    @property
    def px(self) -> float:
        """One number: the geometric mean of the axial and lateral widths."""
        return float(np.sqrt(self.axial_px * self.lateral_px))


def _highpass(frame: np.ndarray, sigma) -> np.ndarray:
    from scipy import ndimage
    f = frame.astype(np.float64)
    return f - ndimage.gaussian_filter(f, sigma, mode="reflect")


def _textured_tiles(frame: np.ndarray, residual: np.ndarray, tile: int):
    """Tiles inside the image (margins hold scanner annotations) that carry speckle: not
    near-black (outside the sector, anechoic lumen) and not saturated."""
    h, w = frame.shape
    margin_r, margin_c = h // 10, w // 10
    lo, hi = np.percentile(frame, [1, 99])
    span = max(hi - lo, 1e-12)
    out = []
    for r in range(margin_r, h - margin_r - tile + 1, tile):
        for c in range(margin_c, w - margin_c - tile + 1, tile):
            patch = frame[r:r + tile, c:c + tile]
            level = (np.median(patch) - lo) / span
            if 0.1 < level < 0.9 and residual[r:r + tile, c:c + tile].std() > 1e-9:
                out.append(residual[r:r + tile, c:c + tile])
    return out


def _mean_autocorrelation(tiles) -> np.ndarray:
    acc = None
    for t in tiles:
        t = (t - t.mean()) / t.std()
        n0, n1 = t.shape
        spec = np.fft.rfft2(t, s=(2 * n0, 2 * n1))       # zero-padded: linear, not circular
        ac = np.fft.irfft2(np.abs(spec) ** 2, s=(2 * n0, 2 * n1))
        acc = ac if acc is None else acc + ac
    return acc / acc[0, 0]


def _half_width(profile: np.ndarray) -> float:
    """Lag where a decreasing profile (profile[0] == 1) first falls to 0.5, interpolated."""
    below = np.nonzero(profile < 0.5)[0]
    if len(below) == 0:
        return float(len(profile))
    k = int(below[0])
    a, b = profile[k - 1], profile[k]
    return float(k - 1 + (a - 0.5) / (a - b))


def estimate_grain(frames, tile: int = TILE, iterations: int = 3) -> Optional[Grain]:
    """Speckle grain of an (H, W) image or (N, H, W) stack; None where there is too little
    speckle to tell (tiny, flat or almost black images).

    The anatomy filter and the tile grow with the grain found (a few rounds), so that the
    estimate scales with the image: the same scan at twice the pixels gives twice the grain.
    """
    arr = np.asarray(frames)
    stack = arr[None] if arr.ndim == 2 else arr
    if stack.ndim != 3 or min(stack.shape[1:]) < 2 * tile:
        return None
    pick = np.unique(np.linspace(0, len(stack) - 1, min(MAX_FRAMES, len(stack))).round().astype(int))
    sigma, grain = (HIGHPASS_SIGMA, HIGHPASS_SIGMA), None
    for _ in range(iterations):
        tiles = []
        for k in pick:
            frame = stack[k].astype(np.float64)
            if not np.isfinite(frame).all() or frame.max() <= frame.min():
                continue
            tiles += _textured_tiles(frame, _highpass(frame, sigma), tile)
        if len(tiles) < 4:
            return grain
        ac = _mean_autocorrelation(tiles)
        axial = 2.0 * _half_width(ac[:tile, 0])
        lateral = 2.0 * _half_width(ac[0, :tile])
        grain = Grain(round(axial, 3), round(lateral, 3), len(tiles))
        new_sigma = (float(np.clip(3.0 * axial, 3, 64)), float(np.clip(3.0 * lateral, 3, 64)))
        new_tile = int(np.clip(2 ** np.ceil(np.log2(4.0 * max(axial, lateral))), 32, 256))
        new_tile = min(new_tile, int(2 ** np.floor(np.log2(min(stack.shape[1:]) / 2))))
        if np.allclose(new_sigma, sigma, rtol=0.1) and new_tile == tile:
            break
        sigma, tile = new_sigma, new_tile
    return grain
