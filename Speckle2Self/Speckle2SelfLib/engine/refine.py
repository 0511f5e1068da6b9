"""Network-guided smoothing: the despeckled frame decides which input pixels are averaged.

The network's output is smooth, but its 1/4-resolution bottleneck softens boundaries by a
pixel or two. A joint (cross) bilateral filter averages the *input* over a Gaussian window,
weighting each neighbour by how close its value in the network's output is to the centre
pixel's: in uniform tissue (where the output is flat) it averages the speckle away; across a
boundary (where the output changes) it averages only along it, so the input's own edge
position and sharpness are kept.

``refine="auto"`` (the default of ``Despeckler.denoise``, the CLI and the module) applies it
where the model's metadata recommends it (the bundled default v4, and v3); ``"guided"`` /
``"none"`` force it on or off. A model carries its settings (window, range, and the power at
which guide levels are compared: v4 uses sigma 12 px, range 0.06 on square-root levels, which
keeps the dark lumen's faint walls while smoothing bright tissue more). The figures it gives
(flood-fill IoU, AUC, GLCM homogeneity, lumen-wall CNR on the carotid test subjects; SSIM on
the simulated test set) are in docs/results.md with the benchmark commands that give them.

Two implementations of the same filter:
``guided_filter`` (the product's): a bilateral grid (Speckle2SelfLib.engine.bilateral_grid),
    time proportional to the pixels whatever the window, on the frames' device.
``guided_smoothing`` (the reference): the direct weighted sum over the window's offsets,
    time proportional to pixels x window area; the tests and
    ``benchmarks/refine_methods.py`` compare the two.
"""

from __future__ import annotations

from typing import NamedTuple, Union

#: "auto": what the model's metadata recommends ("refine"; "none" for models without it).
REFINE_MODES = ("auto", "guided", "none")
#: Spatial Gaussian sigma (px at the model's working scale) and range sigma (fraction of the
#: frame's grey range), chosen on the carotid tuning subjects.
GUIDED_SIGMA_PX = 7.0
GUIDED_RANGE = 0.04
#: A model may carry its own settings (metadata "refine_sigma_px", "refine_range"; e.g. one
#: trained on simulated phantoms, whose regions are wider than a carotid wall); these bound them.
REFINE_SIGMA_LIMITS = (0.5, 32.0)
REFINE_RANGE_LIMITS = (1e-3, 1.0)
#: The range kernel may compare guide values raised to this power (metadata
#: "refine_range_power"; 1: plain grey levels). Below 1 it stretches differences among dark
#: levels and shrinks them among bright ones: on carotid B-mode the lumen and its faint walls sit
#: at the bottom of the grey scale (a step from 0.03 to 0.06 of the range counts 2.4x more with
#: the square root) while bright tissue is smoothed more (0.6x at 0.6). The residual speckle
#: of these frames has about the same spread at every level (``benchmarks/residual_by_level.py``),
#: so this weighs where boundaries matter, not a noise model.
REFINE_RANGE_POWER_LIMITS = (0.2, 1.0)
#: Half-width of the (square) window in spatial sigmas.
WINDOW_SIGMAS = 1.75
#: Neighbours are taken every STRIDE px (at the working scale): speckle grains span about 2 px,
#: so every other pixel carries nearly all the independent samples at a quarter of the cost.
STRIDE_PX = 2


class GuidedSmoothing(NamedTuple):
    """Settings of :func:`guided_smoothing` in input pixels."""

    sigma_px: float
    range_sigma: float
    stride: int
    range_power: float = 1.0

    @property
    def radius(self) -> int:
        return int(round(WINDOW_SIGMAS * self.sigma_px))


def check_refine(refine: Union[str, None]) -> str:
    """``refine`` as one of :data:`REFINE_MODES` (None means "none"), else a ValueError naming them."""
    if refine is None:
        return "none"
    if not isinstance(refine, str) or refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {', '.join(REFINE_MODES)}, got {refine!r}")
    return refine


def settings_for(working_scale: float, sigma_px: float = GUIDED_SIGMA_PX,
                 range_sigma: float = GUIDED_RANGE, range_power: float = 1.0) -> GuidedSmoothing:
    """The filter in input pixels for frames the network ran on at ``working_scale``
    (a frame shrunk by 2 for the network has grains twice as wide in its own pixels).

    The direct filter's neighbour stride stays STRIDE_PX whatever ``sigma_px`` (a stride grown
    with sigma, 4 px at 14, lost SSIM on simulated phantoms); the grid's cost does not depend
    on either."""
    scale = max(float(working_scale), 1e-3)
    return GuidedSmoothing(sigma_px / scale, range_sigma, max(1, int(round(STRIDE_PX / scale))), float(range_power))


