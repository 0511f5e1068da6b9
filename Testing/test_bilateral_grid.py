"""The bilateral grid (engine.bilateral_grid), the guided refinement the product runs: the
Gaussian joint bilateral filter it approximates, the direct reference filter it replaces,
and the same result whatever the strip height, batch or frame size."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from Speckle2SelfLib.engine import bilateral_grid, refine
from Speckle2SelfLib.engine.inference import Despeckler


def _speckled_scene(size: int = 72, seed: int = 0):
    """A bright disc on a darker background with multiplicative 2-px speckle, and a smooth
    guide (the clean scene blurred by 2 px), both in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    clean = np.where((yy - size / 2) ** 2 + (xx - size / 2.5) ** 2 < (size / 4) ** 2, 0.7, 0.25)
    grain = ndimage.gaussian_filter(rng.standard_normal((size, size)), 1.0)
    speckled = np.clip(clean * (1 + 0.35 * grain / grain.std()), 0, 1)
    guide = ndimage.gaussian_filter(clean, 2.0)
    as_batch = lambda a: torch.from_numpy(a.astype(np.float32))[None, None]     # noqa: E731
    return as_batch(speckled), as_batch(guide)


def _gaussian_bilateral(image, guide, sigma, range_sigma):
    """The filter's definition: every pixel within 4 sigma, Gaussian in distance and in guide
    difference, only pixels inside the frame (no padding values)."""
    radius = int(np.ceil(4 * sigma))
    h, w = image.shape[-2:]
    total, weights = torch.zeros_like(image), torch.zeros_like(image)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            rows = slice(max(0, -dy), min(h, h - dy))
            cols = slice(max(0, -dx), min(w, w - dx))
            near = (..., slice(rows.start + dy, rows.stop + dy), slice(cols.start + dx, cols.stop + dx))
            here = (..., rows, cols)
            weight = torch.exp(-(guide[here] - guide[near]) ** 2 / (2 * range_sigma ** 2)
                               - (dy * dy + dx * dx) / (2 * sigma ** 2))
            total[here] += weight * image[near]
            weights[here] += weight
    return total / weights


@pytest.mark.parametrize("sigma, range_sigma", [(3.0, 0.08), (5.0, 0.04)])
def test_the_grid_approximates_the_gaussian_joint_bilateral_filter(sigma, range_sigma):
    image, guide = _speckled_scene()
    exact = _gaussian_bilateral(image, guide, sigma, range_sigma)
    cells = sigma / refine.GRID_CELLS_PER_SIGMA
    grid = bilateral_grid.grid_filter(image, guide, sigma, range_sigma, cells, range_sigma / refine.GRID_CELLS_PER_SIGMA)
    difference = (grid - exact).abs()
    assert float(difference.mean()) < 0.004          # of a [0, 1] range: about 1 grey level of 255
    assert float(difference.max()) < 0.04
    # and it is a filter that matters: the speckle's own deviation from the exact result is far larger
    assert float((image - exact).abs().mean()) > 10 * float(difference.mean())


def test_the_grid_keeps_the_edge_and_averages_the_speckle_like_the_reference():
    """The product's filter (guided_filter) against the direct reference (guided_smoothing) at the
    bundled default's settings: close everywhere, the same smoothing and the same edge."""
    image, guide = _speckled_scene(size=96, seed=3)
    settings = refine.settings_for(1.0, **refine.model_settings(Despeckler.from_file(None, "cpu").metadata))
    grid = refine.guided_filter(image, guide, settings)
    direct = refine.guided_smoothing(image, guide, settings)
    assert float((grid - direct).abs().mean()) < 2.0 / 255
    inside = (..., slice(40, 56), slice(32, 44))        # within the disc, away from its edge
    assert float(grid[inside].std()) < 0.5 * float(image[inside].std())
    assert abs(float(grid[inside].std()) - float(direct[inside].std())) < 0.01
    edge_row = grid[0, 0, 48].numpy(), direct[0, 0, 48].numpy()
    assert np.argmax(np.diff(edge_row[0][:30])) == np.argmax(np.diff(edge_row[1][:30]))


def test_the_result_is_a_weighted_mean_of_input_pixels():
    image, guide = _speckled_scene(seed=5)
    out = bilateral_grid.grid_filter(image, guide, 4.0, 0.05, 3.2, 0.04)
    assert float(image.min()) - 1e-6 <= float(out.min()) and float(out.max()) <= float(image.max()) + 1e-6
    flat = bilateral_grid.grid_filter(torch.full_like(image, 0.3), guide, 4.0, 0.05, 3.2, 0.04)
    torch.testing.assert_close(flat, torch.full_like(image, 0.3), atol=1e-6, rtol=0)


def test_a_flat_guide_gives_a_plain_gaussian_blur():
    """With one guide level the range kernel weighs every neighbour alike: a normalised
    Gaussian blur of the frame (only pixels inside it)."""
    image, _guide = _speckled_scene(seed=6)
    sigma = 3.0
    out = bilateral_grid.grid_filter(image, torch.zeros_like(image), sigma, 0.05, sigma / 1.25, 0.04)
    ones = torch.ones_like(image)[0, 0].numpy()
    blurred = ndimage.gaussian_filter(image[0, 0].numpy(), sigma, mode="constant", truncate=4.0) \
        / ndimage.gaussian_filter(ones, sigma, mode="constant", truncate=4.0)
    assert float(np.abs(out[0, 0].numpy() - blurred).mean()) < 0.003


