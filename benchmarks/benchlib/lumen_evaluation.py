"""Flood-fill evaluation against expert masks: the carotid benchmark's IoU, ROC and tolerance tuning.

Benchmark code (not installed with the package): it scores the product's flood fill
(:func:`Speckle2SelfLib.segmentation.flood_fill`, Slicer's "Flood filling" effect) seeded at a
reference mask's centroid, over tolerance sweeps. :func:`fill_arrival` makes a whole sweep cost
one grey-level reconstruction instead of one fill per tolerance.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from Speckle2SelfLib.segmentation import DEFAULT_TOLERANCE, RowCol, check_seed, seed_from_mask
from Speckle2SelfLib.segmentation.editor_effects import _FloodFiller
from Speckle2SelfLib.segmentation.masks import _as_image2d, _as_mask2d


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
