"""Classical baselines: speckle reduction, edge preservation, dtype/shape/range, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from benchlib import baselines as filters
from Speckle2SelfLib.simulation import simulate_bmode, speckle_contrast

SIZE = 128
EDGE = 64
# The paper's pixel size (512 px over 45 x 50 mm) on a 128 x 128 crop.
FIELD = dict(width_mm=45.0 * SIZE / 512, depth_mm=50.0 * SIZE / 512)


def _quadrant_image() -> tuple:
    """B-mode of a 2 x 2 checkerboard of grey 0.4 / 0.8 quadrants (edges at row and column EDGE)
    and its speckle-free reference: one image gives an axial and a lateral step edge."""
    clean = np.full((SIZE, SIZE), 0.4, np.float32)
    clean[EDGE:, :EDGE] = 0.8
    clean[:EDGE, EDGE:] = 0.8
    result = simulate_bmode(clean, fc=7.5e6, seed=21, **FIELD)
    return result.bmode, result.reference


def _edge_position(img: np.ndarray, axis: int) -> float:
    """Sub-pixel index where the mean profile across the edge (along ``axis``, averaged over the
    first quadrant's span 8..48 of the other axis) crosses halfway between the plateaus."""
    profile = img.astype(np.float64)
    profile = profile[:, 8:48].mean(axis=1) if axis == 0 else profile[8:48, :].mean(axis=0)
    low, high = profile[8:EDGE - 12].mean(), profile[EDGE + 12:-8].mean()
    half = 0.5 * (low + high)
    window = profile[EDGE - 12:EDGE + 12]
    above = np.nonzero(window >= half)[0][0]
    before, after = window[above - 1], window[above]
    return EDGE - 12 + above - 1 + (half - before) / (after - before)


@pytest.fixture(scope="module")
def quadrants():
    return _quadrant_image()


@pytest.mark.parametrize("name", sorted(filters.BASELINES))
def test_filter_reduces_speckle_and_keeps_edges(name, quadrants):
    noisy, reference = quadrants
    out = filters.BASELINES[name](noisy)
    assert out.dtype == noisy.dtype == np.float32 and out.shape == noisy.shape
    flat = np.zeros(noisy.shape, bool)
    flat[8:EDGE - 12, 8:EDGE - 12] = True  # inside the top-left quadrant
    before, after = speckle_contrast(noisy, flat), speckle_contrast(out, flat)
    assert after < 0.6 * before, f"{name}: speckle contrast {before:.3f} -> {after:.3f}"
    for axis in (0, 1):
        shift = abs(_edge_position(out, axis) - _edge_position(reference, axis))
        assert shift <= 2.0, f"{name} moved the edge along axis {axis} by {shift:.2f} px"


@pytest.mark.parametrize("name", sorted(filters.BASELINES))
def test_filter_keeps_shape_dtype_range_and_input(name, quadrants):
    noisy, _ = quadrants
    crop = noisy[:48, :40]
    as_uint8 = np.round(crop * 255).astype(np.uint8)
    envelope_like = (crop.astype(np.float64) * 3.0 + 0.5)  # float outside [0, 1]
    for img in (as_uint8, envelope_like, as_uint8.astype(np.uint16) * 100):
        before = img.copy()
        out = filters.BASELINES[name](img)
        np.testing.assert_array_equal(img, before)  # never modified in place
        assert out.shape == img.shape and out.dtype == img.dtype
        lo = min(0.0, float(img.min()))
        hi = 255.0 if img.dtype == np.uint8 else float(img.max())
        assert lo <= out.min() and out.max() <= hi
        assert not np.array_equal(out, img)


@pytest.mark.parametrize("bad, error, words", [
    (np.zeros((3, 16, 16)), ValueError, "2D"),
    (np.full((16, 16), np.nan), ValueError, "NaN"),
    (np.zeros((0, 16)), ValueError, "empty"),
    (np.zeros((16, 16), bool), TypeError, "dtype"),
    (np.zeros((4, 16)), ValueError, "too small"),
])
def test_bad_input_is_rejected_with_a_clear_message(bad, error, words):
    for name, fn in filters.BASELINES.items():
        with pytest.raises(error, match=words):
            fn(bad)


def test_constant_image_is_returned_unchanged():
    img = np.full((16, 16), 7, np.uint8)
    for fn in filters.BASELINES.values():
        np.testing.assert_array_equal(fn(img), img)


def test_bad_parameters_are_rejected():
    img = np.random.default_rng(0).random((32, 32))
    with pytest.raises(ValueError, match="odd"):
        filters.median(img, size=4)
    with pytest.raises(ValueError, match="damping"):
        filters.frost(img, damping=0)
    with pytest.raises(ValueError, match="time_step"):
        filters.srad(img, time_step=2.0)
    with pytest.raises(ValueError, match="search_radius"):
        filters.obnlm(img, search_radius=0)


def test_noise_estimate_of_white_noise():
    rng = np.random.default_rng(4)
    sigma = 0.05
    img = np.clip(0.5 + rng.normal(0, sigma, (256, 256)), 0, 1)
    noise = filters.estimate_speckle_noise(img)
    lag = noise.acf.shape[0] // 2
    assert noise.variance == pytest.approx(sigma ** 2, rel=0.15)
    assert abs(noise.acf[lag, lag + 1]) < 0.1 * noise.variance  # uncorrelated
    assert noise.cv2 == pytest.approx((sigma / 0.5) ** 2, rel=0.15)
    psd = filters.noise_psd(noise, img.shape)
    # White noise: flat PSD at sigma^2 * number of pixels (the bm3d package's convention).
    assert np.median(psd) == pytest.approx(sigma ** 2 * img.size, rel=0.2)
    assert psd.max() / psd.min() < 2.0


def test_noise_estimate_sees_the_lateral_speckle_correlation(quadrants):
    noise = filters.estimate_speckle_noise(quadrants[0])
    lag = noise.acf.shape[0] // 2
    lateral, axial = noise.acf[lag, lag + 1], noise.acf[lag + 1, lag]
    # Lateral grain (0.33 mm = 3.8 px) is wider than axial grain (0.14 mm = 1.4 px).
    assert lateral > 0.5 * noise.variance and lateral > axial
