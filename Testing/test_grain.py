"""Speckle grain and the grain-adaptive working scale: scale-invariant by construction."""

import numpy as np
import pytest
import torch

from benchlib.grain_size import estimate_grain
from Speckle2SelfLib.engine import grain
from Speckle2SelfLib.engine.inference import Despeckler
from Speckle2SelfLib.engine.perturbation import resample_to_working_scale
from Speckle2SelfLib.simulation import simulate_phantom


def _zoom(img: np.ndarray, factor: float) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return resample_to_working_scale(x, factor)[0, 0].numpy()


@pytest.fixture(scope="module")
def speckled():
    _phantom, sim = simulate_phantom("thyroid", seed=7, size=(256, 256))
    return sim.bmode.astype(np.float32)


def test_view_difference_falls_as_speckle_gets_coarser(speckled):
    fine = grain.view_difference(speckled)
    coarse = grain.view_difference(_zoom(speckled, 2.0))
    assert 0.2 < fine[0.5] < 0.7, fine
    # twice the pixels per speckle spot: the views agree far more (the net could copy)
    assert coarse[0.5] < 0.6 * fine[0.5] and coarse[0.25] < fine[0.25]


def test_grain_doubles_when_the_image_is_upsampled_twice(speckled):
    # (from 2x: at about one pixel per spot the width is below what sampling can resolve)
    g1 = estimate_grain(_zoom(speckled, 2.0))
    g2 = estimate_grain(_zoom(speckled, 4.0))
    assert g1 is not None and g2 is not None
    assert 1.5 < g2.px / g1.px < 2.6, (g1, g2)
    assert g1.lateral_px > g1.axial_px      # the simulator's PSF is wider laterally


def test_matched_scale_follows_the_pixel_spacing(speckled):
    coarse = _zoom(speckled, 2.0)                         # spots of a few pixels, as in scanner B-mode
    target = grain.view_difference_at(coarse, 0.6)        # as if trained at 0.6 x this spacing
    s1 = grain.match_working_scale(coarse, target)
    s2 = grain.match_working_scale(_zoom(coarse, 2.0), target)
    assert s1 == pytest.approx(0.6, rel=0.25)
    assert s2 == pytest.approx(s1 / 2, rel=0.25)


def test_frames_with_finer_speckle_than_the_model_run_at_their_own_resolution(speckled, untrained_model):
    """"auto" never enlarges frames (it made results worse wherever a truth could check it);
    an explicit scale above 1 is still honoured."""
    coarse = _zoom(speckled, 2.0)
    target = grain.view_difference_at(coarse, 1.8)        # as if trained at 1.8 x this spacing
    assert grain.match_working_scale(coarse, target) == 1.0
    assert max(grain.CANDIDATE_SCALES) == 1.0
    engine = Despeckler.from_file(untrained_model, device="cpu")
    engine.loaded.metadata["working_view_difference"] = target
    engine.denoise(coarse)
    assert engine.last_working_scale == 1.0
    engine.denoise(coarse, working_scale=1.8)
    assert engine.last_working_scale == 1.8
    # a model trained on frames enlarged 2x may enlarge new ones as far
    engine.loaded.metadata["working_scale"] = 2.0
    engine.denoise(coarse)
    assert engine.last_working_scale == pytest.approx(1.8, rel=0.25)
    assert grain.candidate_scales(2.0)[-1] == pytest.approx(2.0) and len(grain.candidate_scales(2.0)) == 13


def test_no_speckle_or_no_target_means_no_resampling():
    assert grain.match_working_scale(np.zeros((64, 64), np.float32), 0.2) == 1.0
    assert grain.match_working_scale(np.random.default_rng(0).random((64, 64)), None) == 1.0
    assert estimate_grain(np.zeros((300, 300))) is None


def test_same_anatomy_at_two_spacings_gives_the_same_result(trained_model, speckled):
    engine = Despeckler.from_file(trained_model, device="cpu")
    small = _zoom(speckled, 2.0)       # spots of a few pixels, as in scanner B-mode
    engine.loaded.metadata["working_view_difference"] = grain.view_difference_at(small, 1.0)
    big = _zoom(speckled, 4.0)         # the same scan at half the pixel spacing

    def mismatch(mode):
        small_out = engine.denoise(small, working_scale=mode)
        big_out = _zoom(engine.denoise(big, working_scale=mode), 0.5)
        inner = (slice(32, -32), slice(32, -32))
        return float(np.abs(small_out[inner] - big_out[inner]).mean())

    adaptive = mismatch("auto")
    assert 0.4 <= engine.last_working_scale <= 0.75     # the big image was shrunk (ideal: 0.5)
    fixed = mismatch(None)
    assert adaptive < 0.6 * fixed, (adaptive, fixed)
    assert adaptive < 0.05


def test_working_scale_is_validated(untrained_model):
    engine = Despeckler.from_file(untrained_model, device="cpu")
    with pytest.raises(ValueError, match="working scale"):
        engine.denoise(np.zeros((32, 32), np.float32), working_scale=float("nan"))
    with pytest.raises(ValueError, match="working scale"):
        engine.denoise(np.zeros((32, 32), np.float32), working_scale=10.0)
