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
