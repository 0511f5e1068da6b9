"""The default one-click lumen segmentation ("radial"): a star-shaped boundary around the seed.

:func:`radial_boundary` finds it by dynamic programming over rays (a smooth closed contour on
the dark-to-bright lumen edge) with an ellipse prior; it bridges gaps in the wall instead of
leaking through them, and reports why a result is implausible (:func:`radial_reason`). A seed
on bright tissue raises :class:`SeedNotInLumenError`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .masks import RowCol, SegmentationWarning, _as_image2d, _as_mask2d, check_seed, leak_reason


#: Rays cast from the seed: the contour's angular resolution (2.8 degrees).
RADIAL_RAYS = 128
#: Gaussian smoothing (px) of the image before the rays sample it (speckle grains are ~2 px).
RADIAL_SIGMA_PX = 2.0
#: Width (px) of the dark and bright windows whose mean difference is a ray's edge strength.
#: 8 (was 4) and a largest step of 2 (was 3), chosen on the 260 tuning-subject images (5 seeds
#: each): mean IoU raw 0.888 -> 0.894, despeckled (bundled v2) 0.882 -> 0.890, flagged results
#: 0.5% / 2.0% -> 0 (`benchmarks/carotid.py --lumen-only --lumen-split tuning`; CHANGELOG.md, v2).
RADIAL_EDGE_WIDTH_PX = 8
#: Largest radius change (px) between neighbouring rays, and its cost per px (angular smoothness).
RADIAL_MAX_STEP_PX = 2
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
            f"bright tissue (grey level {local:.0f}, where nearby levels run from {low:.0f} to {high:.0f}: the "
            "5th and 95th percentiles), "
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
