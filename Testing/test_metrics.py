"""Image-quality metrics against answers known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchlib import quality
from Speckle2SelfLib import metrics


def test_psnr_of_known_mse():
    reference = np.zeros((32, 32), np.float32)
    assert metrics.psnr(reference, reference + 0.1, data_range=1.0) == pytest.approx(20.0, abs=1e-4)
    # uint8 infers a range of 255: MSE 100 -> 10 log10(255^2 / 100).
    ref8 = np.full((16, 16), 100, np.uint8)
    assert metrics.psnr(ref8, ref8 + 10) == pytest.approx(10 * math.log10(255 ** 2 / 100), abs=1e-6)
    assert metrics.psnr(reference, reference) == float("inf")


def test_psnr_needs_a_range_it_can_infer():
    a = np.linspace(-1, 3, 64).reshape(8, 8)
    with pytest.raises(ValueError, match="data_range"):
        metrics.psnr(a, a + 1)
    with pytest.raises(ValueError, match="shape"):
        metrics.psnr(np.zeros((8, 8)), np.zeros((8, 9)))


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    x = np.clip(np.add.outer(np.linspace(0, 0.8, 64), np.linspace(0, 0.2, 64)), 0, 1)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    slightly = np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1)
    heavily = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    assert 1.0 > metrics.ssim(x, slightly) > metrics.ssim(x, heavily)
    with pytest.raises(ValueError, match="11 x 11"):
        metrics.ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_glcm_homogeneity_known_values():
    assert metrics.glcm_homogeneity(np.full((16, 16), 0.5)) == pytest.approx(1.0)
    # Checkerboard 0/255: horizontal and vertical neighbours differ by 255, diagonal ones are
    # equal -> mean of (1/(1+255^2), 1/(1+255^2), 1, 1).
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    expected = (2.0 / (1 + 255 ** 2) + 2.0) / 4.0
    assert metrics.glcm_homogeneity(board) == pytest.approx(expected, rel=1e-6)


def test_glcm_homogeneity_rises_when_speckle_is_smoothed():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    noisy = np.clip(0.5 + rng.normal(0, 0.1, (64, 64)), 0, 1)
    assert metrics.glcm_homogeneity(ndimage.uniform_filter(noisy, 5)) > metrics.glcm_homogeneity(noisy) + 0.1


def test_enl_and_snr_of_rayleigh_and_exponential_speckle():
    rng = np.random.default_rng(2)
    amplitude = rng.rayleigh(1.0, (400, 400))
    assert quality.enl(amplitude) == pytest.approx(1.0 / (4.0 / math.pi - 1.0), rel=0.03)
    assert metrics.speckle_snr(amplitude) == pytest.approx(1.913, rel=0.02)
    assert quality.enl(amplitude ** 2) == pytest.approx(1.0, rel=0.03)  # intensity: one look
    # A mask restricts the statistics: a constant region next to speckle has infinite ENL.
    image = amplitude.copy()
    image[:, :200] = 3.0
    mask = np.zeros(image.shape, bool)
    mask[:, :200] = True
    assert quality.enl(image, mask) == float("inf")
    assert quality.enl(image, ~mask) == pytest.approx(3.66, rel=0.04)


def test_cnr_of_known_regions():
    image = np.zeros((4, 8))
    image[:, :4] = np.array([0.0, 2.0, 0.0, 2.0])  # mean 1, variance 1
    image[:, 4:] = np.array([4.0, 6.0, 4.0, 6.0])  # mean 5, variance 1
    left = np.zeros(image.shape, bool)
    left[:, :4] = True
    assert quality.cnr(image, left, ~left) == pytest.approx(4.0 / math.sqrt(2.0))
    assert quality.cnr(image, ~left, left) == pytest.approx(4.0 / math.sqrt(2.0))


def test_region_arguments_are_checked():
    image = np.ones((8, 8))
    with pytest.raises(TypeError, match="boolean"):
        quality.enl(image, np.ones((8, 8), int))
    with pytest.raises(ValueError, match="shape"):
        metrics.speckle_snr(image, np.ones((4, 4), bool))
    one_pixel = np.zeros((8, 8), bool)
    one_pixel[0, 0] = True
    with pytest.raises(ValueError, match="at least 2"):
        quality.cnr(image, one_pixel, ~one_pixel)
    with pytest.raises(ValueError, match="2D"):
        quality.enl(np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        quality.enl(np.full((8, 8), np.nan))


def test_singular_value_decay():
    rank_one = np.outer(np.linspace(1, 2, 20), np.linspace(0.5, 1, 30))
    decay = quality.singular_value_decay(rank_one, top_k=1)
    assert decay.values[0] == pytest.approx(1.0)
    assert np.all(decay.values[1:] < 1e-10)
    assert decay.top_k_energy == pytest.approx(1.0)
    identity = quality.singular_value_decay(np.eye(16), top_k=4)
    np.testing.assert_allclose(identity.values, 1.0)
    assert identity.top_k_energy == pytest.approx(4 / 16)
    # Speckle spreads energy over many singular values; smoothing concentrates it again.
    rng = np.random.default_rng(3)
    speckled = rank_one * rng.rayleigh(1.0, rank_one.shape)
    assert quality.singular_value_decay(speckled, 3).top_k_energy < 0.99
    with pytest.raises(ValueError, match="zeros"):
        quality.singular_value_decay(np.zeros((4, 4)))


def test_homogeneity_breakdown_counts_tissue_pairs_only():
    import homogeneity_breakdown as hb

    # A 40 x 48 frame: floor (1) surround on the left 18 columns, tissue to its right whose
    # columns alternate between 50 and 53 (horizontal differences of 3), a "lumen" block.
    image = np.full((40, 48), 1, np.uint8)
    image[:, 18:] = 50
    image[:, 19::2] = 53
    lumen = np.zeros(image.shape, bool)
    lumen[15:25, 30:40] = True
    surround = hb.background_mask(image)
    assert surround[:, :8].all() and not surround[:, 18:].any()
    total, counts = hb.pair_statistics(image, lumen | surround)
    assert total == 40 * 47
    # Tissue pairs differ by 3, less the 11 per row that touch the lumen; the surround's own
    # blurred rim stays in (equal pairs) with its one step of 49 into tissue per row.
    assert counts[3] == 40 * 29 - 10 * 11
    assert counts[4] == 40 and counts[1] == counts[2] == 0
    flat = image.copy()
    flat[:, 18:] = 50
    row = hb.breakdown([flat], [lumen | surround])
    assert row["diff 0"] == pytest.approx(100.0 * (counts.sum() - 40) / counts.sum())
    assert row["diff >5"] == pytest.approx(100.0 * 40 / counts.sum())
    assert row["homogeneity"] > hb.breakdown([image], [lumen | surround])["homogeneity"]
