"""The README's first command: the demo runs on bundled inputs with the bundled model."""

import json

import pytest

from Speckle2SelfLib.cli import main
from Speckle2SelfLib.engine.models import bundled_model_path, bundled_models, load_model


def test_bundled_default_model_is_valid_and_checksummed():
    entries = bundled_models()
    assert entries and sum(e["default"] for e in entries) == 1
    meta = load_model(bundled_model_path()).metadata
    assert meta["training"]["data"]["masks_used"] is False
    assert meta["name"] == next(e for e in entries if e["default"])["name"]


def test_demo_writes_outputs_and_despeckles_the_phantom(tmp_path, capsys):
    pytest.importorskip("pydicom")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 0
    for name in ("side_by_side.png", "metrics.json", "phantom_noisy.png", "phantom_despeckled.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    phantom = metrics["simulated carotid phantom"]
    assert phantom["despeckled"]["speckle_snr"] > phantom["input"]["speckle_snr"]
    assert phantom["despeckled"]["glcm_homogeneity"] > phantom["input"]["glcm_homogeneity"]
    assert phantom["despeckled"]["ssim"] > phantom["input"]["ssim"]
    assert "| simulated carotid phantom | despeckled |" in capsys.readouterr().out


def test_demo_says_what_happened_to_the_sector_background_from_its_measurements():
    from Speckle2SelfLib.cli.demo import _background_note

    def levels(background, whole=0.5):
        return {"background_level": background, "glcm_homogeneity_whole_frame": whole}

    kept = _background_note(levels(0.0), levels(0.011))
    assert "stays black" in kept and "artefact" not in kept
    lifted = _background_note(levels(0.0), levels(10.0, 0.6))
    assert "lifted from 0.0 to 10.0 grey levels (a model artefact" in lifted
