"""What the module's panels ask of Speckle2SelfLogic beyond despeckling and segmenting: the Live
output choice, the model description and recommendation, the user models folder. Headless, on
real slicer-core nodes; the panels themselves run in Testing/test_gui_panels.py."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
from test_mrml_despeckle import make_sequence, make_volume  # noqa: E402

from Speckle2SelfLib.engine import user_models  # noqa: E402
from Speckle2SelfLib.scene.logic import Speckle2SelfLogic  # noqa: E402


def speckle(frames=1, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.rayleigh(60.0, (frames, 48, 56)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("given", ["none", "grey", "input", "rgb", "sequence frame"])
def test_live_writes_into_the_given_output_only_where_it_can_take_a_live_result(scene, untrained_model, given):
    volume = make_volume(scene, speckle(), "Image_Reference")
    outputs = {"none": None, "grey": make_volume(scene, speckle(seed=1), "Out"), "input": volume,
               "rgb": make_volume(scene, np.zeros((1, 48, 56, 3), np.uint8), "Colour", "vtkMRMLVectorVolumeNode"),
               "sequence frame": make_sequence(scene, list(speckle(2, seed=2)))[2]}
    live = Speckle2SelfLogic().start_live(volume, outputs[given], model=str(untrained_model), device="cpu")
    try:
        assert live.input_node is volume
        if given == "grey":
            assert live.output_node is outputs["grey"]
        else:      # a new volume, made at the first result: never the input, RGB, or a frame a browser overwrites
            assert live.output_node is None
    finally:
        live.stop(timeout=5.0)


def test_live_needs_an_input(scene, untrained_model):
    with pytest.raises(ValueError, match="input volume"):
        Speckle2SelfLogic().start_live(None, model=str(untrained_model))


def test_model_description_and_recommended_output(untrained_model):
    logic = Speckle2SelfLogic()
    assert "untrained-test" in logic.describe_model(str(untrained_model))
    assert logic.recommends_guided_smoothing(str(untrained_model)) is False    # made without a recommendation
    if logic.has_bundled_model():      # the default model recommends its guided refinement (model card)
        assert logic.describe_model(None) and logic.recommends_guided_smoothing(None) is True


def test_user_models_folder_is_the_modules_unless_the_environment_names_one(tmp_path, monkeypatch):
    monkeypatch.delenv(user_models.ENV_VARIABLE, raising=False)
    monkeypatch.setattr(user_models, "_configured_directory", None)
    assert Speckle2SelfLogic.use_user_models_directory(str(tmp_path / "slicer")) == str(tmp_path / "slicer")
    monkeypatch.setenv(user_models.ENV_VARIABLE, str(tmp_path / "env"))
    assert Speckle2SelfLogic.use_user_models_directory(str(tmp_path / "slicer")) == str(tmp_path / "env")
    assert Speckle2SelfLogic.user_models_directory() == str(tmp_path / "env")
