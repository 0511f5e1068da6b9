"""Where not to trust the despeckled image: a per-pixel uncertainty map in output grey levels.

The product's output (``refine="guided"``) is a weighted mean of input pixels, the weights set
by the network's output (Speckle2SelfLib.engine.refine). The bilateral grid that computes it
gives, from the same splat, the statistics of that mean around every pixel, and the map adds
three cues (each in grey levels of the frame):

* **window disagreement** ``|wide mean - output|``: the same weighted mean over a window
  :data:`WIDE_SIGMA_FACTOR` x wider in space and :data:`WIDE_RANGE_FACTOR` x in level. Where
  the output is right, a wider mean of the same tissue agrees with it; they part where the
  output kept a speckle blob or a local bias as structure, or where a faint boundary is smoothed
  differently at the two widths. This is what the gradient does not know;
* **standard error** ``sqrt(var / n)`` of the weighted mean: ``var`` the weighted local variance
  of the input, ``n`` the weights' effective count ``(sum w)^2 / sum w^2`` (from the weights
  blurred at the window / sqrt(2): squared Gaussians) in speckle grains of
  :data:`GRAIN_AREA_PX`: small where the guide confines the mean to few pixels;
* **gradient magnitude** of the output (Gaussian derivative, :data:`GRADIENT_SIGMA_PX`): a
  boundary misplaced by a fraction of a pixel errs in proportion to its steepness.

``map = SCALE * (WIDE_GAIN * disagreement + SE_GAIN * standard error + GRADIENT_GAIN * gradient)``.
The cues, gains and scale were chosen on the simulated tuning seeds against the truth
(``python benchmarks/uncertainty.py --tune``; the figures are in docs/results.md#uncertainty):
SCALE makes the map's mean the mean absolute error there. For models whose output is the
network's own (``refine="none"``) the statistics of the refinement the model's settings
describe are used the same way, with the network's output (fitted to the input's grey levels)
as the output. Everything runs on the frames' device in torch; nothing is computed unless asked
(``Despeckler.denoise(..., uncertainty=True)``). The statistics' weighted mean is the refinement
itself, which is then not run a second time: with the map a call takes 1.1-1.4x the default
output's time (docs/results.md#uncertainty).
"""

from __future__ import annotations

import math

from .bilateral_grid import (SLICE_FLOATS, _blur, _blur_sigma, _cell_count, _centres, _frame_offsets, _Grid,
                             _level_coordinates, _strips, check_cells, corner_table, scratch, slice_grid)

#: The wider window of the disagreement cue, in the refinement's spatial and range sigmas.
WIDE_SIGMA_FACTOR = 2.0
WIDE_RANGE_FACTOR = 1.5
#: Gains of the three cues (relative) and the map's scale (to expected absolute error), chosen on
#: the simulated tuning seeds (``benchmarks/uncertainty.py --tune``).
WIDE_GAIN = 1.0
SE_GAIN = 2.0
GRADIENT_GAIN = 1.0
SCALE = 0.43
#: Speckle grains are correlated over a few pixels: the effective count of independent samples
#: is the weights' count divided by this area (px^2, at the model's working scale).
GRAIN_AREA_PX = 4.0
GRADIENT_SIGMA_PX = 1.0
#: The cues, in the order of :func:`uncertainty_components`.
CUES = ("disagreement", "standard_error", "gradient")


