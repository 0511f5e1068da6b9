"""Speckle simulator: speckle statistics, grain size, display mapping, phantoms, CLI."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from benchlib import speckle_statistics
from Speckle2SelfLib import simulation as sim
from Speckle2SelfLib.cli import simulate as simulate_cli

# 256 x 256 pixels over half the paper's field keeps the paper's pixel size (0.098 x 0.088 mm).
HALF_FIELD = dict(width_mm=22.5, depth_mm=25.0)
INNER = (24, 232, 24, 232)  # rows/cols away from the border


def _flat(grey: float = 0.7, size: int = 256) -> np.ndarray:
    return np.full((size, size), grey, np.float32)


def test_homogeneous_region_is_fully_developed_speckle():
    result = sim.simulate_bmode(_flat(), fc=7.5e6, seed=3, **HALF_FIELD)
    mask = np.zeros(result.envelope.shape, bool)
    mask[INNER[0]:INNER[1], INNER[2]:INNER[3]] = True
    # Rayleigh envelope: mean / std = 1 / sqrt(4 / pi - 1) = 1.913.
    assert speckle_statistics.envelope_snr(result.envelope, mask) == pytest.approx(1.913, abs=0.08)
    assert sim.speckle_contrast(result.envelope, mask) == pytest.approx(0.523, abs=0.025)


@pytest.mark.parametrize("fc, scaling, expected", [
    (7.5e6, "must", (0.14, 0.33)),
    (3.75e6, "wavelength", (0.28, 0.66)),   # both axes scale with c / fc
    (3.75e6, "must", (0.28, 0.37)),         # MUST's smaller f-number at low fc keeps lateral grain
])
def test_grain_size_matches_target(fc, scaling, expected):
    result = sim.simulate_bmode(_flat(), fc=fc, seed=5, lateral_scaling=scaling, **HALF_FIELD)
    axial, lateral = speckle_statistics.autocorrelation_fwhm_mm(result.envelope, INNER, result.pixel_mm)
    assert axial == pytest.approx(expected[0], rel=0.1)
    assert lateral == pytest.approx(expected[1], rel=0.1)
    assert result.grain_fwhm_mm == pytest.approx(expected, rel=0.01)


def test_must_fnumber_rule_grows_with_frequency():
    fnumbers = [sim.must_receive_fnumber(fc) for fc in sim.PAPER_FREQUENCIES_HZ]
    assert fnumbers == sorted(fnumbers)
    assert sim.must_receive_fnumber(7.5e6) == pytest.approx(1.41, abs=0.02)
    with pytest.raises(ValueError, match="lateral_scaling"):
        sim.grain_fwhm_mm(7.5e6, "focused")


def test_output_types_ranges_and_pixel_size():
    clean = _flat(0.5, size=64)
    before = clean.copy()
    result = sim.simulate_bmode(clean, seed=0, width_mm=45.0, depth_mm=50.0)
    np.testing.assert_array_equal(clean, before)  # input untouched
    for image in (result.bmode, result.envelope, result.reference, result.clean):
        assert image.shape == (64, 64) and image.dtype == np.float32
    assert 0.0 <= result.bmode.min() and result.bmode.max() <= 1.0
    assert result.envelope.min() >= 0.0
    assert result.pixel_mm == pytest.approx((50.0 / 64, 45.0 / 64))


def test_seed_reproducible_and_speckle_changes_with_seed():
    clean = _flat(0.6, size=64)
    a = sim.simulate_bmode(clean, seed=11)
    b = sim.simulate_bmode(clean, seed=11)
    c = sim.simulate_bmode(clean, seed=12)
    np.testing.assert_array_equal(a.bmode, b.bmode)
    assert np.mean(np.abs(a.bmode - c.bmode)) > 0.05


def test_log_compression_maps_echogenicity_linearly_and_reference_is_the_expectation():
    # Two half-planes 0.3 and 0.8 grey: 40 dB echo range shown over a 60 dB display range.
    clean = np.full((256, 256), 0.3, np.float32)
    clean[128:] = 0.8
    result = sim.simulate_bmode(clean, seed=2, **HALF_FIELD)
    top = (slice(20, 108), slice(20, 236))
    bottom = (slice(148, 236), slice(20, 236))
    step = result.bmode[bottom].mean() - result.bmode[top].mean()
    assert step == pytest.approx(0.5 * 40.0 / 60.0, abs=0.01)
    for region in (top, bottom):
        assert result.bmode[region].mean() == pytest.approx(result.reference[region].mean(), abs=0.01)
    # Anechoic (grey 0) is 40 dB below grey 1: envelope ratio 100.
    dark = sim.simulate_bmode(_flat(0.0, 128), seed=1).envelope.mean()
    bright = sim.simulate_bmode(_flat(1.0, 128), seed=1).envelope.mean()
    assert bright / dark == pytest.approx(100.0, rel=0.1)


def test_tgc_compensates_attenuation_and_noise_grows_with_depth():
    clean = _flat(0.5, 128)
    no_att = sim.simulate_bmode(clean, seed=4, attenuation_db_cm_mhz=0.0)
    compensated = sim.simulate_bmode(clean, seed=4, attenuation_db_cm_mhz=0.5, tgc=True)
    raw = sim.simulate_bmode(clean, seed=4, attenuation_db_cm_mhz=0.5, tgc=False)
    # Same scatterers: TGC restores every depth (up to attenuation varying inside the PSF).
    ratio = compensated.envelope.mean(axis=1) / no_att.envelope.mean(axis=1)
    np.testing.assert_allclose(ratio, 1.0, atol=0.02)
    assert raw.envelope[100:].mean() < 0.1 * raw.envelope[:20].mean()
    noisy = sim.simulate_bmode(clean, seed=4, attenuation_db_cm_mhz=0.5, noise_db=-45.0)
    assert noisy.envelope[110:].mean() > 2.0 * no_att.envelope[110:].mean()
    assert noisy.envelope[:10].mean() == pytest.approx(no_att.envelope[:10].mean(), rel=0.05)


@pytest.mark.parametrize("kind", sim.PHANTOM_KINDS)
def test_phantoms(kind):
    phantom = sim.make_phantom(kind, size=(256, 256))
    assert phantom.name == kind
    assert phantom.clean.shape == (256, 256) and phantom.clean.dtype == np.float32
    assert 0.0 <= phantom.clean.min() and phantom.clean.max() <= 1.0
    assert phantom.homogeneous_mask.dtype == bool and phantom.homogeneous_mask.sum() > 500
    assert np.ptp(phantom.clean[phantom.homogeneous_mask]) == 0.0  # one echogenicity
    np.testing.assert_array_equal(phantom.clean, sim.make_phantom(kind, size=(256, 256)).clean)
    assert not np.array_equal(phantom.clean, sim.make_phantom(kind, size=(256, 256), seed=7).clean)


def test_carotid_phantom_has_anechoic_lumen_with_bright_wall():
    from scipy import ndimage

    phantom = sim.make_phantom("carotid", size=(512, 512), seed=3)
    lumen = phantom.lumen_mask
    assert lumen.dtype == bool and 1500 < lumen.sum() < 10000  # 6-8 mm diameter at 0.09 mm/px
    assert np.all(phantom.clean[lumen] == 0.0)
    ring = ndimage.binary_dilation(lumen, iterations=4) & ~lumen
    assert phantom.clean[ring].mean() > 0.9
    assert sim.make_phantom("layers").lumen_mask is None


def test_simulate_phantom_speckle_statistics_in_its_homogeneous_region():
    phantom, result = sim.simulate_phantom("carotid", seed=1, size=(256, 256))
    np.testing.assert_array_equal(result.clean, phantom.clean)
    assert speckle_statistics.envelope_snr(result.envelope, phantom.homogeneous_mask) == pytest.approx(1.91, abs=0.15)


@pytest.mark.parametrize("bad, error, words", [
    (np.zeros((4, 4, 4)), ValueError, "2D"),
    (np.full((8, 8), np.nan), ValueError, "NaN"),
    (np.full((8, 8), 2.0), ValueError, "[0, 1]"),
    (np.zeros((8, 0)), ValueError, "2D"),
])
def test_bad_clean_images_are_rejected(bad, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        sim.simulate_bmode(bad)


def test_bad_phantom_and_region_arguments():
    with pytest.raises(ValueError, match="unknown phantom"):
        sim.make_phantom("liver")
    with pytest.raises(ValueError, match="mask"):
        sim.speckle_contrast(np.ones((8, 8)), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="larger region"):
        speckle_statistics.autocorrelation_fwhm_mm(np.ones((8, 8)), (0, 2, 0, 2), (0.1, 0.1))


def test_cli_writes_images_and_envelope(tmp_path):
    parser = argparse.ArgumentParser()
    simulate_cli.add_simulate_arguments(parser)
    out, clean, env = tmp_path / "noisy.png", tmp_path / "clean.png", tmp_path / "env.npy"
    args = parser.parse_args(["--phantom", "thyroid", "--fc", "5.63e6", "--seed", "4", "--size", "96",
                              "--out", str(out), "--clean", str(clean), "--envelope", str(env)])
    assert simulate_cli.run_simulate(args) == 0
    noisy_img = np.asarray(Image.open(out))
    clean_img = np.asarray(Image.open(clean))
    assert noisy_img.shape == clean_img.shape == (96, 96) and noisy_img.dtype == np.uint8
    expected = sim.simulate_bmode(sim.make_phantom("thyroid", size=(96, 96), seed=4).clean, fc=5.63e6, seed=4)
    np.testing.assert_allclose(np.load(env), expected.envelope, rtol=1e-6)
    np.testing.assert_array_equal(noisy_img, np.round(expected.bmode * 255).astype(np.uint8))


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    simulate_cli.add_simulate_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "x.jpg"), "--size", "64"])
    assert simulate_cli.run_simulate(args) == 2
    assert ".png" in capsys.readouterr().err
    for option in ("--fc", "--dynamic-range-db"):      # refused when parsed (argparse exits with 2)
        with pytest.raises(SystemExit) as refused:
            parser.parse_args(["--out", str(tmp_path / "x.png"), option, "-1"])
        assert refused.value.code == 2 and option in capsys.readouterr().err


def test_fnumber_rule_matches_must_dasmtx():
    pymust = pytest.importorskip("pymust", reason="optional exact backend pymust is not installed")
    for fc in (3.75e6, 9.38e6):
        param = pymust.getparam("L12-3V")
        param.fc, param.fs, param.fnumber = fc, 4 * fc, None
        delays = pymust.txdelay(param, 0.0)
        pymust.dasmtx(1j * np.array([64, 192]), np.array([[0.0]]), np.array([[0.02]]), delays, param)
        # MUST minimises with a tolerance of pi / 100 rad on the angle: a few percent.
        assert sim.must_receive_fnumber(fc) == pytest.approx(param.fnumber, rel=0.03)


def test_matches_must_reference_patch():
    """The fast model's grain and statistics agree with MUST (pymust) on a small patch."""
    pytest.importorskip("pymust", reason="optional exact backend pymust is not installed")
    envelope, pixel_mm = speckle_statistics.simulate_patch_must(fc=7.5e6, width_mm=6.0, depth_range_mm=(18.0, 22.0),
                                                 seed=0, scatterers_per_mm2=80.0, tilts_deg=(0.0,),
                                                 n_elements=64)
    region = (0, envelope.shape[0], 0, envelope.shape[1])
    must_axial, must_lateral = speckle_statistics.autocorrelation_fwhm_mm(envelope, region, pixel_mm)
    assert must_axial == pytest.approx(0.14, rel=0.25)
    assert must_lateral == pytest.approx(0.33, rel=0.25)
    assert envelope.mean() / envelope.std() == pytest.approx(1.91, abs=0.25)
