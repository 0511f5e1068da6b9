"""Carotid lumen segmentation from one seed point: radial boundary, flood fill, grow from seeds.

* :func:`radial_boundary` -- the default ("radial"): a star-shaped boundary around the seed,
  found by dynamic programming over rays (a smooth closed contour on the dark-to-bright
  lumen edge) with an ellipse prior; it bridges gaps in the wall instead of leaking through
  them, and reports why a result is implausible (:func:`radial_reason`). A seed on bright
  tissue raises :class:`SeedNotInLumenError`.

Two more algorithms, the ones 3D Slicer's Segment Editor runs, so that a result here is what
a user gets by clicking in Slicer:

* :func:`flood_fill` -- the "Flood filling" effect (SegmentEditorExtraEffects):
  ``vtkImageThresholdConnectivity`` seeded at the clicked voxel, intensity range
  ``seed value +/- tolerance`` (inclusive), neighbourhood radius (the effect's "Neighborhood
  size" slider, which VTK interprets in voxels) and neighbourhood fraction 0.5; no slice range
  limits (a 2D frame is a one-slice volume).
* :func:`grow_from_seeds` -- the "Grow from seeds" effect: ``vtkImageGrowCutSegment`` with a
  lumen seed and background seeds (given, or a ring well outside the flood-fill result plus
  the image border).

:func:`segment` segments one frame and returns the mask with its measurements (area,
equivalent and ellipse diameters) and a flag with the reason when it is implausible.
:func:`segment_sequence` runs any method on every frame of a cine loop; the seed follows the
lumen centroid of the last accepted frame (whose boundary is the radial method's prior) and
implausible frames are flagged. :func:`evaluate_flood_fill` / :func:`tune_tolerance` are the
carotid benchmark's flood-fill metrics. :func:`add_segment_arguments` / :func:`run_segment`
are the ``speckle2self segment`` command (exit code :data:`EXIT_FLAGGED` when a result is
flagged, unless ``--keep-flagged``).

Coordinates: seeds are ``(row, col)`` pixel indices into ``image[row, col]``; spacings are
``(row spacing, column spacing)`` in mm, i.e. numpy axis order (ITK's ``(x, y)`` reversed).
Inputs are never modified. Only numpy, scipy and VTK (Slicer's ``vtkImageGrowCutSegment`` comes
from slicer-core's ``slicer`` package, imported lazily).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

#: Flood-fill intensity tolerance (8-bit grey levels) for raw B-mode images, tuned by
#: :func:`tune_tolerance` over 0..40 on the 260 masked images of the carotid tuning subjects
#: (all but the four test subjects), seed at the expert mask centroid, neighbourhood radius 0:
#: mean IoU 0.344 (radius 1 or 2 px: 0.343 / 0.351, also at 3). Re-tune for despeckled input.
DEFAULT_TOLERANCE = 3.0
#: The same, tuned (benchmarks/carotid.py, 30 tuning-subject images) on images despeckled by the
#: bundled default model, whose lumen is smooth: used when `speckle2self segment` despeckles first.
DESPECKLED_TOLERANCE = 1.0
#: Slicer's flood-fill neighbourhood fraction: a voxel joins if half its neighbourhood is in range.
NEIGHBORHOOD_FRACTION = 0.5
#: Relative area change between consecutive accepted frames above which a frame is flagged.
MAX_AREA_CHANGE = 0.5
#: A fill covering more than this fraction of the image has leaked out of the lumen.
LEAK_AREA_FRACTION = 0.5
#: Segmentation methods: "radial" (the default: a star-shaped boundary around the seed, robust
#: to wall gaps), and Slicer's own "flood" (flood filling) and "growcut" (grow from seeds).
METHODS = ("radial", "flood", "growcut")
DEFAULT_METHOD = "radial"

#: ``speckle2self segment`` exit code when a result is flagged as implausible (mask not written).
EXIT_FLAGGED = 3

LUMEN_LABEL = 1
BACKGROUND_LABEL = 2

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


def fill_arrival(image: np.ndarray, seed: Tuple[int, int]) -> np.ndarray:
    """For every pixel, the smallest tolerance at which the flood fill from ``seed`` (no
    neighbourhood) includes it: over 4-connected paths from the seed, the least possible
    largest ``|I - I(seed)|`` along the path.

    ``fill_arrival(...) <= t`` is exactly the fill at tolerance ``t`` (tested against VTK), so a
    whole tolerance sweep costs one grey-level reconstruction by erosion instead of one fill
    per tolerance.
    """
    from skimage.morphology import reconstruction

    cost = np.abs(np.asarray(image, np.float64) - float(image[seed]))
    marker = np.full(cost.shape, cost.max())
    marker[seed] = cost[seed]
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)   # VTK's face connectivity in 2D
    return reconstruction(marker, cost, method="erosion", footprint=cross)


def _filler(image: np.ndarray, seed: Tuple[int, int], radius_px: float):
    """Fills at any tolerance: from the arrival map without a neighbourhood, else through VTK."""
    return _ArrivalFiller(image, seed) if radius_px == 0 else _FloodFiller(image, seed, (radius_px,) * 2)


class _ArrivalFiller:
    def __init__(self, image: np.ndarray, seed: Tuple[int, int]):
        self.arrival = fill_arrival(image, seed)

    def fill(self, tolerance: float) -> np.ndarray:
        return self.arrival <= tolerance


class _FloodFiller:
    """One image and seed, filled at any tolerance (the VTK image is built once for sweeps)."""

    def __init__(self, image: np.ndarray, seed: Tuple[int, int], radius_rc: Tuple[float, float]):
        import vtk

        self.seed_value = float(image[seed])
        self.filter = vtk.vtkImageThresholdConnectivity()
        self.filter.SetInputData(_vtk_image(image[None]))
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
        return _numpy_from_vtk(self.filter.GetOutput())[0].astype(bool)


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
    grow.SetIntensityVolume(_vtk_image(volume))
    grow.SetSeedLabelVolume(_vtk_image(seeds))
    grow.Update()
    result = _numpy_from_vtk(grow.GetOutput())
    if result.size == 0:
        raise RuntimeError("vtkImageGrowCutSegment produced no output (image too small?)")
    return result[1, 1:-1, 1:-1]


# ----------------------------------------------------------------------------- radial boundary (default)

#: Rays cast from the seed: the contour's angular resolution (2.8 degrees).
RADIAL_RAYS = 128
#: Gaussian smoothing (px) of the image before the rays sample it (speckle grains are ~2 px).
RADIAL_SIGMA_PX = 2.0
#: Width (px) of the dark and bright windows whose mean difference is a ray's edge strength.
RADIAL_EDGE_WIDTH_PX = 4
#: Largest radius change (px) between neighbouring rays, and its cost per px (angular smoothness).
RADIAL_MAX_STEP_PX = 3
RADIAL_SMOOTHNESS = 0.05
#: Weight of the cost of bright pixels inside the contour (stops the boundary at the first wall).
RADIAL_INSIDE_WEIGHT = 1.0
#: Weight of the ellipse prior (second pass): relative radial deviation squared, per ray.
RADIAL_ELLIPSE_WEIGHT = 2.0
#: Weight of a given prior boundary (the previous frame's in a sequence).
RADIAL_PRIOR_WEIGHT = 2.0
#: The contour is moved this far (px) outwards from the steepest dark-to-bright transition,
#: where experts draw the lumen boundary (the intima) on the carotid tuning subjects.
RADIAL_OFFSET_PX = 2.0
#: Default largest lumen radius, as a fraction of the image's smaller side.
RADIAL_MAX_RADIUS_FRACTION = 0.3
#: Plausibility: least fraction of rays whose boundary is a dark-to-bright edge, and largest
#: inside / outside-ring grey-level ratio (a lumen is much darker than its wall).
MIN_EDGE_SUPPORT = 0.5
MAX_INSIDE_OUTSIDE_RATIO = 0.6
#: A seed whose neighbourhood is brighter than this fraction of the way from the darkest to the
#: brightest grey levels around it (5th..95th percentile within the search radius) is not in a lumen.
SEED_BRIGHTNESS_LIMIT = 0.4
_MIN_RADIUS_PX = 4
_OUTSIDE_COST = 10.0
_EDGE_THRESHOLD = 0.15


class SeedNotInLumenError(ValueError):
    """The seed is on bright tissue, not in a dark lumen: no mask is made."""


@dataclass
class RadialContour:
    """A star-shaped lumen boundary found by :func:`radial_boundary`, and its quality."""

    mask: np.ndarray                        # (H, W) bool
    centre_rc: Tuple[float, float]          # the rays' origin (row, col), px
    angles: np.ndarray                      # (rays,) radians; direction (sin a, cos a) in (row, col)
    radii_px: np.ndarray                    # (rays,) boundary distance from the centre
    edge_support: float                     # fraction of rays whose boundary is a dark-to-bright edge
    inside_outside_ratio: float             # median grey inside / median of a ring just outside
    reason: str = ""                        # why the result is implausible ('' if plausible)

    @property
    def flagged(self) -> bool:
        return bool(self.reason)

    def points_rc(self) -> np.ndarray:
        """(rays, 2) boundary points (row, col)."""
        return np.stack([self.centre_rc[0] + self.radii_px * np.sin(self.angles),
                         self.centre_rc[1] + self.radii_px * np.cos(self.angles)], axis=1)


def radial_segment(image2d: np.ndarray, seed_rc: RowCol, check: bool = True, **options) -> np.ndarray:
    """The default one-click lumen segmentation: the mask of :func:`radial_boundary`.

    Raises :class:`SeedNotInLumenError` for a seed on bright tissue. With ``check`` an
    implausible result (see :func:`radial_boundary`) raises a :class:`SegmentationWarning`
    naming the reason; :func:`segment` returns the reason with the mask instead.
    """
    contour = radial_boundary(image2d, seed_rc, **options)
    if check and contour.reason:
        warnings.warn(f"radial lumen boundary is implausible: {contour.reason}", SegmentationWarning, stacklevel=2)
    return contour.mask


def radial_boundary(image2d: np.ndarray, seed_rc: RowCol, *, prior_mask: Optional[np.ndarray] = None,
                    max_radius_px: Optional[float] = None, rays: int = RADIAL_RAYS,
                    sigma_px: float = RADIAL_SIGMA_PX, edge_width_px: int = RADIAL_EDGE_WIDTH_PX,
                    max_step_px: int = RADIAL_MAX_STEP_PX, smoothness: float = RADIAL_SMOOTHNESS,
                    inside_weight: float = RADIAL_INSIDE_WEIGHT, ellipse_weight: float = RADIAL_ELLIPSE_WEIGHT,
                    prior_weight: float = RADIAL_PRIOR_WEIGHT, offset_px: float = RADIAL_OFFSET_PX,
                    check_seed_brightness: bool = True) -> RadialContour:
    """Star-shaped lumen boundary around a seed, robust to gaps in the wall.

    Rays are cast from the seed through the smoothed image. On each ray every radius gets a
    cost: minus the dark-to-bright edge strength there (mean of ``edge_width_px`` px outside
    minus inside, relative to the lumen-to-tissue contrast), plus ``inside_weight`` times the
    bright grey levels the ray has crossed to get there (the boundary does not jump over a wall).
    Dynamic programming over the rays (closed by running three turns and keeping the middle
    one) picks the cheapest contour whose radius changes by at most ``max_step_px`` between
    neighbouring rays, at ``smoothness`` per px: where the wall has a gap (no echo), the contour
    bridges it from its neighbours instead of running into the tissue behind it.

    A second pass starts from the centre of an ellipse fitted to the first contour (weighted by
    each ray's edge strength, so gaps do not bend it), with that ellipse as a prior
    (``ellipse_weight``): the result hardly depends on where in the lumen the seed was.
    ``prior_mask`` (the previous frame's lumen in a sequence) is a prior for the first pass.

    Raises :class:`SeedNotInLumenError` when the seed's neighbourhood is bright (on a wall or
    bright tissue; disable with ``check_seed_brightness``). ``reason`` names what makes the
    result implausible: a contour that reaches the image border, few rays on an edge, or an
    inside that is not much darker than the ring just outside.
    """
    from scipy import ndimage

    image = _as_image2d(image2d).astype(np.float32)
    seed = check_seed(seed_rc, image.shape)
    h, w = image.shape
    limit = RADIAL_MAX_RADIUS_FRACTION * min(h, w) if max_radius_px is None else float(max_radius_px)
    if not (np.isfinite(limit) and limit > 2 * _MIN_RADIUS_PX):
        raise ValueError(f"max_radius_px must be > {2 * _MIN_RADIUS_PX} px, got {limit:g}")
    if rays < 8:
        raise ValueError(f"rays must be >= 8, got {rays}")
    length = int(math.ceil(limit))
    # Smooth only the part of the image the rays can reach (both passes), in float.
    margin = 2 * length + int(3 * sigma_px) + 2
    r0, r1 = max(seed[0] - margin, 0), min(seed[0] + margin + 1, h)
    c0, c1 = max(seed[1] - margin, 0), min(seed[1] + margin + 1, w)
    crop = image[r0:r1, c0:c1]
    smooth = ndimage.gaussian_filter(crop, sigma_px) if sigma_px > 0 else crop
    local_seed = (seed[0] - r0, seed[1] - c0)
    if check_seed_brightness:
        _check_seed_in_dark(smooth, local_seed, length, seed)
    angles = 2 * np.pi * np.arange(rays) / rays
    weights = dict(edge_width=int(edge_width_px), max_step=int(max_step_px), smoothness=float(smoothness),
                   inside_weight=float(inside_weight))
    prior = None
    if prior_mask is not None:
        prior_mask = _as_mask2d(prior_mask)
        if prior_mask.shape != image.shape:
            raise ValueError(f"prior_mask shape {prior_mask.shape} differs from image shape {image.shape}")
        if prior_mask.any():
            prior = (_mask_radii(prior_mask[r0:r1, c0:c1], local_seed, angles, length), float(prior_weight))
    centre = (float(local_seed[0]), float(local_seed[1]))
    radii, profiles, edge, inside = _radial_pass(smooth, centre, angles, length, prior, **weights)
    support = _ray_support(edge, radii)
    ellipse = _fit_ellipse(centre, angles, radii, support)
    if ellipse is not None and ellipse_weight > 0:
        if _inside_star(ellipse[0], centre, angles, radii):
            centre = ellipse[0]
        prior = (_ellipse_radii(ellipse, centre, angles), float(ellipse_weight))
        radii, profiles, edge, inside = _radial_pass(smooth, centre, angles, length, prior, **weights)
        support = _ray_support(edge, radii)
    boundary = np.maximum(radii + float(offset_px), 1.0)
    local_mask = _star_mask(smooth.shape, centre, angles, boundary)
    mask = np.zeros(image.shape, bool)
    mask[r0:r1, c0:c1] = local_mask
    ratio = _inside_outside_ratio(profiles, radii, inside, int(edge_width_px))
    contour = RadialContour(mask, (centre[0] + r0, centre[1] + c0), angles, boundary,
                            float(np.mean(support > _EDGE_THRESHOLD)), ratio)
    just_outside = np.minimum(radii + int(edge_width_px), length - 1)
    contour.reason = radial_reason(contour, reached_border=bool((~inside[np.arange(rays), just_outside]).any()))
    return contour


def radial_reason(contour: RadialContour, reached_border: bool = False) -> str:
    """Why a radial contour is implausible ('' if it is not)."""
    leak = leak_reason(contour.mask)
    if leak:
        return f"leaked: {leak}"
    if reached_border:
        return "the boundary runs to the edge of the image; the lumen may be cut off"
    if contour.edge_support < MIN_EDGE_SUPPORT:
        return (f"weak boundary: only {100 * contour.edge_support:.0f}% of the contour lies on a "
                f"dark-to-bright edge (needs {100 * MIN_EDGE_SUPPORT:.0f}%)")
    if not contour.inside_outside_ratio <= MAX_INSIDE_OUTSIDE_RATIO:
        return (f"not a dark lumen: the inside is {100 * contour.inside_outside_ratio:.0f}% as bright as "
                f"its surroundings (at most {100 * MAX_INSIDE_OUTSIDE_RATIO:.0f}%)")
    return ""


def _check_seed_in_dark(smooth: np.ndarray, seed: Tuple[int, int], radius: int,
                        shown_seed: Tuple[int, int]) -> None:
    """SeedNotInLumenError unless the seed's 5x5 neighbourhood is dark for its surroundings
    (``shown_seed``: the seed as the message names it, in the whole image)."""
    r, c = seed
    window = smooth[max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1]
    low, high = (float(v) for v in np.percentile(window, [5, 95]))
    local = float(np.median(smooth[max(r - 2, 0):r + 3, max(c - 2, 0):c + 3]))
    if high > low and (local - low) / (high - low) > SEED_BRIGHTNESS_LIMIT:
        raise SeedNotInLumenError(
            f"the seed (row={shown_seed[0]}, col={shown_seed[1]}, i.e. x={shown_seed[1]}, y={shown_seed[0]}) is on "
            f"bright tissue (grey level {local:.0f}; the darkest nearby is {low:.0f}, the brightest {high:.0f}), "
            "not in a dark lumen: place the seed inside the vessel lumen")


def _radial_pass(smooth, centre, angles, length, prior, edge_width, max_step, smoothness, inside_weight):
    """One dynamic-programming pass: (radii, profiles, edge strength, in-image samples)."""
    from scipy import ndimage

    radius = np.arange(length, dtype=np.float64)
    rows = centre[0] + radius[None] * np.sin(angles)[:, None]
    cols = centre[1] + radius[None] * np.cos(angles)[:, None]
    inside = (rows >= 0) & (rows <= smooth.shape[0] - 1) & (cols >= 0) & (cols <= smooth.shape[1] - 1)
    profiles = ndimage.map_coordinates(smooth, [rows, cols], order=1, mode="nearest")
    lumen = float(np.median(profiles[:, :_MIN_RADIUS_PX + 1]))
    contrast = max(float(np.percentile(profiles[inside], 90)) - lumen, 1e-3)
    edge = (_window_mean(profiles, 1, 1 + edge_width) - _window_mean(profiles, -edge_width, 0)) / contrast
    cost = -np.clip(edge, -1.0, 1.0)
    if inside_weight:
        bright = np.maximum(profiles - (lumen + 0.5 * contrast), 0.0) / contrast
        cost += inside_weight * np.cumsum(bright, axis=1) / edge_width
    if prior is not None:
        prior_radii, weight = prior
        scale = np.maximum(prior_radii, 1.0)[:, None]
        cost += weight * ((radius[None] - prior_radii[:, None]) / scale) ** 2
    cost[:, :_MIN_RADIUS_PX] = _OUTSIDE_COST
    cost[~inside] = _OUTSIDE_COST
    return _closed_path(cost, max_step, smoothness), profiles, edge, inside


def _window_mean(profiles: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Mean of profiles[:, r + start : r + stop] for every r (clipped to the ray)."""
    n, length = profiles.shape
    csum = np.concatenate([np.zeros((n, 1)), np.cumsum(profiles, axis=1)], axis=1)
    r = np.arange(length)
    lo, hi = np.clip(r + start, 0, length), np.clip(r + stop, 0, length)
    return (csum[:, hi] - csum[:, lo]) / np.maximum(hi - lo, 1)


def _closed_path(cost: np.ndarray, max_step: int, smoothness: float) -> np.ndarray:
    """Cheapest radius per ray (rows of ``cost``) with |r_i - r_(i-1)| <= max_step at
    ``smoothness`` per px; closed by solving three turns and keeping the middle one."""
    n, length = cost.shape
    steps = np.arange(-max_step, max_step + 1)
    penalty = (smoothness * np.abs(steps))[:, None]
    source = steps[:, None] + max_step + np.arange(length)[None]   # index into the padded row
    padded = np.full(length + 2 * max_step, np.inf)
    columns = np.arange(length)
    back = np.zeros((3 * n, length), np.int16)
    total = cost[0].copy()
    for i in range(1, 3 * n):
        padded[max_step:max_step + length] = total
        candidates = padded[source] + penalty
        best = np.argmin(candidates, axis=0)
        total = cost[i % n] + candidates[best, columns]
        back[i] = steps[best]
    path = np.empty(3 * n, int)
    path[-1] = int(np.argmin(total))
    for i in range(3 * n - 1, 0, -1):
        path[i - 1] = path[i] + back[i, path[i]]
    return path[n:2 * n]


def _ray_support(edge: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return np.clip(edge[np.arange(len(radii)), radii], 0.0, 1.0)


def _star_mask(shape: Tuple[int, int], centre: Tuple[float, float], angles: np.ndarray,
               radii: np.ndarray) -> np.ndarray:
    """Pixels within the star-shaped contour (radius interpolated linearly between rays)."""
    h, w = shape
    reach = float(np.max(radii)) + 1.0
    r0, r1 = max(int(centre[0] - reach), 0), min(int(centre[0] + reach) + 2, h)
    c0, c1 = max(int(centre[1] - reach), 0), min(int(centre[1] + reach) + 2, w)
    mask = np.zeros(shape, bool)
    if r0 >= r1 or c0 >= c1:
        return mask
    rr, cc = np.mgrid[r0:r1, c0:c1]
    dy, dx = rr - centre[0], cc - centre[1]
    position = np.mod(np.arctan2(dy, dx), 2 * np.pi) / (2 * np.pi) * len(angles)
    below = np.floor(position).astype(int) % len(angles)
    frac = position - np.floor(position)
    limit = radii[below] * (1 - frac) + radii[(below + 1) % len(angles)] * frac
    mask[r0:r1, c0:c1] = np.hypot(dy, dx) <= limit
    return mask


def _inside_star(point, centre, angles, radii) -> bool:
    """Whether ``point`` (row, col) lies inside the star-shaped contour around ``centre``."""
    dy, dx = point[0] - centre[0], point[1] - centre[1]
    position = (math.atan2(dy, dx) % (2 * math.pi)) / (2 * math.pi) * len(angles)
    below = int(position) % len(angles)
    frac = position - math.floor(position)
    return math.hypot(dy, dx) < radii[below] * (1 - frac) + radii[(below + 1) % len(angles)] * frac


def _mask_radii(mask: np.ndarray, centre: Tuple[int, int], angles: np.ndarray, length: int) -> np.ndarray:
    """Distance along each ray from ``centre`` to where the mask ends (a prior boundary)."""
    from scipy import ndimage

    radius = np.arange(length, dtype=np.float64)
    rows = centre[0] + radius[None] * np.sin(angles)[:, None]
    cols = centre[1] + radius[None] * np.cos(angles)[:, None]
    samples = ndimage.map_coordinates(mask.astype(np.float32), [rows, cols], order=1, mode="constant") >= 0.5
    first_out = np.where(samples.all(axis=1), length - 1, np.argmin(samples, axis=1))
    return first_out.astype(np.float64)


def _fit_ellipse(centre, angles, radii, weights):
    """Ellipse through the contour points, least squares weighted by edge strength:
    ((centre row, col), A) with the ellipse {x: (x - c)^T A (x - c) = 1}; None if degenerate."""
    if np.count_nonzero(weights > _EDGE_THRESHOLD) < 6:
        return None
    y = radii * np.sin(angles)      # rows, relative to the centre
    x = radii * np.cos(angles)
    scale = max(float(np.sqrt(np.mean(x ** 2 + y ** 2))), 1.0)
    x, y = x / scale, y / scale
    design = np.stack([y * y, x * y, x * x, y, x], axis=1)
    sw = weights + 1e-3               # square-root weights: the fit is weighted by edge strength squared
    coef, *_ = np.linalg.lstsq(design * sw[:, None], sw, rcond=None)
    a, b, c, d, e = coef
    quad = np.array([[a, b / 2], [b / 2, c]])
    if np.linalg.det(quad) <= 0:
        return None
    offset = -0.5 * np.linalg.solve(quad, [d, e])
    k = 1.0 + offset @ quad @ offset
    shape = quad / k
    eig = np.linalg.eigvalsh(shape)
    if k <= 0 or eig.min() <= 0:
        return None
    semi = 1.0 / np.sqrt(eig)                  # in units of scale
    if semi.min() / semi.max() < 0.3 or semi.max() * scale > 2.0 * np.max(radii):
        return None
    centre_rc = (centre[0] + offset[0] * scale, centre[1] + offset[1] * scale)
    return centre_rc, shape / scale ** 2


def _ellipse_radii(ellipse, centre, angles) -> np.ndarray:
    """Distance along each ray from ``centre`` (inside the ellipse) to the ellipse."""
    ellipse_centre, shape = ellipse
    direction = np.stack([np.sin(angles), np.cos(angles)], axis=1)
    origin = np.asarray(centre, float) - np.asarray(ellipse_centre, float)
    qa = np.einsum("ni,ij,nj->n", direction, shape, direction)
    qb = 2 * direction @ (shape @ origin)
    qc = origin @ shape @ origin - 1.0
    return (-qb + np.sqrt(np.maximum(qb * qb - 4 * qa * qc, 0.0))) / (2 * qa)


def _inside_outside_ratio(profiles, radii, in_image, width) -> float:
    """Median grey level inside the contour over the median of a ring of ``2 width`` px just
    outside it, from the ray samples."""
    n, length = profiles.shape
    r = np.arange(length)[None]
    inner = (r < radii[:, None]) & in_image
    ring = (r > radii[:, None] + 1) & (r <= radii[:, None] + 1 + 2 * width) & in_image
    if not inner.any() or not ring.any():
        return math.nan
    outside = float(np.median(profiles[ring]))
    return float(np.median(profiles[inner])) / outside if outside > 0 else math.inf


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


# ----------------------------------------------------------------------------- one frame / sequences

def segment_frame(image2d: np.ndarray, seed_rc: RowCol, method: str = DEFAULT_METHOD,
                  tolerance: float = DEFAULT_TOLERANCE, check: bool = True, **options) -> np.ndarray:
    """Lumen mask of one frame with ``method`` "radial" (:func:`radial_segment`, the default),
    "flood" (:func:`flood_fill`) or "growcut" (:func:`grow_from_seeds`); ``tolerance`` is the
    flood fill's (radial ignores it). :func:`segment` also returns measurements and flags."""
    if method == "radial":
        return radial_segment(image2d, seed_rc, check=check, **options)
    if method == "flood":
        return flood_fill(image2d, seed_rc, tolerance, check=check, **options)
    if method == "growcut":
        return grow_from_seeds(image2d, seed_rc, tolerance=tolerance, check=check, **options)
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


@dataclass
class LumenFrame:
    """One frame's lumen: the mask, its measurements and, if implausible, why."""

    mask: np.ndarray                        # (H, W) bool
    measurement: Measurement
    seed_rc: Tuple[int, int]
    reason: str = ""                        # '' when plausible, else why not to trust the mask

    @property
    def flagged(self) -> bool:
        return bool(self.reason)


def segment(image2d: np.ndarray, seed_rc: RowCol, method: str = DEFAULT_METHOD,
            spacing_mm: Sequence[float] = (1.0, 1.0), tolerance: float = DEFAULT_TOLERANCE,
            prior_mask: Optional[np.ndarray] = None, **options) -> LumenFrame:
    """One-click lumen segmentation of a 2D frame: mask, measurements and plausibility.

    ``method``: "radial" (default, :func:`radial_boundary`), "flood" or "growcut" (Slicer's
    effects, ``tolerance`` in grey levels). Never returns an implausible mask silently: the
    result's ``reason`` says why it should not be trusted (leak, weak boundary, not a dark
    lumen, empty). A radial seed on bright tissue raises :class:`SeedNotInLumenError`.
    ``prior_mask`` (radial only) is a previous boundary to stay close to.
    """
    seed = check_seed(seed_rc, np.shape(image2d))
    mask, reason = _segment_checked(image2d, seed, method, tolerance, options, prior_mask)
    m = measure(mask, spacing_mm)
    if m.area_px == 0 and not reason:
        reason = "empty mask"
    return LumenFrame(mask, m, seed, reason)


def _segment_checked(image2d, seed, method, tolerance, options, prior_mask=None) -> Tuple[np.ndarray, str]:
    """(mask, reason it is implausible or '') without warnings."""
    if method == "radial":
        contour = radial_boundary(image2d, seed, prior_mask=prior_mask, **options)
        return contour.mask, contour.reason
    if prior_mask is not None:
        raise ValueError(f"prior_mask is used by the radial method only, not {method!r}")
    mask = segment_frame(image2d, seed, method, tolerance, check=False, **options)
    leak = leak_reason(mask)
    return mask, f"leaked: {leak}" if leak else ""


@dataclass
class SequenceResult:
    """Per-frame lumen masks, seeds, measurements and quality flags of a cine loop."""

    masks: np.ndarray                       # (N, H, W) bool
    seeds_rc: np.ndarray                    # (N, 2) int: the seed each frame was grown from
    measurements: List[Measurement]
    flagged: np.ndarray                     # (N,) bool: implausible frame, do not trust
    flag_reasons: List[str] = field(default_factory=list)   # '' for accepted frames

    @property
    def areas_mm2(self) -> np.ndarray:
        return np.array([m.area_mm2 for m in self.measurements])

    @property
    def diameters_mm(self) -> np.ndarray:
        return np.array([m.equivalent_diameter_mm for m in self.measurements])


def segment_sequence(frames: np.ndarray, seed_rc: RowCol, method: str = DEFAULT_METHOD,
                     tolerance: float = DEFAULT_TOLERANCE, spacing_mm: Sequence[float] = (1.0, 1.0),
                     start_frame: int = 0, max_area_change: float = MAX_AREA_CHANGE,
                     frames_to_segment: Optional[Iterable[int]] = None, **options) -> SequenceResult:
    """Segment every frame of (N, H, W) ``frames``, starting at ``start_frame`` with ``seed_rc``
    and going forwards, then backwards from it.

    Each frame is seeded at the lumen centroid of the last accepted frame (the lumen moves with
    the probe and pulsates); with the radial method that frame's boundary is also the prior
    (``prior_mask`` of :func:`radial_boundary`). A frame is flagged -- kept in ``masks`` but
    marked in ``flagged`` with a reason, and not used to seed the next one -- when its mask is
    empty, implausible (a leak, see :func:`leak_reason`; for radial also :func:`radial_reason`;
    a seed that fell on bright tissue), or its area differs from the last accepted frame's by
    more than ``max_area_change`` (0.5 = 50%). ``frames_to_segment`` limits the work to some
    frames (others stay empty and unflagged). ``options`` go to the method's function.
    A radial seed on bright tissue in the start frame raises :class:`SeedNotInLumenError`.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W), got shape {frames.shape}")
    n = frames.shape[0]
    if not 0 <= start_frame < n:
        raise ValueError(f"start_frame {start_frame} is outside 0..{n - 1}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    start_seed = check_seed(seed_rc, frames.shape)
    if method != "radial":       # radial refuses such a seed with SeedNotInLumenError instead
        warn_if_seed_on_wall(_as_image2d(frames[start_frame]), start_seed)
    wanted = set(range(n)) if frames_to_segment is None else {int(k) for k in frames_to_segment}
    result = SequenceResult(np.zeros(frames.shape, bool), np.full((n, 2), -1, int),
                            [measure(np.zeros(frames.shape[1:], bool), spacing_mm)] * n,
                            np.zeros(n, bool), [""] * n)
    run = dict(method=method, tolerance=tolerance, spacing_mm=spacing_mm,
               max_area_change=max_area_change, options=options)
    start_state = _Track(start_seed)
    if start_frame in wanted:
        start_state = _segment_into(result, frames, start_frame, start_state, first=True, **run)
    for order in (range(start_frame + 1, n), range(start_frame - 1, -1, -1)):
        state = start_state
        for k in order:
            if k in wanted:
                state = _segment_into(result, frames, k, state, first=False, **run)
    return result


@dataclass(frozen=True)
class _Track:
    """What the next frame starts from: the last accepted frame's centroid, area and mask."""

    seed: Tuple[int, int]
    area_mm2: Optional[float] = None
    mask: Optional[np.ndarray] = None


def _segment_into(result: SequenceResult, frames: np.ndarray, k: int, state: _Track, first: bool,
                  method: str, tolerance: float, spacing_mm: Sequence[float], max_area_change: float,
                  options: dict) -> _Track:
    """Segment frame k into ``result``; return the state for the next frame: the new centroid,
    area and mask if the frame is accepted, else the ones it was given."""
    prior = state.mask if method == "radial" else None
    try:
        mask, reason = _segment_checked(frames[k], state.seed, method, tolerance, options, prior)
    except SeedNotInLumenError as err:
        if first:
            raise
        mask, reason = np.zeros(frames.shape[1:], bool), f"lost the lumen: {err}"
    m = measure(mask, spacing_mm)
    reason = reason or _flag_reason(mask, m, state.area_mm2, max_area_change)
    result.masks[k], result.seeds_rc[k], result.measurements[k] = mask, state.seed, m
    result.flagged[k], result.flag_reasons[k] = bool(reason), reason
    if reason:
        return state
    return _Track(seed_from_mask(mask), m.area_mm2, mask)


def _flag_reason(mask: np.ndarray, m: Measurement, reference_area: Optional[float],
                 max_area_change: float) -> str:
    if m.area_px == 0:
        return "empty mask"
    leak = leak_reason(mask)
    if leak:
        return f"leaked: {leak}"
    if reference_area:
        change = m.area_mm2 / reference_area - 1.0
        if abs(change) > max_area_change:
            return f"area changed {100 * change:+.0f}% vs the previous accepted frame"
    return ""


# ----------------------------------------------------------------------------- evaluation

def default_tolerance_sweep(image: np.ndarray, steps: int = 256) -> np.ndarray:
    """Tolerances from 0 to the image's grey range (the last fills everything): every integer
    for integer-valued images with at most ``steps`` grey levels (each distinct fill exactly
    once for 8-bit images), else ``steps`` evenly spaced values."""
    image = np.asarray(image, dtype=np.float64)
    grey_range = float(image.max() - image.min())
    if grey_range < steps and np.array_equal(image, np.round(image)):
        return np.arange(0.0, grey_range + 1.0)
    return np.linspace(0.0, grey_range, steps)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def flood_fill_roc(image: np.ndarray, mask: np.ndarray, tolerances: Optional[Sequence[float]] = None,
                   seed_rc: Optional[RowCol] = None, neighborhood_radius_px: float = 0.0
                   ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of the flood fill against a reference mask over a tolerance sweep.

    For each tolerance t (default :func:`default_tolerance_sweep`: 0..255 for 8-bit images) the fill F_t
    from the seed (default :func:`seed_from_mask`) gives TPR = |F_t & M| / |M| and
    FPR = |F_t & ~M| / |~M|. Returns (fpr, tpr, tolerances) sorted by tolerance.
    """
    image, mask, filler = _evaluation_setup(image, mask, seed_rc, neighborhood_radius_px)
    return _roc(filler, image, mask, tolerances)


def _evaluation_setup(image, mask, seed_rc, neighborhood_radius_px):
    """Checked image and mask, and a filler from the given seed (default: the mask centroid)."""
    image = _as_image2d(image)
    mask = _as_mask2d(mask)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    seed = seed_from_mask(mask) if seed_rc is None else check_seed(seed_rc, image.shape)
    return image, mask, _filler(image, seed, neighborhood_radius_px)


def _roc(filler, image: np.ndarray, mask: np.ndarray, tolerances: Optional[Sequence[float]]):
    tolerances = default_tolerance_sweep(image) if tolerances is None else np.sort(np.asarray(tolerances, float))
    positives, negatives = max(np.count_nonzero(mask), 1), max(np.count_nonzero(~mask), 1)
    tpr, fpr = np.empty(len(tolerances)), np.empty(len(tolerances))
    for i, t in enumerate(tolerances):
        fill = filler.fill(float(t))
        tpr[i] = np.count_nonzero(fill & mask) / positives
        fpr[i] = np.count_nonzero(fill & ~mask) / negatives
    return fpr, tpr, tolerances


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under (FPR, TPR) points closed with (0, 0) and (1, 1)."""
    order = np.lexsort((tpr, fpr))
    x = np.concatenate([[0.0], np.asarray(fpr)[order], [1.0]])
    y = np.concatenate([[0.0], np.asarray(tpr)[order], [1.0]])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def evaluate_flood_fill(image: np.ndarray, mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                        tolerances: Optional[Sequence[float]] = None, seed_rc: Optional[RowCol] = None,
                        neighborhood_radius_px: float = 0.0) -> Tuple[float, float]:
    """(IoU, AUC) of the flood fill seeded at the mask centroid (:func:`seed_from_mask`).

    IoU: the fill at ``tolerance`` vs the mask. AUC: the area under the ROC curve that the fill
    traces as its tolerance sweeps ``tolerances`` (default every grey level from 0 to the image's
    range for 8-bit images, see :func:`flood_fill_roc`), closed with (0, 0) and (1, 1) -- the fill is nested in
    t, so the curve is monotone; AUC 0.5 is a fill that grows no better than chance.
    """
    # One filler serves the IoU and the whole sweep (one arrival map instead of a fill per tolerance).
    image, mask, filler = _evaluation_setup(image, mask, seed_rc, neighborhood_radius_px)
    fpr, tpr, _ = _roc(filler, image, mask, tolerances)
    return iou(filler.fill(float(tolerance)), mask), roc_auc(fpr, tpr)


def iou_table(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], tolerances: Sequence[float],
              neighborhood_radius_px: float = 0.0) -> np.ndarray:
    """(n_images, n_tolerances) flood-fill IoU, seed at each mask's centroid."""
    if len(images) != len(masks):
        raise ValueError(f"{len(images)} images but {len(masks)} masks")
    table = np.empty((len(images), len(tolerances)))
    for i, (image, mask) in enumerate(zip(images, masks)):
        image, mask = _as_image2d(image), _as_mask2d(mask)
        filler = _filler(image, seed_from_mask(mask), neighborhood_radius_px)
        for j, t in enumerate(tolerances):
            table[i, j] = iou(filler.fill(float(t)), mask)
    return table


def tune_tolerance(images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                   tolerances: Sequence[float], neighborhood_radius_px: float = 0.0) -> float:
    """The tolerance with the best mean flood-fill IoU over the images (seed at mask centroid);
    ties go to the smaller tolerance."""
    if len(tolerances) == 0 or len(images) == 0:
        raise ValueError("tune_tolerance needs at least one image and one tolerance")
    mean_iou = iou_table(images, masks, tolerances, neighborhood_radius_px).mean(axis=0)
    return float(np.asarray(tolerances, float)[int(np.argmax(mean_iou))])


# ----------------------------------------------------------------------------- VTK <-> numpy

def _vtk_image(array3d: np.ndarray):
    """(Z, Y, X) numpy -> vtkImageData with unit spacing and zero origin (a deep copy)."""
    import vtk
    from vtk.util import numpy_support

    array3d = np.ascontiguousarray(array3d)
    image = vtk.vtkImageData()
    image.SetDimensions(array3d.shape[2], array3d.shape[1], array3d.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array3d.ravel(), deep=True))
    return image


def _numpy_from_vtk(image) -> np.ndarray:
    from vtk.util import numpy_support

    x, y, z = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((0, 0, 0))
    return numpy_support.vtk_to_numpy(scalars).reshape(z, y, x).copy()


#: Pixel types VTK filters take as they are; others (bool, float16, ...) become float32.
_VTK_NATIVE = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32,
                                          np.int32, np.float32, np.float64))