def refinement_statistics(image, guide, sigma_px: float, range_sigma: float, cell_px: float, level_cell: float,
                          wide=(WIDE_SIGMA_FACTOR, WIDE_RANGE_FACTOR)):
    """Per-pixel statistics of :func:`bilateral_grid.grid_filter`'s weighted mean (same arguments,
    same grid): float32 (N, 1, H, W) tensors ``(mean, variance, n_eff, wide_mean)``: the weighted
    mean and variance of ``image`` around each pixel, the weights' effective count
    ``(sum w)^2 / sum w^2`` in pixels (a flat guide gives about 4 pi sigma^2 inside the frame), and
    the weighted mean over a window ``wide`` = (spatial, range) times wider (from the same splat)."""
    import torch

    check_cells(sigma_px, range_sigma, cell_px, level_cell)
    image = image.float()
    n, _, h, w = image.shape
    levels = _level_coordinates(guide.float(), level_cell)
    grid = _Grid(n, int(levels.max().floor()) + 2, _cell_count(h, cell_px), _cell_count(w, cell_px), cell_px)
    sums = torch.zeros(3, n * grid.depth * grid.plane, dtype=torch.float32, device=image.device)
    # strips of a third of the grid's: six sums sliced instead of two, in a workspace of the same size
    for top, bottom in _strips(h, w, 3 * n):
        _splat3(sums, image[:, 0, top:bottom], levels[:, 0, top:bottom], top, grid)
    sums = sums.view(3, n, grid.rows, grid.cols, grid.depth)

    def blurred(channels, spatial: float, tonal: float):
        return _blur(channels, _blur_sigma(spatial * sigma_px, cell_px, spatial=True),
                     _blur_sigma(tonal * range_sigma, level_cell, spatial=False))

    # Gaussian weights squared are Gaussians of sigma / sqrt(2): sum w^2 from the weights alone
    narrow = 1.0 / math.sqrt(2.0)
    channels = torch.cat([blurred(sums, 1.0, 1.0), blurred(sums[2:], narrow, narrow),
                          blurred(sums[0::2].contiguous(), *wide)])
    table = corner_table(channels, scratch("statistics table", 8 * channels[:, :, 1:, 1:, 1:].numel(), image.device))
    out = torch.empty((6, n, h, w), dtype=torch.float32, device=image.device)
    strips = _strips(h, w, 3 * n)
    workspace = scratch("statistics slice", SLICE_FLOATS * 6 * n * (strips[0][1] - strips[0][0]) * w, image.device)
    for top, bottom in strips:
        out[:, :, top:bottom] = slice_grid(table, levels[:, 0, top:bottom], top, grid, workspace)
    value, square, weight, weight_square, wide_value, wide_weight = out
    weight = weight.clamp_min(1e-30)
    mean = value / weight
    variance = (square / weight - mean * mean).clamp_min(0.0)
    # the grid's weights carry a global factor per sum; a flat frame's interior calibrates it
    n_eff = weight * weight / weight_square.clamp_min(1e-30) * _flat_count_factor(sigma_px, range_sigma, cell_px,
                                                                                   level_cell, image.device)
    wide_mean = wide_value / wide_weight.clamp_min(1e-30)
    return mean[:, None], variance[:, None], n_eff[:, None], wide_mean[:, None]


_FLAT_FACTORS: dict = {}


def _flat_count_factor(sigma_px, range_sigma, cell_px, level_cell, device) -> float:
    """4 pi sigma^2 (a Gaussian window's effective count) over the grid's (sum w)^2 / sum w^2 at
    the centre of a flat frame: the grid's sums differ from the true ones by global factors."""
    key = (round(sigma_px, 6), round(range_sigma, 9), round(cell_px, 6), round(level_cell, 9))
    if key not in _FLAT_FACTORS:
        import torch

        side = int(math.ceil(8 * sigma_px)) + 8
        flat = torch.zeros(1, 1, side, side, device=device)
        levels = _level_coordinates(flat, level_cell)
        grid = _Grid(1, 3, _cell_count(side, cell_px), _cell_count(side, cell_px), cell_px)
        sums = torch.zeros(3, grid.depth * grid.plane, dtype=torch.float32, device=device)
        _splat3(sums, flat[:, 0], levels[:, 0], 0, grid)
        shape = (1, grid.rows, grid.cols, grid.depth)
        wide = _blur(sums[2:].view(1, *shape), _blur_sigma(sigma_px, cell_px, True), _blur_sigma(range_sigma, level_cell, False))
        narrow = _blur(sums[2:].view(1, *shape), _blur_sigma(sigma_px / math.sqrt(2.0), cell_px, True),
                       _blur_sigma(range_sigma / math.sqrt(2.0), level_cell, False))
        workspace = torch.empty(SLICE_FLOATS * 2 * side * side, dtype=torch.float32, device=device)
        out = slice_grid(corner_table(torch.cat([wide, narrow])), levels[:, 0], 0, grid, workspace)[:, 0]
        centre = side // 2
        grid_count = float(out[0, centre, centre] ** 2 / out[1, centre, centre])
        _FLAT_FACTORS[key] = 4.0 * math.pi * sigma_px * sigma_px / grid_count
    return _FLAT_FACTORS[key]


def _splat3(sums, image, levels, top: int, grid: _Grid) -> None:
    """Like bilateral_grid._splat for three sums at once: value, value^2 and weight."""
    import torch

    n, height, w = image.shape
    device = image.device
    row_cell = _centres(top, top + height, grid.cell_px, device).long().add_(1)
    col_cell = _centres(0, w, grid.cell_px, device).long().add_(1)
    low = levels.floor()
    upper = (levels - low).reshape(-1)
    cell = (row_cell.view(1, -1, 1) * grid.cols + col_cell.view(1, 1, -1)) + _frame_offsets(n, grid.plane, device)
    index = torch.add(low.long(), cell, alpha=grid.depth).view(-1)       # level innermost, as _splat
    value = image.reshape(-1)
    parts = torch.stack([value, value * value, torch.ones_like(value)])      # (3, pixels)
    upper_parts = parts * upper
    sums.index_add_(1, index, parts - upper_parts)
    sums.index_add_(1, index + 1, upper_parts)


