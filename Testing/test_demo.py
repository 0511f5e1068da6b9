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