def _as_image2d(image: np.ndarray) -> np.ndarray:
    """A 2D copy in a VTK pixel type. The input's own integer type is kept because VTK casts
    the thresholds to the pixel type, as it does for the volume in Slicer."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D grey image (H, W), got shape {image.shape}; "
                         "use segment_sequence for (N, H, W) frames")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"image {image.shape} is too small to segment")
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


# ----------------------------------------------------------------------------- command line

def add_segment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``speckle2self segment IN --seed X,Y --out MASK [...]``."""
    parser.add_argument("input", help="image (PNG/JPEG/TIFF), volume or sequence (.mha/.nrrd/.nii.gz) or DICOM")
    seed = parser.add_mutually_exclusive_group(required=True)
    seed.add_argument("--seed", metavar="X,Y", type=_parse_floats(2),
                      help="a pixel inside the lumen: X = column, Y = row, as image viewers show them")
    seed.add_argument("--seed-ras", metavar="R,A,S", type=_parse_floats(3),
                      help="a point inside the lumen in RAS mm, as Slicer shows it (its frame is the seed's frame)")
    parser.add_argument("--frame", type=int, default=None, metavar="K",
                        help="segment only frame K of a multi-frame input (default: every frame, the seed "
                             "following the lumen from frame 0 or the --seed-ras frame)")
    parser.add_argument("--out", required=True, metavar="MASK",
                        help="mask file in the input's format and geometry: .png/.dcm (0/255), "
                             ".mha/.nrrd/.nii.gz (0/1 labels)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help="radial (default): a smooth closed boundary around the seed that does not leak "
                             "through gaps in the wall; flood: Slicer's flood filling; growcut: Slicer's grow from seeds")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"flood / growcut intensity tolerance in the input's grey levels (default "
                             f"{DESPECKLED_TOLERANCE:g} on despeckled data, {DEFAULT_TOLERANCE:g} with --no-despeckle)")
    parser.add_argument("--keep-flagged", action="store_true",
                        help=f"write the mask even when a frame is flagged as implausible (leak, weak boundary, "
                             f"...); without it such a result is not written and the exit code is {EXIT_FLAGGED}")
    parser.add_argument("--neighborhood", type=float, default=0.0, metavar="PX",
                        help="flood-fill neighbourhood radius in pixels, Slicer's 'Neighborhood size' (default 0)")
    parser.add_argument("--no-despeckle", action="store_true", help="segment the input as it is")
    parser.add_argument("--model", default=None, help="despeckling model file (default: the bundled model)")
    return parser