#: The metadata in which a model recommends its output; a model fine-tuned from it inherits them.
RECOMMENDATION_KEYS = ("refine", "refine_sigma_px", "refine_range", "refine_range_power")


def recommended_mode(metadata: dict) -> str:
    """What ``refine="auto"`` applies for a model with this metadata: "guided" or "none"."""
    return "guided" if metadata.get("refine") == "guided" else "none"


def recommendation(metadata: dict) -> dict:
    """The refinement keys of a model's metadata (for the models fine-tuned from it)."""
    return {key: metadata[key] for key in RECOMMENDATION_KEYS if key in metadata}


def overridden(current: dict, requested: dict) -> dict:
    """The recommendation a model gets when ``requested`` (``export --refine ...``: "refine" and any
    guided settings) is written over its ``current`` one: another mode replaces the settings;
    the same mode (guided over guided) keeps those it does not set again."""
    current = recommendation(current)
    if "refine" in requested and requested["refine"] != current.get("refine"):
        current = {}
    return {**current, **requested}


def model_settings(metadata: dict) -> dict:
    """The settings a model's metadata gives (validated when it was loaded): keyword arguments
    of :func:`settings_for`; the defaults where it gives none."""
    return {"sigma_px": float(metadata.get("refine_sigma_px") or GUIDED_SIGMA_PX),
            "range_sigma": float(metadata.get("refine_range") or GUIDED_RANGE),
            "range_power": float(metadata.get("refine_range_power") or 1.0)}


def fit_to(guide, target):
    """Per-sample least-squares map a * guide + b (a > 0) onto ``target``, both (N, 1, H, W):
    the guide's grey levels on the input's scale, so one range sigma suits any output head."""
    import torch

    dims = (1, 2, 3)
    g_mean = guide.mean(dim=dims, keepdim=True)
    t_mean = target.mean(dim=dims, keepdim=True)
    dg = guide - g_mean
    # per-frame reductions of elementwise products, not batched matrix products: those may sum in
    # another order with another batch size, and a frame's output must not depend on its batch
    variance = (dg * dg).mean(dim=dims, keepdim=True)
    slope = (dg * target).mean(dim=dims, keepdim=True) / variance.clamp_min(1e-12)   # mean(dg) = 0
    usable = (variance > 1e-12) & (slope > 0)
    # per sample a * guide + b, or the guide itself where no such map exists: one pass over the pixels
    a = torch.where(usable, slope, torch.ones_like(slope))
    b = torch.where(usable, t_mean - g_mean * slope, torch.zeros_like(slope))
    return torch.addcmul(b, guide, a)


def compressed_levels(levels, power: float, in_place: bool = False):
    """Grey levels (0-1 of the frame's range) raised to ``power`` (REFINE_RANGE_POWER_LIMITS; 1: as
    they are): the scale on which the refinement's range kernel and training's edge weight
    (losses.edge_weight) compare levels, stretching steps among dark ones. ``in_place``: into
    ``levels`` itself (a temporary of the caller's: no second frame-sized tensor)."""
    if power == 1.0:
        return levels
    levels = levels.clamp_(0.0, 1.0) if in_place else levels.clamp(0.0, 1.0)
    if power == 0.5:                  # sqrt: 5x faster than pow on CPUs
        return levels.sqrt_() if in_place else levels.sqrt()
    return levels.pow_(power) if in_place else levels.pow(power)


#: The grid's spatial sigma as a fraction of a model's ``refine_sigma_px``: the direct filter
#: truncates its Gaussian at WINDOW_SIGMAS and samples every STRIDE_PX, which narrows it;
#: 0.9 brings the grid closest to it on carotid frames (mean |difference| 0.35 grey levels of
#: 255 over 16 frames, ``python benchmarks/refine_methods.py``; 0.85 and 0.95 are further).
GRID_SIGMA_FACTOR = 0.9
#: Grid cells per sigma in space: finer cells follow the Gaussian more closely and cost more (the
#: slice's table holds 16 numbers per cell). At 1.25 the grid differs from the direct filter by
#: 0.35 grey levels on average (``python benchmarks/refine_methods.py``) and keeps its carotid
#: figures within 0.003; at 1 (about 7% less refinement time) the flood-fill IoU on the test
#: subjects fell to 0.405 (direct filter 0.417; ``benchmarks/carotid.py``), with 1 in level too
#: (about 20% less) to 0.404.
GRID_CELLS_PER_SIGMA = 1.25
#: The same in level (the range kernel), where boundaries are decided.
GRID_LEVEL_CELLS_PER_SIGMA = 1.25