def uncertainty_map(image, guide, settings, refined: bool = True, working_scale: float = 1.0, gains=None):
    """The uncertainty map, (N, 1, H, W) float32 in [0, 1] grey levels of the frames: ``image`` the
    normalised input (N, 1, H, W), ``guide`` the network's output, ``settings`` the model's
    refinement (:class:`refine.GuidedSmoothing`), ``refined`` whether the output is the refinement
    (else the network's output), ``working_scale`` the factor the network ran at;
    ``gains``: (WIDE_GAIN, SE_GAIN, GRADIENT_GAIN) by default."""
    return combine(uncertainty_components(image, guide, settings, refined, working_scale), gains)


def combine(parts: dict, gains=None):
    """The map from :func:`uncertainty_components`: SCALE x the gains' sum of the cues."""
    gains = (WIDE_GAIN, SE_GAIN, GRADIENT_GAIN) if gains is None else gains
    total = sum(gain * parts[cue] for gain, cue in zip(gains, CUES))
    return (SCALE * total).float()


def uncertainty_components(image, guide, settings, refined: bool = True, working_scale: float = 1.0) -> dict:
    """The cues of the map, each (N, 1, H, W) float32 in [0, 1] grey levels (:data:`CUES`), and
    "output" (what they describe: the refinement, or the network's output fitted to the input)."""
    from .refine import GRID_SIGMA_FACTOR, compressed_levels, fit_to, grid_cells

    image = image.float()
    fitted = fit_to(guide.float(), image)
    levels = compressed_levels(fitted, settings.range_power)
    sigma = GRID_SIGMA_FACTOR * settings.sigma_px
    mean, variance, n_eff, wide_mean = refinement_statistics(
        image, levels, sigma, settings.range_sigma, *grid_cells(sigma, settings.range_sigma))
    output = mean if refined else fitted.clamp(0.0, 1.0)
    grain_area = GRAIN_AREA_PX / max(float(working_scale), 1e-3) ** 2          # in input pixels
    grains = (n_eff / grain_area).clamp_min(1.0)
    return {"disagreement": (wide_mean - output).abs(), "standard_error": (variance / grains).sqrt(),
            "gradient": gradient_magnitude(output, GRADIENT_SIGMA_PX), "output": output}


def gradient_magnitude(frames, sigma_px: float):
    """|Gaussian derivative| of (N, 1, H, W) frames (edges replicated), float32."""
    import torch
    import torch.nn.functional as F

    radius = max(1, int(math.ceil(3 * sigma_px)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    smooth = torch.exp(-0.5 * (t / sigma_px) ** 2)
    smooth = smooth / smooth.sum()
    derivative = -t / (sigma_px * sigma_px) * smooth
    padded = F.pad(frames.float(), (radius,) * 4, mode="replicate")
    h, w = frames.shape[-2:]
    d_row = _filter_axis(_filter_axis(padded, derivative, -2, h), smooth, -1, w)
    d_col = _filter_axis(_filter_axis(padded, smooth, -2, h), derivative, -1, w)
    return torch.sqrt(d_row * d_row + d_col * d_col)


def _filter_axis(x, kernel, dim: int, size: int):
    """x correlated with ``kernel`` along ``dim`` (padded by its radius on both sides): ``size``
    outputs. Shifted multiply-adds: a one-channel conv2d costs 10-20x more on CPUs."""
    out = x.narrow(dim, 0, size) * float(kernel[0])
    for tap in range(1, len(kernel)):
        out.add_(x.narrow(dim, tap, size), alpha=float(kernel[tap]))
    return out


class MapRecorder:
    """Stands for a Despeckler where frames are despeckled by code that knows nothing of the map
    (``volume_axes.despeckle_frames`` / ``despeckle_volume``): despeckles with ``uncertainty=True``
    and keeps the maps; :meth:`replay` then stands for it in a second call of the same code with
    the same arguments and hands back the maps in the same order, so that they are laid out
    (e.g. transposed back from another slice axis) exactly as the outputs were."""

    def __init__(self, despeckler):
        self.despeckler = despeckler
        self.maps = []

    def __getattr__(self, name):
        return getattr(self.despeckler, name)

    def denoise(self, frames, **options):
        out, unc = self.despeckler.denoise(frames, uncertainty=True, **options)
        self.maps.append(unc)
        return out

    def replay(self) -> "_Replay":
        return _Replay(self.maps)


class _Replay:
    def __init__(self, maps):
        self.maps = list(maps)

    def denoise(self, frames, **_options):
        unc = self.maps.pop(0)
        if unc.shape != frames.shape:
            raise RuntimeError(f"replayed map of shape {unc.shape} for frames of shape {frames.shape}")
        return unc