def run_segment(args: argparse.Namespace) -> int:
    """Run ``speckle2self segment``: 0 on success, 2 with a message on stderr for bad input
    (including a seed that is not in a lumen), :data:`EXIT_FLAGGED` (3) when a segmented frame
    is flagged as implausible and ``--keep-flagged`` is not given (the mask is then not written)."""
    try:
        from .safeio import check_mask_output; check_mask_output(args.out, args.input)  # noqa: E702 (issue #16)
        return _run_segment(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:     # vtk is declared, but an environment may still lack it
        missing = (err.name or "").split(".")[0]
        if missing not in ("vtk", "slicer", "vtkmodules"):
            raise
        package = "slicer-core" if missing == "slicer" else "vtk"
        print(f"error: segmenting with --method {args.method} needs the '{package}' Python package, which is not "
              f"installed; install it with: pip install {package}", file=sys.stderr)
        return 2


def _run_segment(args: argparse.Namespace) -> int:
    if args.method == "radial" and (args.tolerance is not None or args.neighborhood):
        raise ValueError("--tolerance and --neighborhood set the flood fill; the radial method needs none "
                         "(add --method flood to use them)")
    data = _read_input(args.input)
    frames = np.asarray(data.frames)
    if args.seed is not None:
        start, seed_rc = 0, (args.seed[1], args.seed[0])      # X, Y -> (row, col)
    else:
        start, seed_rc = _ras_to_frame_row_col(data, args.seed_ras)
    if args.frame is not None:
        if not 0 <= args.frame < len(frames):
            raise ValueError(f"--frame {args.frame} is outside the input's {len(frames)} frames (0..{len(frames) - 1})")
        start = args.frame
    check_seed(seed_rc, frames.shape)
    if not 0 <= start < len(frames):
        raise ValueError(f"the seed's frame {start} is outside the input's {len(frames)} frames; check --seed-ras")
    wanted = [start] if args.frame is not None else list(range(len(frames)))
    tolerance = args.tolerance
    if not args.no_despeckle:
        frames = _despeckled(frames, wanted, args.model)
        tolerance = DESPECKLED_TOLERANCE if tolerance is None else tolerance
    elif tolerance is None:
        tolerance = DEFAULT_TOLERANCE
    spacing_rc = (float(data.spacing[1]), float(data.spacing[0]))
    options = {"neighborhood_radius_px": args.neighborhood} if args.method == "flood" else {}
    result = segment_sequence(frames, seed_rc, args.method, tolerance, spacing_rc, start_frame=start,
                              frames_to_segment=wanted, **options)
    _print_measurements(result, wanted, data)
    flagged = [k for k in wanted if result.flagged[k]]
    if flagged and not args.keep_flagged:
        print(f"error: {len(flagged)} of {len(wanted)} frame(s) flagged as implausible, first frame {flagged[0]}: "
              f"{result.flag_reasons[flagged[0]]}. The mask was NOT written to {args.out}; move the seed to the "
              "lumen centre, try another --method, or pass --keep-flagged to write it anyway", file=sys.stderr)
        return EXIT_FLAGGED
    _write_mask(args.out, result.masks, data)
    return 0


def _parse_floats(count: int):
    def parse(text: str) -> Tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.replace(" ", "").split(","))
        except ValueError:
            values = ()
        if len(values) != count or not all(np.isfinite(values)):
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return values
    return parse


