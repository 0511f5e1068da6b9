"""Speckle grain: the scale at which a model should see new frames.

Scanner B-mode images come at every pixel spacing: the same transducer gives spots of 2
pixels in one export and 8 in another. Speckle2Self's views only differ where the speckle is
finer than the perturbation's downsampling, so a network trained on one grain copies, or
over-smooths, another. The grain is measured here by the view-difference statistic (how much
the 0.5 and 0.25 MSP views differ from the full view, relative to its spread), the direct
measure of how much the views disagree: models store the view difference of their training
data, and frames are resampled to the scale at which theirs matches it
(:func:`match_working_scale`). The speckle spot size in pixels (autocorrelation width) that the
grain benchmark reports is benchmarks/benchlib/grain_size.py.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

MAX_FRAMES = 8            # frames of a stack sampled for the estimate
#: Working scales are kept within these limits: beyond them resampling would either
#: throw away real resolution or cost more than the result is worth.
SCALE_LIMITS = (0.25, 2.0)
#: A scale within this relative distance of 1 is treated as 1 (no resampling, no blur).
SCALE_TOLERANCE = 0.2
#: View differences within this relative distance of the model's count as a match.
MATCH_TOLERANCE = 0.1


def view_difference_at(frames, scale: float, region: int = 384, view_scale: float = 0.5) -> Optional[float]:
    """The view difference at ``view_scale`` after resampling the frames by ``scale``.

    The same central region of each sampled frame (``region`` pixels square, or the whole
    frame where smaller) is used at every scale, so that only the speckle's size changes.
    """
    import torch
    from .perturbation import resample_to_working_scale

    arr = np.asarray(frames, dtype=np.float32)
    stack = arr[None] if arr.ndim == 2 else arr
    pick = np.unique(np.linspace(0, len(stack) - 1, min(MAX_FRAMES, len(stack))).round().astype(int))
    h, w = stack.shape[1:]
    size_r, size_c = min(h, region), min(w, region)
    r, c = (h - size_r) // 2, (w - size_c) // 2
    part = torch.from_numpy(np.ascontiguousarray(stack[pick, r:r + size_r, c:c + size_c]))[:, None]
    part = resample_to_working_scale(part, scale)
    values = view_difference(part[:, 0].numpy(), (view_scale,), crop=max(part.shape[-2:]))
    return values.get(view_scale)


#: "auto" only shrinks frames (speckle coarser than the model's), never enlarges them beyond
#: the model's own working scale (1 for every bundled model): frames with finer speckle run at
#: their own resolution. Enlarging them to match made results worse wherever there is a truth
#: to check, and costs up to 4x the time (CHANGELOG.md, v3): simulated B-mode (enlarged 2x)
#: SSIM 0.73 vs 0.91 at scale 1 with the bundled v3;
#: carotid images shrunk by 2 (enlarged 1.68x back) flood-fill IoU 0.397 vs 0.420 and GLCM
#: homogeneity 0.733 vs 0.747. An explicit working scale up to SCALE_LIMITS[1] is still honoured.
AUTO_SCALE_LIMITS = (SCALE_LIMITS[0], 1.0)


def candidate_scales(largest: float = AUTO_SCALE_LIMITS[1]) -> Tuple[float, ...]:
    """Working scales searched when matching a model's view difference: steps of 2^(1/4) from
    the smallest automatic scale up to ``largest`` (within SCALE_LIMITS)."""
    largest = min(max(float(largest), AUTO_SCALE_LIMITS[1]), SCALE_LIMITS[1])
    steps = int(round(4 * np.log2(largest / AUTO_SCALE_LIMITS[0])))
    return tuple(float(x) for x in np.geomspace(AUTO_SCALE_LIMITS[0], largest, steps + 1))


CANDIDATE_SCALES = candidate_scales()


def match_working_scale(frames, target: Optional[float], largest: float = AUTO_SCALE_LIMITS[1]) -> float:
    """The resampling factor at which the frames' view difference (0.5 view) equals the one
    the model was trained at; 1 when the target is unknown or the frames carry no speckle.
    Never above ``largest`` (the model's own working scale where that exceeds 1): frames whose
    speckle is finer than the model's run there (see :data:`AUTO_SCALE_LIMITS`).

    The view difference grows as an image is shrunk (its speckle gets finer per pixel), so
    the match is interpolated between neighbouring candidates on a log scale.
    """
    if not target:
        return 1.0
    arr = np.asarray(frames)
    stack = arr[None] if arr.ndim == 2 else arr
    if stack.ndim != 3 or min(stack.shape[1:]) < 32 or not np.isfinite(stack[:1]).all():
        return 1.0
    scales, diffs = [], []
    for scale in candidate_scales(largest):
        if min(stack.shape[1:]) * scale < 32:
            continue
        d = view_difference_at(stack, scale)
        if d is not None:
            scales.append(scale)
            diffs.append(d)
    if len(diffs) < 2:
        return 1.0
    order = np.argsort(scales)
    log_s = np.log(np.array(scales)[order])
    # The statistic of one region is noisy from one candidate to the next: smooth it along the
    # log-scale axis, then keep its monotone envelope (a larger scale means coarser speckle per
    # pixel, so a smaller difference).
    raw = np.array(diffs)[order]
    smooth = np.convolve(np.pad(raw, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    d = np.minimum.accumulate(smooth)
    # Where several factors come close to the model's difference (fine speckle saturates:
    # shrinking sub-pixel speckle changes nothing), take the one nearest 1, so that data like
    # the training data run at their own resolution.
    close = np.abs(d - target) <= MATCH_TOLERANCE * target
    if close.any():
        chosen = float(np.exp(log_s[close][np.argmin(np.abs(log_s[close]))]))
    elif target >= d[0]:
        # Not even the smallest scale makes the views differ as much: the speckle is already
        # at the pixel limit (shrinking changes nothing), so run at the frames' own resolution.
        chosen = 1.0
    elif target <= d[-1]:
        chosen = float(np.exp(log_s[-1]))     # speckle finer than the model's: its own resolution
    else:
        chosen = float(np.exp(np.interp(-target, -d, log_s)))
    return 1.0 if abs(chosen - 1.0) <= SCALE_TOLERANCE else round(chosen, 3)


def view_difference(frames, scales: Sequence[float] = (0.5, 0.25), crop: int = 256) -> Dict[float, float]:
    """For each MSP scale s: std(view_s - full view) / std(full view), on central crops.

    Near 0 means the view is a copy of the full view (coarse speckle): the self-supervised
    loss then rewards copying the input.
    """
    import torch
    from .perturbation import multiscale_views

    arr = np.asarray(frames, dtype=np.float32)
    stack = arr[None] if arr.ndim == 2 else arr
    pick = np.unique(np.linspace(0, len(stack) - 1, min(MAX_FRAMES, len(stack))).round().astype(int))
    ratios: Dict[float, list] = {s: [] for s in scales}
    for k in pick:
        f = stack[k]
        h, w = f.shape
        size = min(crop, h, w)
        r, c = (h - size) // 2, (w - size) // 2
        x = torch.from_numpy(np.ascontiguousarray(f[r:r + size, c:c + size]))[None, None]
        views = multiscale_views(x, (1.0, *scales))
        full = views[0]
        spread = float(full.std())
        if spread <= 0:
            continue
        for s, v in zip(scales, views[1:]):
            ratios[s].append(float((v - full).std()) / spread)
    return {s: round(float(np.mean(v)), 4) for s, v in ratios.items() if v}