def test_strips_batches_and_frame_size_do_not_change_the_result(monkeypatch):
    image, guide = _speckled_scene(size=61, seed=8)
    other_image, other_guide = _speckled_scene(size=61, seed=9)
    whole = bilateral_grid.grid_filter(image, guide, 5.0, 0.06, 4.0, 0.048)
    monkeypatch.setattr(bilateral_grid, "STRIP_PIXELS", 61 * 7 + 3)          # strips of 7 rows
    torch.testing.assert_close(bilateral_grid.grid_filter(image, guide, 5.0, 0.06, 4.0, 0.048), whole,
                               atol=1e-6, rtol=0)
    monkeypatch.setattr(bilateral_grid, "STRIP_PIXELS", 1)                    # one row at a time
    batch = bilateral_grid.grid_filter(torch.cat([other_image, image]), torch.cat([other_guide, guide]),
                                       5.0, 0.06, 4.0, 0.048)
    torch.testing.assert_close(batch[1:], whole, atol=1e-6, rtol=0)
    alone = bilateral_grid.grid_filter(other_image, other_guide, 5.0, 0.06, 4.0, 0.048)
    torch.testing.assert_close(batch[:1], alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (1, 1, 9, 300), (2, 1, 150, 11)])
def test_frames_of_any_shape_including_smaller_than_a_cell(shape):
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random(shape).astype(np.float32))
    guide = torch.from_numpy(rng.random(shape).astype(np.float32))
    out = bilateral_grid.grid_filter(image, guide, 12.0, 0.06, 9.6, 0.048)
    assert out.shape == image.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_long_axes_blur_in_blocks_as_one_matrix_would():
    """Axes longer than two blocks are blurred block by block (cost per cell, not per cell x axis)."""
    x = torch.from_numpy(np.random.default_rng(2).random((3, 4, 3 * bilateral_grid.BLUR_BLOCK + 7)).astype(np.float32))
    length = x.shape[-1]
    sigma = 2.5
    whole = x @ bilateral_grid._gaussian_band(length, length, 0, sigma, "cpu")
    blocked = bilateral_grid._blur_last(x, sigma)
    # the blocked product stops at 3 sigma, the whole-axis matrix does not
    assert float((blocked - whole).abs().max()) < 0.01 * float(whole.abs().max())


def test_the_engine_runs_the_grid_and_the_reference_on_request():
    rng = np.random.default_rng(4)
    frame = (ndimage.gaussian_filter(rng.random((96, 112)), 1.0) * 255).astype(np.uint8)
    engine = Despeckler.from_file(None, "cpu", backend="fp32")
    grid = engine.denoise(frame, working_scale=1.0).astype(float)
    engine.refine_method = "direct"
    direct = engine.denoise(frame, working_scale=1.0).astype(float)
    assert 0 < np.abs(grid - direct).mean() < 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU in this PyTorch build or machine")
def test_cuda_gives_the_cpu_result():
    image, guide = _speckled_scene(size=130, seed=11)
    cpu = bilateral_grid.grid_filter(image, guide, 6.0, 0.05, 4.8, 0.04)
    gpu = bilateral_grid.grid_filter(image.cuda(), guide.cuda(), 6.0, 0.05, 4.8, 0.04)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)



def test_concurrent_calls_in_threads_give_each_its_own_result():
    """The grid keeps scratch buffers between calls, one set per thread: a despeckling job and the
    live relay filtering at once must not write into each other's (a frame stream reuses them)."""
    from concurrent.futures import ThreadPoolExecutor

    scenes = [_speckled_scene(size=224 + 8 * k, seed=20 + k) for k in range(4)]
    alone = [bilateral_grid.grid_filter(image, guide, 5.0, 0.06, 4.0, 0.048) for image, guide in scenes]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _round in range(3):
            together = list(pool.map(lambda scene: bilateral_grid.grid_filter(*scene, 5.0, 0.06, 4.0, 0.048), scenes))
            for got, want in zip(together, alone):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_a_frame_too_large_for_the_kept_scratch_is_filtered_the_same(monkeypatch):
    image, guide = _speckled_scene(size=80, seed=30)
    kept = bilateral_grid.grid_filter(image, guide, 5.0, 0.06, 4.0, 0.048)
    assert bilateral_grid._scratch.buffers                               # a small frame's buffers stay
    monkeypatch.setattr(bilateral_grid, "SCRATCH_KEEP_BYTES", 0)        # every buffer fresh, none kept
    monkeypatch.setattr(bilateral_grid._scratch, "buffers", {})
    fresh = bilateral_grid.grid_filter(image, guide, 5.0, 0.06, 4.0, 0.048)
    assert bilateral_grid._scratch.buffers == {}
    torch.testing.assert_close(fresh, kept, atol=1e-6, rtol=0)


def test_cells_coarser_than_the_filter_are_refused():
    image, guide = _speckled_scene(size=32, seed=31)
    with pytest.raises(ValueError, match="at most the filter's sigmas"):
        bilateral_grid.grid_filter(image, guide, 3.0, 0.05, 4.0, 0.04)
