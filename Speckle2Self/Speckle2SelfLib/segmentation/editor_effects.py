"""Slicer's Segment Editor effects on a 2D frame, so that a result here is what a user gets by clicking in Slicer.

* :func:`flood_fill` -- the "Flood filling" effect (SegmentEditorExtraEffects):
  ``vtkImageThresholdConnectivity`` seeded at the clicked voxel, intensity range
  ``seed value +/- tolerance`` (inclusive), neighbourhood radius (the effect's "Neighborhood
  size" slider, which VTK interprets in voxels) and neighbourhood fraction 0.5; no slice range
  limits (a 2D frame is a one-slice volume).
* :func:`grow_from_seeds` -- the "Grow from seeds" effect: ``vtkImageGrowCutSegment`` with a
  lumen seed and background seeds (given, or a ring well outside the flood-fill result plus
  the image border).

VTK is imported lazily; ``vtkImageGrowCutSegment`` comes from slicer-core's ``slicer`` package.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from ..vtkimage import array_from_image, image_from_array
from .masks import (RowCol, _as_image2d, _as_mask2d, _disk, _spacing2, check_seed, warn_if_leaked,
                    warn_if_seed_on_wall)

#: Flood-fill intensity tolerance (8-bit grey levels) for raw B-mode images, tuned by
#: :func:`tune_tolerance` (benchmarks/benchlib/lumen_evaluation.py) over 0..40 on the 260 masked images of the carotid tuning subjects
#: (all but the four test subjects), seed at the expert mask centroid, neighbourhood radius 0:
#: mean IoU 0.344 (radius 1 or 2 px: 0.343 / 0.351, also at 3). Re-tune for despeckled input.
DEFAULT_TOLERANCE = 3.0
#: The same on images despeckled by the bundled default model, whose lumen is smooth: used when
#: `speckle2self segment` despeckles first. Re-tuned for v4 on the 260 tuning
#: images, centroid seed: mean IoU 0.283 / 0.417 / 0.423 / 0.400 / 0.390 at tolerance 0 / 1 / 2 / 3 / 4
#: (1 before, chosen for v1 on 30 tuning images; v3's output scores 0.372 / 0.374 at 1 / 2 on 80).
DESPECKLED_TOLERANCE = 2.0
#: Slicer's flood-fill neighbourhood fraction: a voxel joins if half its neighbourhood is in range.
NEIGHBORHOOD_FRACTION = 0.5

LUMEN_LABEL = 1
BACKGROUND_LABEL = 2


# ----------------------------------------------------------------------------- flood fill

def flood_fill(image2d: np.ndarray, seed_rc: RowCol, tolerance: float = DEFAULT_TOLERANCE,
               neighborhood_radius_px: float = 0.0, spacing: Sequence[float] = (1.0, 1.0),
               neighborhood_radius_mm: Optional[float] = None, check: bool = True) -> np.ndarray:
    """Slicer's "Flood filling" effect on a 2D image: connected pixels within seed +/- tolerance.

    ``neighborhood_radius_px`` is the value of Slicer's "Neighborhood size" slider (Slicer hands
    it to ``vtkImageThresholdConnectivity``, which measures it in voxels); a pixel joins only if
    at least half (``NEIGHBORHOOD_FRACTION``) of the pixels within that radius are in range,
    which stops leaks through thin gaps. ``neighborhood_radius_mm`` (with ``spacing``, (row,
    col) mm) gives the radius physically instead. With ``check`` a seed on a bright wall or a
    fill that leaks (reaches the image border or covers most of the image) raises a
    :class:`SegmentationWarning`. Returns a boolean mask shaped like the image.
    """
    image = _as_image2d(image2d)
    seed = check_seed(seed_rc, image.shape)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    radius = _radius_px(neighborhood_radius_px, neighborhood_radius_mm, spacing)
    if check:
        warn_if_seed_on_wall(image, seed)
    mask = _threshold_connectivity(image, seed, float(tolerance), radius)
    if check:
        warn_if_leaked(mask, "flood fill", "lower --tolerance, despeckle first or use growcut")
    return mask


def _threshold_connectivity(image: np.ndarray, seed: Tuple[int, int], tolerance: float,
                            radius_rc: Tuple[float, float]) -> np.ndarray:
    """vtkImageThresholdConnectivity set up as SegmentEditorFloodFillingEffect sets it up."""
    return _FloodFiller(image, seed, radius_rc).fill(tolerance)



class _FloodFiller:
    """One image and seed, filled at any tolerance (the VTK image is built once for sweeps)."""

    def __init__(self, image: np.ndarray, seed: Tuple[int, int], radius_rc: Tuple[float, float]):
        import vtk

        self.seed_value = float(image[seed])
        self.filter = vtk.vtkImageThresholdConnectivity()
        self.filter.SetInputData(image_from_array(image[None]))
        points = vtk.vtkPoints()
        points.InsertNextPoint(float(seed[1]), float(seed[0]), 0.0)   # (x=col, y=row), unit spacing
        self.filter.SetSeedPoints(points)
        # (x, y, z) radius in voxels. VTK ignores the neighbourhood unless every radius rounds
        # to >= 1, so z gets the in-plane radius as in Slicer (which passes the same value
        # thrice); a one-slice image clips the z range to the plane itself.
        self.filter.SetNeighborhoodRadius(radius_rc[1], radius_rc[0], max(radius_rc))
        self.filter.SetNeighborhoodFraction(NEIGHBORHOOD_FRACTION)
        self.filter.ReplaceInOn()
        self.filter.SetInValue(1)
        self.filter.ReplaceOutOn()
        self.filter.SetOutValue(0)

    def fill(self, tolerance: float) -> np.ndarray:
        self.filter.ThresholdBetween(self.seed_value - tolerance, self.seed_value + tolerance)
        self.filter.Update()
        return _voxels(self.filter.GetOutput())[0].astype(bool)


def _radius_px(radius_px: float, radius_mm: Optional[float], spacing: Sequence[float]) -> Tuple[float, float]:
    if radius_mm is not None:
        row_mm, col_mm = _spacing2(spacing)
        radius_rc = (float(radius_mm) / row_mm, float(radius_mm) / col_mm)
    else:
        radius_rc = (float(radius_px), float(radius_px))
    if min(radius_rc) < 0 or not all(np.isfinite(radius_rc)):
        raise ValueError(f"neighbourhood radius must be >= 0, got {radius_rc} px")
    return radius_rc


# ----------------------------------------------------------------------------- grow from seeds

def grow_from_seeds(image2d: np.ndarray, lumen_seed_rc: RowCol,
                    background_seeds_rc: Optional[Iterable[RowCol]] = None,
                    flood_mask: Optional[np.ndarray] = None, tolerance: float = DEFAULT_TOLERANCE,
                    seed_radius_px: float = 2.0, max_lumen_radius_px: Optional[float] = None,
                    check: bool = True) -> np.ndarray:
    """Slicer's "Grow from seeds" (GrowCut) from a lumen seed; returns the lumen as a bool mask.

    Background seeds are ``background_seeds_rc`` (small disks of ``seed_radius_px``) when
    given, else automatic: a ring around the lumen seed well outside the flood-fill result
    (``flood_mask``, or :func:`flood_fill` at ``tolerance``; clipped to
    ``max_lumen_radius_px``, default a fifth of the smaller image side, so a leaked fill cannot
    push the ring off the image), plus the image border. ``vtkImageGrowCutSegment`` needs at
    least 3 voxels along each axis and never grows from edge voxels, so the frame is padded by
    one pixel in-plane and stacked into a 3-slice volume; the middle slice is the result.
    """
    image = _as_image2d(image2d)
    seed = check_seed(lumen_seed_rc, image.shape)
    if check:
        warn_if_seed_on_wall(image, seed)
    labels = np.zeros(image.shape, np.uint8)
    if background_seeds_rc is not None:
        for bg in background_seeds_rc:
            labels[_disk(image.shape, check_seed(bg, image.shape), seed_radius_px)] = BACKGROUND_LABEL
        if not labels.any():
            raise ValueError("background_seeds_rc is empty; give at least one background seed or None for automatic")
    else:
        if flood_mask is None:
            flood_mask = _threshold_connectivity(image, seed, float(tolerance), (0.0, 0.0))
        labels[automatic_background_seeds(_as_mask2d(flood_mask), seed, max_lumen_radius_px)] = BACKGROUND_LABEL
    lumen = _disk(image.shape, seed, seed_radius_px)
    if (labels[lumen] == BACKGROUND_LABEL).any():
        raise ValueError(f"background seeds overlap the lumen seed at (row={seed[0]}, col={seed[1]}); "
                         "move them away from the lumen")
    labels[lumen] = LUMEN_LABEL
    mask = _growcut(image, labels) == LUMEN_LABEL
    if check:
        warn_if_leaked(mask, "grow from seeds", "add background seeds closer to the wall")
    return mask


def automatic_background_seeds(flood_mask: np.ndarray, seed: Tuple[int, int],
                               max_lumen_radius_px: Optional[float] = None) -> np.ndarray:
    """Background seed mask: the image border plus a 3 px ring around the seed at 1.25x the
    farthest flood-fill pixel's distance (+3 px), so the ring lies outside the lumen wall."""
    h, w = flood_mask.shape
    limit = max_lumen_radius_px if max_lumen_radius_px is not None else min(h, w) / 5.0
    rr, cc = np.ogrid[:h, :w]
    distance = np.sqrt((rr - seed[0]) ** 2 + (cc - seed[1]) ** 2)
    inside = flood_mask & (distance <= limit)
    reach = float(distance[inside].max()) if inside.any() else limit / 4.0
    ring_inner = 1.25 * reach + 3.0
    background = (distance >= ring_inner) & (distance < ring_inner + 3.0)
    background[[0, -1], :] = True
    background[:, [0, -1]] = True
    return background


def _growcut(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Run vtkImageGrowCutSegment on one frame; returns the label of every pixel."""
    import slicer  # slicer-core: Slicer's segmentations logic, no Qt

    padded_image = np.pad(image, 1, mode="edge")
    padded_labels = np.pad(labels, 1)
    volume = np.repeat(padded_image[None], 3, axis=0)
    seeds = np.zeros_like(volume, dtype=np.uint8)
    seeds[1] = padded_labels      # seeds only in the middle slice, the one the result is read from
    grow = slicer.vtkImageGrowCutSegment()
    grow.SetIntensityVolume(image_from_array(volume))
    grow.SetSeedLabelVolume(image_from_array(seeds))
    grow.Update()
    result = _voxels(grow.GetOutput())
    if result.size == 0:
        raise RuntimeError("vtkImageGrowCutSegment produced no output (image too small?)")
    return result[1, 1:-1, 1:-1]


def _voxels(image) -> np.ndarray:
    """(Z, Y, X) voxels of a one-component filter output (empty when it has none)."""
    voxels = array_from_image(image)
    return np.zeros((0, 0, 0)) if voxels is None else voxels[..., 0]
