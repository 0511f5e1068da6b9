"""One-click lumen segmentation of a frame or a cine loop, with measurements and quality flags.

:func:`segment` segments one frame with the "radial" method (default, :mod:`.radial`) or one
of Slicer's effects ("flood", "growcut", :mod:`.editor_effects`) and returns the mask with its
measurements (area, equivalent and ellipse diameters) and a flag with the reason when it is
implausible. :func:`segment_sequence` runs any method on every frame of a cine loop; the seed
follows the lumen centroid of the last accepted frame (whose boundary is the radial method's
prior) and implausible frames are flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .editor_effects import DEFAULT_TOLERANCE, flood_fill, grow_from_seeds
from .masks import (Measurement, RowCol, _as_image2d, check_finite, check_image2d, check_seed, leak_reason, measure,
                    seed_from_mask, warn_if_seed_on_wall)
from .radial import (MAX_INSIDE_OUTSIDE_RATIO, RADIAL_EDGE_WIDTH_PX, RADIAL_SIGMA_PX, SeedNotInLumenError,
                     radial_boundary, radial_segment)

#: Relative area change between consecutive accepted frames above which a frame is flagged.
MAX_AREA_CHANGE = 0.5
#: Least rise from a flood / growcut region's inside to the ring just outside it, as a fraction
#: of the way to the bright tissue nearby (:func:`contrast_reason`). On 29 tuning images the
#: regions of a zero tolerance, which stop inside the lumen, score at most 0.17 (most below
#: 0.08); among regions that pass the inside/outside ratio, tolerance-3 fills score 0.20-0.34,
#: grow from seeds 0.19-0.67; radial contours 0.36-0.79.
MIN_RING_STEP = 0.15
#: Segmentation methods: "radial" (the default: a star-shaped boundary around the seed, robust
#: to wall gaps), and Slicer's own "flood" (flood filling) and "growcut" (grow from seeds).
METHODS = ("radial", "flood", "growcut")
DEFAULT_METHOD = "radial"


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
    lumen -- for every method, see :func:`contrast_reason` --, empty). The image must be 2D and
    finite (a ValueError otherwise). A radial seed on bright tissue raises :class:`SeedNotInLumenError`.
    ``prior_mask`` (radial only) is a previous boundary to stay close to.
    """
    image2d = check_image2d(image2d)
    seed = check_seed(seed_rc, image2d.shape)
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
    if leak:
        return mask, f"leaked: {leak}"
    return mask, contrast_reason(image2d, mask)



def contrast_reason(image2d: np.ndarray, mask: np.ndarray, ring_px: int = 2 * RADIAL_EDGE_WIDTH_PX) -> str:
    """Why ``mask`` is not a dark lumen in brighter surroundings ('' if it is). The median grey
    level inside (3 px or more from its boundary) over that of a ring of ``ring_px`` px just
    outside it (1 px apart), both on the image smoothed as the radial method smooths it, must be at
    most :data:`~.radial.MAX_INSIDE_OUTSIDE_RATIO` of it (the radial method's own test), and rise
    from the inside by at least :data:`MIN_RING_STEP` of the way to the bright tissue nearby (90th
    percentile). A region that stops inside the lumen (too low a tolerance) or grows in flat
    surroundings fails."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if not mask.any():
        return ""                      # "empty mask" is said by the caller
    rows, cols = np.nonzero(mask)
    margin = ring_px + 3 * int(RADIAL_SIGMA_PX) + 2
    r0, r1 = max(rows.min() - margin, 0), min(rows.max() + margin + 1, mask.shape[0])
    c0, c1 = max(cols.min() - margin, 0), min(cols.max() + margin + 1, mask.shape[1])
    region = mask[r0:r1, c0:c1]
    smooth = ndimage.gaussian_filter(np.asarray(image2d, np.float32)[r0:r1, c0:c1], RADIAL_SIGMA_PX)
    distance = ndimage.distance_transform_edt(~region)
    ring = (distance > 1) & (distance <= 1 + ring_px)
    if not ring.any():
        return ""                      # the mask fills the image: leak_reason says so
    # the inside's level away from the boundary, where the smoothing mixes in the wall's
    core = ndimage.distance_transform_edt(region) >= 1 + int(RADIAL_SIGMA_PX)
    inside = float(np.median(smooth[core if core.any() else region]))
    outside = float(np.median(smooth[ring]))
    if outside <= inside:
        return (f"not a dark lumen: the region is no darker than its surroundings (median grey {inside:.3g} "
                f"inside, {outside:.3g} just outside); move the seed or raise the tolerance")
    if outside > 0 and inside / outside > MAX_INSIDE_OUTSIDE_RATIO:
        return (f"not a dark lumen: the inside is {100 * inside / outside:.0f}% as bright as its surroundings "
                f"(at most {100 * MAX_INSIDE_OUTSIDE_RATIO:.0f}%); the region may stop inside the lumen "
                "(raise the tolerance) or have grown into tissue")
    # a region that stops inside the lumen has lumen around it: its ring is barely brighter,
    # measured against the bright tissue nearby (as the radial method measures its edges)
    step = (outside - inside) / max(float(np.percentile(smooth, 90)) - inside, 1e-6)
    if step < MIN_RING_STEP:
        return (f"weak boundary: just outside, the grey level is only {100 * step:.0f}% of the way from the "
                f"inside's to the bright tissue's (needs {100 * MIN_RING_STEP:.0f}%); the region may stop "
                "inside the lumen (raise the tolerance)")
    return ""


def boundary_uncertainty(mask: np.ndarray, uncertainty_map: np.ndarray) -> float:
    """A lumen's boundary uncertainty: the mean of an uncertainty map (the despeckler's,
    ``Despeckler.denoise(..., uncertainty=True)``, in grey levels) along the mask's contour (the
    pixels within 1 px of it, inside or outside); higher means a less reliable boundary. NaN for an
    empty mask. A ValueError when the two shapes differ."""
    mask = np.asarray(mask, bool)
    uncertainty_map = np.asarray(uncertainty_map)
    if mask.shape != uncertainty_map.shape:
        raise ValueError(f"the uncertainty map's shape {uncertainty_map.shape} differs from the mask's {mask.shape}; "
                         "pass the map of the frame that was segmented")
    if not mask.any():
        return float("nan")
    return float(np.mean(uncertainty_map[_contour_band(mask)], dtype=np.float64))


#: Gaussian sigma (px) of the gradient :func:`uncertain_boundary_share` compares the map with.
BOUNDARY_GRADIENT_SIGMA_PX = 1.0


def uncertain_boundary_share(mask: np.ndarray, uncertainty_map: np.ndarray, image2d: np.ndarray) -> float:
    """The share (0..1) of a lumen's contour whose position the uncertainty map leaves uncertain by
    more than a pixel: where the map (grey levels) exceeds the segmented image's grey-level change
    per pixel across the boundary (Gaussian gradient, :data:`BOUNDARY_GRADIENT_SIGMA_PX`). Along a
    faint or smoothed wall it is high; chosen over the map's mean along the contour on the carotid
    tuning subjects (``benchmarks/uncertainty.py --carotid --split tuning``). NaN for an empty mask."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    image2d = np.asarray(image2d)
    if image2d.shape != mask.shape:
        raise ValueError(f"the image's shape {image2d.shape} differs from the mask's {mask.shape}; "
                         "pass the frame that was segmented")
    mean = boundary_uncertainty(mask, uncertainty_map)        # checks the map's shape
    if np.isnan(mean):
        return mean
    band = _contour_band(mask)
    gradient = ndimage.gaussian_gradient_magnitude(image2d.astype(np.float64), BOUNDARY_GRADIENT_SIGMA_PX)
    return float(np.mean(np.asarray(uncertainty_map)[band] > gradient[band]))