def grid_cells(sigma_px: float, range_sigma: float):
    """(cell in pixels, cell in levels) of the grid that carries a filter of these sigmas."""
    return sigma_px / GRID_CELLS_PER_SIGMA, range_sigma / GRID_LEVEL_CELLS_PER_SIGMA


def guided_filter(image, guide, settings: GuidedSmoothing):
    """The guided refinement the product runs: :func:`guided_smoothing`'s filter (same settings,
    same guide fit and level compression) on a bilateral grid, in time proportional to the
    pixels. ``image`` and ``guide`` (N, 1, H, W) in [0, 1] on one device; returns float32."""
    from .bilateral_grid import grid_filter

    guide = compressed_levels(fit_to(guide.float(), image.float()), settings.range_power, in_place=True)
    sigma = GRID_SIGMA_FACTOR * settings.sigma_px
    return grid_filter(image, guide, sigma, settings.range_sigma, *grid_cells(sigma, settings.range_sigma))


def guided_smoothing(image, guide, settings: GuidedSmoothing):
    """Joint bilateral filter of ``image`` steered by ``guide``; both (N, 1, H, W) in [0, 1]
    on one device. The result is a weighted mean of input pixels (same range, no new levels).

    The weight of a pixel pair is symmetric (the same Gaussian of their distance and of their
    guide difference either way), so each pair's weight is computed once and given to both
    pixels: half the exponentials of the plain loop over every offset, computed as powers of 2
    (cheaper than exp on CPUs); equal to the plain loop within 2e-6 (Testing/test_refine.py).
    The product runs :func:`guided_filter`; this is its reference.
    """
    import torch
    import torch.nn.functional as F

    r, stride = settings.radius, settings.stride
    guide = fit_to(guide.float(), image.float())
    guide = compressed_levels(guide, settings.range_power)
    h, w = image.shape[-2:]
    # replicate padding works for frames of any size (reflect needs the pad below the side)
    padded_guide = F.pad(guide, (r,) * 4, mode="replicate")
    padded_image = F.pad(image.float(), (r,) * 4, mode="replicate")
    # channel 0 sums weight * value, channel 1 the weights; the centre pixel's own weight is 1
    values_and_ones = torch.cat([padded_image, torch.ones_like(padded_image)], dim=1)
    sums = values_and_ones.clone()
    spatial = -0.5 / settings.sigma_px ** 2 * _LOG2_E
    tonal = -0.5 / settings.range_sigma ** 2 * _LOG2_E
    buffer = torch.empty_like(padded_guide)
    for dy, dx in _half_offsets(r, stride):
        # pixels q whose partner q + (dy, dx) exists and where q or its partner is in the frame
        rows = slice(r - dy, r + h)
        cols = slice(r - max(dx, 0), r + w + max(-dx, 0))
        partner_rows = slice(rows.start + dy, rows.stop + dy)
        partner_cols = slice(cols.start + dx, cols.stop + dx)
        weight = buffer[..., :rows.stop - rows.start, :cols.stop - cols.start]
        torch.sub(padded_guide[..., rows, cols], padded_guide[..., partner_rows, partner_cols], out=weight)
        weight.square_().mul_(tonal).add_(spatial * (dy * dy + dx * dx)).exp2_()
        sums[..., rows, cols].addcmul_(weight, values_and_ones[..., partner_rows, partner_cols])
        sums[..., partner_rows, partner_cols].addcmul_(weight, values_and_ones[..., rows, cols])
    centre = (..., slice(r, r + h), slice(r, r + w))
    return sums[:, :1][centre] / sums[:, 1:][centre]


_LOG2_E = 1.4426950408889634      # exp(x) = 2 ** (x * log2(e))


def _half_offsets(radius: int, stride: int):
    """One offset of each +/- pair of :func:`_offsets` x :func:`_offsets` (zero excluded)."""
    offsets = _offsets(radius, stride)
    return [(dy, dx) for dy in offsets for dx in offsets if dy > 0 or (dy == 0 and dx > 0)]


def _offsets(radius: int, stride: int):
    """Offsets -radius..radius in steps of ``stride``, always including 0 (symmetric)."""
    steps = radius // stride
    return [k * stride for k in range(-steps, steps + 1)]