def _read_input(path):
    from .imageio import read_frames

    return read_frames(path)


def _ras_to_frame_row_col(data, ras: Sequence[float]) -> Tuple[int, RowCol]:
    """RAS mm -> (frame, (row, col)) through the input's geometry. ITK/SimpleITK images are in
    LPS; pictures and DICOM without one get Slicer's default: origin 0, identity LPS axes."""
    lps = (-float(ras[0]), -float(ras[1]), float(ras[2]))
    source = data.source
    if source is not None and hasattr(source, "TransformPhysicalPointToContinuousIndex"):
        index = source.TransformPhysicalPointToContinuousIndex(lps[:source.GetDimension()])
        col, row = index[0], index[1]
        frame = index[2] if len(index) > 2 else 0.0
    else:
        col, row, frame = (v / s for v, s in zip(lps, data.spacing))
    return int(round(frame)), (row, col)


def _despeckled(frames: np.ndarray, wanted: List[int], model) -> np.ndarray:
    """Despeckle the frames that will be segmented (the others are not looked at)."""
    from .inference import Despeckler

    despeckler = Despeckler.from_file(model)
    out = np.array(frames, copy=True)
    out[wanted] = despeckler.denoise(frames[wanted])
    return out


def _write_mask(out_path, masks: np.ndarray, data) -> None:
    """Mask in the input's format and geometry: volumes (.mha, .nrrd, .nii...) as 0/1 labels,
    pictures and DICOM as 0/255 so that viewers show them."""
    from .imageio import SITK_SUFFIXES, write_like

    label_volume = str(out_path).lower().endswith(SITK_SUFFIXES)
    labels = masks.astype(np.uint8) * (1 if label_volume else 255)
    write_like(out_path, labels, data)


def _print_measurements(result: SequenceResult, frames: List[int], data) -> None:
    area_unit, length_unit = ("mm2", "mm") if _has_pixel_spacing(data) else ("px2", "px")
    for k in frames:
        m = result.measurements[k]
        flag = f"  FLAGGED: {result.flag_reasons[k]}" if result.flagged[k] else ""
        print(f"frame {k}: area {m.area_mm2:.2f} {area_unit}, "
              f"equivalent diameter {m.equivalent_diameter_mm:.2f} {length_unit}, ellipse diameters "
              f"{m.major_diameter_mm:.2f} x {m.minor_diameter_mm:.2f} {length_unit}{flag}")
    flagged = [k for k in frames if result.flagged[k]]
    if flagged:
        print(f"warning: {len(flagged)} frame(s) flagged as implausible: {flagged}", file=sys.stderr)


def _has_pixel_spacing(data) -> bool:
    """Pictures carry no spacing; DICOM only with PixelSpacing; ITK formats always."""
    if data.source is None:
        return False
    return data.kind != "dicom" or "PixelSpacing" in data.source
