"""benchmarks/model_selection.py ranks candidates on tuning subjects: its scores are the ones
the development decisions rest on, so they are checked against the functions they come from."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_shared


@requires_shared
def test_selection_scores_match_the_benchmark_functions(capsys):
    import model_selection
    from benchlib import carotid_data as carotid
    from benchlib import lumen_evaluation

    if carotid.carotid_dir() is None:
        pytest.skip("carotid data not found in ../shared/data/carotid")
    cases = model_selection.bench.evenly(carotid.cases("tuning", with_mask=True), 2)
    row = model_selection.score("raw", lambda img: img, cases, None, {})
    images, masks = zip(*(case.load() for case in cases))
    best = lumen_evaluation.iou_table(images, masks, model_selection.TOLERANCES).mean(axis=0).max()
    assert row["flood"] == pytest.approx(best)
    assert 0.5 < row["radial"] <= 1.0 and 0.0 < row["homogeneity"] < 1.0
    # A candidate that blackens all tissue is scored 100% black; raw keeps nearly all of it.
    black = model_selection.score("black", lambda img: np.zeros_like(img), cases, None, {})
    assert black["black"] == pytest.approx(1.0) and row["black"] < 0.05
    assert model_selection.main(["--methods", "raw", "--limit", "2", "--cache", ""]) == 0
    out = capsys.readouterr().out
    assert "| raw |" in out and "2 tuning-subject images" in out


def test_benchmarks_label_a_models_default_output_and_score_the_other_on_request(untrained_model):
    """A row named after a model is its default output; for the bundled default that is the guided refinement,
    and the label says so, with the network's own output as the other row (and the reverse for
    models that recommend nothing)."""
    import carotid as bench
    from Speckle2SelfLib.engine.inference import Despeckler

    frame = np.random.default_rng(0).integers(0, 255, (48, 48)).astype(np.uint8)
    default = Despeckler.from_file(None, device="cpu", backend="fp32")
    rows = bench.model_outputs(default, "S", both=True)
    assert list(rows) == ["S, guided", "S, network output"]
    np.testing.assert_array_equal(rows["S, guided"](frame), default.denoise(frame, refine="guided"))
    np.testing.assert_array_equal(rows["S, network output"](frame), default.denoise(frame, refine="none"))
    plain = Despeckler.from_file(untrained_model, device="cpu")
    assert list(bench.model_outputs(plain, "U", both=True)) == ["U", "U, guided"]
    assert list(bench.model_outputs(plain, "U", both=False)) == ["U"]


def test_paired_difference_interval_resamples_subjects_not_images():
    """Two subjects, one better and one worse by 1.0 (ten images each): images are not
    independent, so the interval must span both subjects' effects; a uniform gain is exact."""
    from benchlib.quality import paired_difference_ci

    reference = np.linspace(0.5, 0.9, 20)
    subjects = ["a"] * 10 + ["b"] * 10
    assert paired_difference_ci(reference + 0.1, reference, subjects) == pytest.approx((0.1, 0.1, 0.1))
    mean, lo, hi = paired_difference_ci(reference + np.repeat([1.0, -1.0], 10), reference, subjects)
    assert mean == pytest.approx(0.0) and lo == pytest.approx(-1.0) and hi == pytest.approx(1.0)


def test_lumen_table_gives_each_input_its_difference_to_raw():
    import carotid as bench

    common = {"method": "radial", "n": 4, "subjects": ["a", "a", "b", "b"], "displaced": np.full(12, 0.9),
              "flagged": 0.0, "refused": 0.0, "ms": 5.0}
    rows = [{"input": "raw", "centroid": np.array([0.9, 0.8, 0.9, 0.8]), **common},
            {"input": "model", "centroid": np.array([0.92, 0.82, 0.92, 0.82]), **common}]
    table = bench.lumen_table(rows, "test").splitlines()
    model_line = next(line for line in table if line.startswith("| model |"))
    assert "+0.0200 [+0.0200, +0.0200]" in model_line
    assert "[" not in next(line for line in table if line.startswith("| raw |"))


def test_simulated_benchmark_runs_a_baseline_with_other_settings():
    """``simulated.py --set gaussian_guided:sigma_px=14``: the named baseline with that value,
    the others as they are; malformed or unknown settings are refused at parsing."""
    import argparse

    import simulated

    setting = simulated.parse_setting("gaussian_guided:sigma_px=14")
    assert setting == ("gaussian_guided", "sigma_px", 14.0)
    assert simulated.with_settings("nlm", [setting]) is simulated.filters.BASELINES["nlm"]
    image = np.random.default_rng(0).random((48, 48))
    wide = simulated.with_settings("gaussian_guided", [setting])(image)
    default = simulated.filters.BASELINES["gaussian_guided"](image)
    assert wide.shape == image.shape and wide.std() < default.std()
    assert simulated.parse_setting("nlm:template_size=11") == ("nlm", "template_size", 11)
    for bad in ("gaussian_guided:sigma_px", "gaussian_guided:sigma_px=wide", "sharpen:sigma_px=2",
                "gaussian_guided:radius=3", "nlm:template_size=7.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            simulated.parse_setting(bad)
    assert simulated.main(["--methods", "nlm", "--set", "gaussian_guided:sigma_px=14", "--n-images", "1"]) == 2
    assert simulated.main(["--tune", "--set", "gaussian_guided:sigma_px=14"]) == 2


def test_simulated_benchmark_scores_the_phantom_lumen():
    """Vessel phantoms carry their lumen: the noisy input and a filter are scored on it (flood
    fill at the best tolerance, one-click radial); phantoms without a vessel are not."""
    import simulated

    images = simulated.simulate_set(("carotid", "layers"), 3000, 192, simulated.TRAIN_FC)
    assert images[0][3] is not None and images[1][3] is None
    scores, _ = simulated.evaluate(lambda img: img, images)
    assert 0.5 < scores["lumen_flood"] <= 1.0 and 0.5 < scores["lumen_radial"] <= 1.0
    blank, _ = simulated.evaluate(lambda img: np.zeros_like(img), images)
    assert blank["lumen_flood"] < 0.2, "an all-black output floods everything from the seed"
    no_vessel, _ = simulated.evaluate(lambda img: img, images[1:])
    assert "lumen_flood" not in no_vessel
