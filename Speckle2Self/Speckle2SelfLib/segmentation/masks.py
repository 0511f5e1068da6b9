"""Lumen masks and seeds: measurements, input checks and plausibility (shared by every method).

Coordinates: seeds are ``(row, col)`` pixel indices into ``image[row, col]``; spacings are
``(row spacing, column spacing)`` in mm, i.e. numpy axis order (ITK's ``(x, y)`` reversed).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

#: A fill covering more than this fraction of the image has leaked out of the lumen.
LEAK_AREA_FRACTION = 0.5

RowCol = Tuple[float, float]


class SegmentationWarning(UserWarning):
    """A segmentation ran but its input or result looks wrong (seed on a wall, leak)."""


# ----------------------------------------------------------------------------- measurements

@dataclass(frozen=True)
class Measurement:
    """Size and position of one lumen mask."""

    area_px: int
    area_mm2: float
    equivalent_diameter_mm: float       # diameter of the disk with the same area: 2 sqrt(A / pi)
    centroid_rc: Tuple[float, float]    # (row, col) in pixels; NaN for an empty mask
    #: Diameters (mm) of the ellipse with the mask's area moments (for a filled ellipse: its
    #: axes); 0 for an empty mask.
    major_diameter_mm: float = 0.0
    minor_diameter_mm: float = 0.0


def measure(mask: np.ndarray, spacing_mm: Sequence[float] = (1.0, 1.0)) -> Measurement:
    """Area (mm^2), equivalent diameter (mm), centroid (row, col) and the major / minor
    diameters (mm) of the moment ellipse of a 2D boolean mask.

    The moment ellipse has the mask's centroid and second moments (computed in mm, so
    anisotropic pixels are handled); for a filled ellipse its diameters are the ellipse's
    axes, 4 sqrt(eigenvalue of the covariance).
    """
    mask = _as_mask2d(mask)
    row_mm, col_mm = _spacing2(spacing_mm)
    area_px = int(np.count_nonzero(mask))
    area_mm2 = area_px * row_mm * col_mm
    if area_px == 0:
        return Measurement(0, 0.0, 0.0, (math.nan, math.nan))
    rows, cols = np.nonzero(mask)
    points_mm = np.stack([rows * row_mm, cols * col_mm]).astype(np.float64)
    # Pixels are small squares, not points: each adds its own variance (side^2 / 12).
    covariance = np.cov(points_mm, bias=True) + np.diag([row_mm ** 2, col_mm ** 2]) / 12.0
    minor_var, major_var = np.clip(np.linalg.eigvalsh(covariance), 0.0, None)
    return Measurement(area_px, float(area_mm2), float(2.0 * math.sqrt(area_mm2 / math.pi)),
                       (float(rows.mean()), float(cols.mean())),
                       float(4.0 * math.sqrt(major_var)), float(4.0 * math.sqrt(minor_var)))


def seed_from_mask(mask: np.ndarray) -> Tuple[int, int]:
    """The mask's centroid as a (row, col) seed; the nearest mask pixel when the centroid
    falls outside a non-convex mask (a seed must lie inside the region it should grow)."""
    mask = _as_mask2d(mask)
    if not mask.any():
        raise ValueError("cannot place a seed in an empty mask")
    rows, cols = np.nonzero(mask)
    r, c = int(round(rows.mean())), int(round(cols.mean()))
    if mask[r, c]:
        return r, c
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return int(rows[nearest]), int(cols[nearest])


# ----------------------------------------------------------------------------- checks

def check_seed(seed_rc: RowCol, shape: Tuple[int, ...]) -> Tuple[int, int]:
    """Round a (row, col) seed to a pixel; ValueError naming seed and image size if outside."""
    try:
        row, col = (float(v) for v in seed_rc)
    except (TypeError, ValueError) as err:
        raise ValueError(f"seed must be (row, col), got {seed_rc!r}") from err
    h, w = shape[-2:]
    if not (np.isfinite(row) and np.isfinite(col)):
        raise ValueError(f"seed (row={row}, col={col}) is not a finite position")
    r, c = int(round(row)), int(round(col))
    if not (0 <= r < h and 0 <= c < w):
        raise ValueError(f"seed (row={row:g}, col={col:g}) i.e. x={col:g}, y={row:g} is outside the "
                         f"{w}x{h} image (width x height; valid x 0..{w - 1}, y 0..{h - 1}); "
                         "click inside the lumen")
    return r, c


def seed_looks_like_wall(image: np.ndarray, seed: Tuple[int, int]) -> bool:
    """True when the seed's 5x5 median is far above the image's median grey level (above the
    middle between the median and the 99th percentile): a lumen is dark, its wall is bright."""
    r, c = seed
    local = float(np.median(image[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3]))
    median, p99 = (float(v) for v in np.percentile(image, [50, 99]))
    return p99 > median and local > median + 0.5 * (p99 - median)


def warn_if_seed_on_wall(image: np.ndarray, seed: Tuple[int, int]) -> None:
    if seed_looks_like_wall(image, seed):
        warnings.warn(f"seed (row={seed[0]}, col={seed[1]}) is on a bright structure "
                      f"(grey level {float(image[seed]):g} vs image median {float(np.median(image)):g}), "
                      "probably the vessel wall, not the dark lumen; click inside the lumen",
                      SegmentationWarning, stacklevel=3)


def leak_reason(mask: np.ndarray) -> str:
    """Why a lumen mask looks leaked ('' if it does not): it reaches the border or fills the image."""
    if mask.mean() > LEAK_AREA_FRACTION:
        return f"covers {100 * mask.mean():.0f}% of the image"
    if mask[[0, -1], :].any() or mask[:, [0, -1]].any():
        return "reaches the image border"
    return ""


def warn_if_leaked(mask: np.ndarray, what: str, fix: str) -> None:
    reason = leak_reason(mask)
    if reason:
        warnings.warn(f"{what} leaked out of the lumen: the region {reason}; {fix}",
                      SegmentationWarning, stacklevel=3)


# ----------------------------------------------------------------------------- arrays

#: Pixel types VTK filters take as they are; others (bool, float16, ...) become float32.
_VTK_NATIVE = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32,
                                          np.int32, np.float32, np.float64))


def check_image2d(image) -> np.ndarray:
    """``image`` as an array if it is a finite 2D grey frame; a ValueError naming the problem
    (an RGB picture, a stack, NaN pixels) before any work."""
    image = np.asarray(image)
    if image.ndim != 2:
        hint = " (an RGB picture: pass its grey levels, e.g. image.mean(axis=-1))" \
            if image.ndim == 3 and image.shape[-1] in (3, 4) else "; use segment_sequence for (N, H, W) frames"
        raise ValueError(f"expected a 2D grey image (H, W), got shape {image.shape}{hint}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image {image.shape} is too small to segment")
    check_finite(image, "the image")
    return image


def check_finite(array: np.ndarray, what: str) -> None:
    """A ValueError counting the NaN / infinite pixels of a float ``array``."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{what} has {np.count_nonzero(~np.isfinite(array))} NaN or infinite pixel(s); "
                         "replace them (e.g. np.nan_to_num) before segmenting")


def _as_image2d(image: np.ndarray) -> np.ndarray:
    """A 2D copy in a VTK pixel type (:func:`check_image2d` first). The input's own integer
    type is kept because VTK casts the thresholds to the pixel type, as it does for the volume
    in Slicer."""
    image = check_image2d(image)
    if image.dtype.newbyteorder("=") in _VTK_NATIVE:
        return image.astype(image.dtype.newbyteorder("="), copy=True)
    return image.astype(np.float32)


def _as_mask2d(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask (H, W), got shape {mask.shape}")
    return mask.astype(bool)


def _spacing2(spacing: Sequence[float]) -> Tuple[float, float]:
    row_mm, col_mm = (float(v) for v in spacing)
    if not (row_mm > 0 and col_mm > 0 and np.isfinite(row_mm) and np.isfinite(col_mm)):
        raise ValueError(f"spacing must be two positive numbers (row mm, col mm), got {spacing!r}")
    return row_mm, col_mm


def _disk(shape: Tuple[int, int], center: Tuple[int, int], radius: float) -> np.ndarray:
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius ** 2
