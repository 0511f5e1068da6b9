"""Joint bilateral filtering in time proportional to the pixels: the bilateral grid.

Chen, Paris and Durand (2007): a joint bilateral filter of an image steered by a guide is a
3D Gaussian blur in (row, column, guide level) space. Each pixel's value and a weight of one
are *splatted* into a coarse grid at (row / cell, column / cell, level / level cell), the grid
is blurred with a separable Gaussian, and each pixel reads back (*slices*) the blurred value
and weight at its own position; their ratio is the filtered pixel. The grid has one cell per
``cell_px`` pixels and per ``level_cell`` of the guide's range, so its size (and the blur's
cost) falls as the filter widens, and the splat and slice cost a fixed amount per pixel
whatever the window: a 41 x 41 window costs what a 5 x 5 one does.

The splat is nearest-cell in space and linear in level; the slice is trilinear. The blur's
Gaussian is narrowed so that splat + blur + slice together have the requested spatial and range
variances. Global factors cancel in value / weight, so the blur needs no normalising. The grid
is laid out with the level innermost, and the slice gathers, for each pixel, the 16 numbers
(value and weight at the 8 corners of its cell) from a corner table with one row per number:
torch's gather spreads that over its threads where ``index_select`` runs on one. (Dividing value
by weight in the grid before the slice would read 8 numbers per pixel instead of 16, but it blends
level cells without their weights and lost flood-fill IoU on the carotid test subjects:
docs/methodology.md.)
Frames run in strips of rows: per-pixel temporaries stay small and are reused from the
allocator's cache (whole-frame temporaries cost more in page faults than in arithmetic), and
huge frames need no more than the grid and the output. The result does not depend on the
strip height. Everything runs in torch on the tensors' device (CPU or CUDA).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

#: Pixels per strip of the splat and the slice, over all frames of a call (whole rows of every
#: frame, at least one): large enough to amortise the per-strip calls (smaller strips timed slower,
#: ``benchmarks/refine_methods.py``'s timing rows), and a fixed size, so that the slice's workspace is
#: the same for any batch and stays in the per-thread scratch.
STRIP_PIXELS = 1 << 17


class _Grid(NamedTuple):
    """Sizes of a grid: frames, level cells, row cells, column cells, and the cell sizes."""

    frames: int
    depth: int
    rows: int
    cols: int
    cell_px: float

    @property
    def plane(self) -> int:
        return self.rows * self.cols


def grid_filter(image, guide, sigma_px: float, range_sigma: float, cell_px: float, level_cell: float):
    """Joint bilateral filter of ``image`` steered by ``guide``, both (N, 1, H, W) float on one device.

    ``sigma_px``: spatial Gaussian sigma (pixels); ``range_sigma``: Gaussian sigma of guide
    differences (guide units); ``cell_px`` / ``level_cell``: the grid's sampling (at most about
    the sigmas: coarser cells cannot carry the Gaussian). Returns float32 (N, 1, H, W), each
    pixel a weighted mean of input pixels (within the input's range).
    """
    import torch

    check_cells(sigma_px, range_sigma, cell_px, level_cell)
    image = image.float()
    n, _, h, w = image.shape
    levels = _level_coordinates(guide.float(), level_cell)
    grid = _Grid(n, int(levels.max().floor()) + 2, _cell_count(h, cell_px), _cell_count(w, cell_px), cell_px)
    sums = scratch("sums", 2 * n * grid.depth * grid.plane, image.device).zero_().view(2, -1)
    strips = _strips(h, w, n)
    for top, bottom in strips:
        _splat(sums[0], sums[1], image[:, 0, top:bottom], levels[:, 0, top:bottom], top, grid)
    blurred = _blur(sums.view(2, n, grid.rows, grid.cols, grid.depth),
                    _blur_sigma(sigma_px, cell_px, spatial=True), _blur_sigma(range_sigma, level_cell, spatial=False))
    table = corner_table(blurred, scratch("table", 8 * blurred[:, :, 1:, 1:, 1:].numel(), image.device))
    out = torch.empty_like(image)
    workspace = scratch("slice", SLICE_FLOATS * 2 * n * (strips[0][1] - strips[0][0]) * w, image.device)
    for top, bottom in strips:
        sliced = slice_grid(table, levels[:, 0, top:bottom], top, grid, workspace)
        # every pixel's weight is positive: its own splat lies within the blur's reach of its position
        torch.div(sliced[0], sliced[1], out=out[:, 0, top:bottom])
    return out


#: Bytes of scratch memory (the corner table, the slice's workspace) a thread keeps between calls.
#: Fresh buffers of a few MB cost more in page faults than the filtering that fills them (they come
#: back from the system zeroed on every call); a frame stream reuses them. Larger ones (frames of
#: thousands of pixels a side) are allocated per call and given back.
SCRATCH_KEEP_BYTES = 64 << 20
_scratch = threading.local()


def scratch(name: str, floats: int, device):
    """A float32 buffer of ``floats`` elements, reused by this thread's later calls where small
    enough (SCRATCH_KEEP_BYTES in all); its contents are undefined. One per ``name``: a call may
    hold several at once. Per thread, so concurrent filters (a job and the live relay) never share."""
    import torch

    kept = getattr(_scratch, "buffers", None)
    if kept is None:
        kept = _scratch.buffers = {}
    key = (name, str(device))
    buffer = kept.get(key)
    if buffer is not None and buffer.numel() >= floats:
        return buffer[:floats]
    buffer = torch.empty(floats, dtype=torch.float32, device=device)
    others = sum(b.numel() for k, b in kept.items() if k != key) * 4
    if others + floats * 4 <= SCRATCH_KEEP_BYTES:
        kept[key] = buffer
    else:
        kept.pop(key, None)
    return buffer


def check_cells(sigma_px: float, range_sigma: float, cell_px: float, level_cell: float) -> None:
    """A ValueError unless the cells are at most the sigmas: the blur must reach every cell a
    pixel reads (and a coarser grid cannot carry the Gaussian)."""
    if not (0 < cell_px <= sigma_px and 0 < level_cell <= range_sigma):
        raise ValueError(f"grid cells ({cell_px:g} px, {level_cell:g} levels) must be positive and at most the "
                         f"filter's sigmas ({sigma_px:g} px, {range_sigma:g}): pass smaller cells")


def _level_coordinates(guide, level_cell: float):
    """Each pixel's guide level in level cells above the frame's lowest (+1: one empty cell below)."""
    lowest = guide.amin(dim=(1, 2, 3), keepdim=True)
    return (guide - lowest).div_(level_cell).add_(1.0)


def _cell_count(pixels: int, cell_px: float) -> int:
    """Cells along a side: those the pixel centres fall in, and one empty cell on each side."""
    return int(math.floor((pixels - 0.5) / cell_px)) + 3


def _strips(h: int, w: int, n: int):
    """(top, bottom) rows of the strips of ``n`` frames of ``h`` x ``w`` pixels."""
    step = max(1, STRIP_PIXELS // max(1, n * w))
    return [(top, min(h, top + step)) for top in range(0, h, step)]


def _centres(start: int, stop: int, cell_px: float, device):
    """Pixel centres start..stop-1 in cell units (0 at the frame's edge)."""
    import torch

    return (torch.arange(start, stop, dtype=torch.float32, device=device) + 0.5) / cell_px


def _frame_offsets(n: int, size: int, device):
    import torch

    return (torch.arange(n, device=device) * size).view(n, 1, 1)


def _splat(values, weights, image, levels, top: int, grid: _Grid) -> None:
    """Add the pixels of one strip ((N, rows, W) values and levels) to the flat grids: each to
    the spatial cell its centre falls in (cell k >= 1 spans [k - 1, k) in cell units), shared
    linearly between the two level cells around its level."""
    import torch

    n, height, w = image.shape
    device = image.device
    row_cell = _centres(top, top + height, grid.cell_px, device).long().add_(1)    # floor: centres > 0
    col_cell = _centres(0, w, grid.cell_px, device).long().add_(1)
    cell = (row_cell.view(1, -1, 1) * grid.cols + col_cell.view(1, 1, -1)) + _frame_offsets(n, grid.plane, device)
    low = levels.floor()
    upper = (levels - low).view(-1)
    index = torch.add(low.long(), cell, alpha=grid.depth).view(-1)       # level innermost
    value = image.reshape(-1)
    upper_value = upper * value
    values.scatter_add_(0, index, value - upper_value)
    weights.scatter_add_(0, index, 1.0 - upper)
    index += 1                                  # the level cell above
    values.scatter_add_(0, index, upper_value)
    weights.scatter_add_(0, index, upper)


def _blur_sigma(sigma: float, cell: float, spatial: bool) -> float:
    """The grid blur's sigma (in cells) that makes splat + blur + slice a Gaussian of ``sigma``.

    The nearest-cell splat adds a box of one cell (variance cell^2 / 12) in space, the linear
    splat a tent (cell^2 / 6) in level; the linear slice a tent in both.
    """
    splat = cell * cell / (12.0 if spatial else 6.0)
    remaining = sigma * sigma - splat - cell * cell / 6.0
    return math.sqrt(max(remaining, 0.0)) / cell


def _blur(grid, spatial_cells: float, level_cells: float):
    """Separable Gaussian blur of a (C, N, R, C', D) grid along R, C' and D (zeros outside)."""
    grid = _blur_axis(grid, 4, level_cells)
    grid = _blur_axis(grid, 3, spatial_cells)
    return _blur_axis(grid, 2, spatial_cells)


def _blur_axis(x, dim: int, sigma_cells: float):
    """Gaussian blur along ``dim``. A short inner axis (the usual grid) is blurred by one batched
    product with its band matrix from the left, with no transposed copy of the grid (those
    copies cost more than the products); long ones go through :func:`_blur_last`."""
    import torch

    length = x.shape[dim]
    after = math.prod(x.shape[dim + 1:])
    if sigma_cells < 1e-3:
        return x
    if after == 1 or length > 2 * BLUR_BLOCK:
        moved = x.movedim(dim, -1).contiguous()
        return _blur_last(moved, sigma_cells).movedim(-1, dim).contiguous()
    band = _gaussian_band(length, length, 0, sigma_cells, x.device)
    return torch.matmul(band.t(), x.reshape(-1, length, after)).view(x.shape)


#: Cells per block of the blur's matrix products (see _blur_last).
BLUR_BLOCK = 64


def _blur_last(x, sigma_cells: float):
    """Gaussian blur along the last axis (zeros outside) as matrix products: a whole-axis
    matrix on short axes; on long ones, blocks of BLUR_BLOCK outputs each from its window
    of inputs, so the cost stays proportional to the cells. On grids, BLAS products beat
    one-channel convolutions several times over."""
    import torch.nn.functional as F

    if sigma_cells < 1e-3:
        return x
    length = x.shape[-1]
    radius = max(1, int(math.ceil(3.0 * sigma_cells)))
    shape = x.shape
    if length <= 2 * BLUR_BLOCK:
        band = _gaussian_band(length, length, 0, sigma_cells, x.device)
        return (x.reshape(-1, length) @ band).view(shape)          # one 2D product (reshape copies)
    blocks = -(-length // BLUR_BLOCK)
    padded = F.pad(x.reshape(-1, length), (radius, blocks * BLUR_BLOCK - length + radius))
    windows = padded.unfold(-1, BLUR_BLOCK + 2 * radius, BLUR_BLOCK).reshape(-1, BLUR_BLOCK + 2 * radius)
    out = windows @ _gaussian_band(BLUR_BLOCK + 2 * radius, BLUR_BLOCK, radius, sigma_cells, x.device)
    return out.view(-1, blocks * BLUR_BLOCK)[:, :length].reshape(shape)


def _gaussian_band(inputs: int, outputs: int, offset: int, sigma_cells: float, device):
    """(inputs, outputs) matrix: output j takes input i with the Gaussian of i - offset - j."""
    import torch

    i = torch.arange(inputs, dtype=torch.float32, device=device).view(-1, 1)
    j = torch.arange(outputs, dtype=torch.float32, device=device).view(1, -1)
    return torch.exp(-0.5 * ((i - offset - j) / sigma_cells) ** 2)


#: Floats per pixel of a strip and per channel that :func:`slice_grid` needs (8 corners, 4, 2, 1).
SLICE_FLOATS = 15


def corner_table(grid, out=None):
    """(8 C, cells) table of a (C, N, R, C', D) grid: for every cell (frame, row, column, level),
    the cube it spans with its upper neighbours, ordered [column step][row step][level step]
    [channel], so that each interpolation step of the slice blends the two halves of what the
    previous one left, on contiguous rows of pixels. ``out``: a flat buffer of 8 C x cells floats
    to write it into (e.g. :func:`scratch`)."""
    import torch

    channels = grid.shape[0]
    r, c, d = (size - 1 for size in grid.shape[2:])
    cube = [grid[channel, :, dy:r + dy, dx:c + dx, dz:d + dz]
            for dx in (0, 1) for dy in (0, 1) for dz in (0, 1) for channel in range(channels)]
    if out is None:
        return torch.stack(cube).view(8 * channels, -1)
    return torch.stack(cube, out=out.view(8 * channels, *cube[0].shape)).view(8 * channels, -1)


def slice_grid(table, levels, top: int, grid: _Grid, workspace):
    """One strip ((N, rows, W) levels) of every channel of the table's grid read trilinearly at
    each pixel: a (C, N, rows, W) view into ``workspace``, which holds SLICE_FLOATS x C floats per
    pixel of the largest strip and is reused by every strip (fresh temporaries of this size cost
    more in page faults than the arithmetic)."""
    import torch

    c = table.shape[0] // 8
    n, height, w = levels.shape
    pixels = n * height * w
    device = levels.device
    rows, cols, depth = grid.rows - 1, grid.cols - 1, grid.depth - 1     # the corner table's extent
    row_pos = _centres(top, top + height, grid.cell_px, device).add_(0.5)   # cell k's centre at k
    col_pos = _centres(0, w, grid.cell_px, device).add_(0.5)
    row_low, col_low = row_pos.floor(), col_pos.floor()
    low = levels.floor()
    spatial = (row_low.long().view(1, -1, 1) * cols + col_low.long().view(1, 1, -1)) * depth
    index = low.long().add_(spatial).add_(_frame_offsets(n, rows * cols * depth, device))
    cube, square, edge, point = (workspace[start * c * pixels:(start + size) * c * pixels].view(size * c, n, height, w)
                                 for start, size in ((0, 8), (8, 4), (12, 2), (14, 1)))
    # gather with the index broadcast over the table's rows: one parallel pass (index_select's
    # column gather runs on one thread)
    torch.gather(table, 1, index.view(1, -1).expand(8 * c, pixels), out=cube.view(8 * c, pixels))
    torch.lerp(cube[:4 * c], cube[4 * c:], col_pos - col_low, out=square)          # weights broadcast
    torch.lerp(square[:2 * c], square[2 * c:], (row_pos - row_low).view(-1, 1), out=edge)
    torch.lerp(edge[:c], edge[c:], levels - low, out=point)
    return point