def _contour_band(mask: np.ndarray) -> np.ndarray:
    """The pixels within 1 px of a mask's contour, inside or outside."""
    from scipy import ndimage

    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask, border_value=1)


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


def segment_sequence(frames: np.ndarray, seed_rc: RowCol, method: str = DEFAULT_METHOD,
                     tolerance: float = DEFAULT_TOLERANCE, spacing_mm: Sequence[float] = (1.0, 1.0),
                     start_frame: int = 0, max_area_change: float = MAX_AREA_CHANGE,
                     frames_to_segment: Optional[Iterable[int]] = None,
                     progress: Optional[Callable[[int, int], None]] = None, **options) -> SequenceResult:
    """Segment every frame of (N, H, W) ``frames``, starting at ``start_frame`` with ``seed_rc``
    and going forwards, then backwards from it.

    Each frame is seeded at the lumen centroid of the last accepted frame (the lumen moves with
    the probe and pulsates); with the radial method that frame's boundary is also the prior
    (``prior_mask`` of :func:`radial_boundary`). A frame is flagged -- kept in ``masks`` but
    marked in ``flagged`` with a reason, and not used to seed the next one -- when its mask is
    empty, implausible (a leak, see :func:`leak_reason`; for radial also :func:`radial_reason`,
    for flood and growcut :func:`contrast_reason`; a seed that fell on bright tissue), or its area differs from the last accepted frame's by
    more than ``max_area_change`` (0.5 = 50%). ``frames_to_segment`` limits the work to some
    frames (others stay empty and unflagged). ``options`` go to the method's function.
    ``progress(done, total)`` is called after each segmented frame (total: the frames to
    segment); an exception it raises (e.g. a cancellation) stops the run and propagates.
    A radial seed on bright tissue in the start frame raises :class:`SeedNotInLumenError`.
    """
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W), got shape {frames.shape}")
    check_finite(frames, "the stack of frames")      # before any frame is segmented
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
    total, done = sum(1 for k in wanted if 0 <= k < n), 0

    def segment_one(k: int, state: _Track, first: bool) -> _Track:
        nonlocal done
        state = _segment_into(result, frames, k, state, first=first, **run)
        done += 1
        if progress is not None:
            progress(done, total)
        return state

    start_state = _Track(start_seed)
    if start_frame in wanted:
        start_state = segment_one(start_frame, start_state, True)
    for order in (range(start_frame + 1, n), range(start_frame - 1, -1, -1)):
        state = start_state
        for k in order:
            if k in wanted:
                state = segment_one(k, state, False)
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
