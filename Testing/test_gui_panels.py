"""The module's GUI, run: each panel built from the .ui under a real Qt (PySide6, offscreen) and
clicked end to end on real slicer-core MRML nodes.

What PythonQt, CTK and Slicer's application would give the module comes from
Testing/slicer_qt_shim.py; the nodes, the scene, the logic and the jobs are the real ones.
Skipped, with the reason, where PySide6 or slicer-core is not installed (the `test` extra has both).
"""

from __future__ import annotations

import gc
import re
import threading

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
pytest.importorskip("PySide6.QtWidgets", reason="PySide6 (a real Qt for the GUI tests) is not installed",
                    exc_type=ImportError)

import slicer_qt_shim as shim  # noqa: E402
from test_mrml_despeckle import make_image  # noqa: E402


def qt_starts() -> str:
    """'' when a QApplication starts offscreen here, else why not. Tried in a subprocess: Qt
    aborts the whole process when its platform plugin cannot load (missing system libraries)."""
    import os
    import subprocess
    import sys

    probe = "from PySide6.QtWidgets import QApplication; QApplication([]); print('ok')"
    env = dict(os.environ)
    env.setdefault("QT_QPA_PLATFORM", "offscreen")          # as slicer_qt_shim.install starts it
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    if done.returncode == 0 and "ok" in done.stdout:
        return ""
    return f"platform {env['QT_QPA_PLATFORM']}: " + " ".join(done.stderr.strip().splitlines()[:2])


QT_PROBLEM = qt_starts()
pytestmark = pytest.mark.skipif(bool(QT_PROBLEM), reason=f"Qt (PySide6) cannot start here ({QT_PROBLEM}) "
                                "(on Debian/Ubuntu its libraries need e.g. libdbus-1-3, libfontconfig1)")


@pytest.fixture
def gui(scene, tmp_path, monkeypatch, untrained_model):
    """The module widget set up on ``scene``; the untrained test model chosen (fast, no download)."""
    monkeypatch.setenv("SPECKLE2SELF_USER_MODELS", str(tmp_path / "user_models"))
    shown = shim.install(scene, tmp_path, monkeypatch)
    import Speckle2Self as module

    widget = module.Speckle2SelfWidget()
    widget.setup()
    widget.parent.show()                     # the module panel on screen (offscreen): visibility is real
    widget.shown, widget.scene, widget.module = shown, scene, module
    widget.parameterNode.model = str(untrained_model)
    widget.parameterNode.backend = "fp32"     # torch itself: no OpenVINO compile per test
    yield widget
    widget.cleanup()
    # a cancelled job's worker may still be loading its model: let it end before the next test
    for thread in threading.enumerate():
        if thread.name.lower().startswith("speckle2self"):
            thread.join(60)
    # Free this test's widgets (Qt objects in cycles with VTK observers) now, while nothing runs:
    # left to the garbage collector, they were freed in the middle of a later test, beside its
    # worker threads, and PySide6 crashed (segmentation fault) there.
    gc.collect()


def add_volume(scene, voxels, name="US"):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetAndObserveImageData(make_image(voxels))
    volume.SetSpacing(0.3, 0.2, 1.0)
    return volume


def speckle(frames=1, rows=96, cols=112, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.rayleigh(60.0, (frames, rows, cols)), 0, 255).astype(np.uint8)


def click(button):
    shim.unwrap(button).click()


# ----------------------------------------------------------------------------- despeckle

def test_apply_despeckles_in_the_background_and_shows_the_result(gui):
    volume = add_volume(gui.scene, speckle())
    gui.ui.inputSelector.setCurrentNode(volume)           # chosen in the GUI: lands in the parameter node
    assert gui.parameterNode.inputVolume is volume
    assert gui.ui.applyButton.enabled
    click(gui.ui.applyButton)
    assert gui.ui.applyButton.text == "Cancel" and not gui.ui.inputSelector.enabled and gui.ui.progressBar.visible
    assert shim.process_events_until(lambda: not gui.despeckle.running), "the despeckling job did not end"
    output = gui.parameterNode.outputVolume
    assert output is not None and output.GetName() == "US despeckled"
    assert slicer.util.arrayFromVolume(output).shape == (1, 96, 112)
    assert gui.parameterNode.lumenVolume is output         # ready to segment
    assert gui.ui.applyButton.text == "Apply" and gui.ui.inputSelector.enabled and not gui.ui.progressBar.visible
    assert gui.ui.statusLabel.text.startswith("Despeckled 1 frame(s)") and gui.shown.layers[-1] is output
    assert not gui.shown.errors


def test_cancel_stops_apply_and_leaves_the_scene_as_it_was(gui):
    volume = add_volume(gui.scene, speckle(6))
    gui.parameterNode.inputVolume = volume
    gui.parameterNode.batchSize = 1
    before = gui.scene.GetNumberOfNodes()
    click(gui.ui.applyButton)
    click(gui.ui.applyButton)                              # Apply is Cancel while it runs
    assert gui.ui.statusLabel.text == "Cancelling after the current batch..."
    assert shim.process_events_until(lambda: not gui.despeckle.running)
    assert gui.ui.statusLabel.text == "Cancelled; nothing was added to the scene."
    assert gui.scene.GetNumberOfNodes() == before and gui.parameterNode.outputVolume is None
    assert gui.ui.applyButton.text == "Apply" and gui.ui.applyButton.enabled


def test_a_failing_apply_says_why_and_leaves_apply_usable(gui, tmp_path):
    volume = add_volume(gui.scene, speckle())
    gui.parameterNode.inputVolume = volume
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    gui.parameterNode.model = str(broken)
    click(gui.ui.applyButton)
    assert shim.process_events_until(lambda: not gui.despeckle.running)
    assert gui.ui.statusLabel.text.startswith("Failed:") and gui.shown.errors
    assert gui.ui.applyButton.text == "Apply" and gui.parameterNode.outputVolume is None


def test_options_are_parameter_node_fields_both_ways(gui):
    shim.unwrap(gui.ui.guidedSmoothingCheckBox).setChecked(False)
    assert gui.parameterNode.guidedSmoothing is False
    assert gui.ui.inputGreyLevelsCheckBox.enabled            # only meaningful without guided smoothing
    gui.parameterNode.device = "CPU"
    assert gui.ui.deviceComboBox.currentText == "CPU"
    node = gui.logic.parameter_node(gui.scene)                # stored in the scene, so saved with it
    assert node.GetParameter("device") == "CPU" and node.GetParameter("guidedSmoothing") == "False"


def test_a_3d_volume_offers_its_planes_and_apply_says_which_plane_and_engine_ran(gui):
    """The plane choice (#37) is for volumes of several slices only; Apply reports the plane auto
    chose and how the network ran (#33), and the choice is saved with the scene."""
    flat = add_volume(gui.scene, speckle(), "Image")
    gui.ui.inputSelector.setCurrentNode(flat)
    assert not gui.ui.sliceAxisComboBox.enabled                 # a 2D image has one plane
    frames = speckle(5, rows=64, cols=72, seed=3)
    stack = add_volume(gui.scene, np.ascontiguousarray(frames.transpose(1, 0, 2)), "Stack")   # B-mode planes along J
    directions = [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]           # not the identity
    stack.SetIJKToRASDirections(directions)
    gui.ui.inputSelector.setCurrentNode(stack)
    assert gui.ui.sliceAxisComboBox.enabled and gui.ui.sliceAxisComboBox.currentText == "auto (acquisition plane)"
    gui.ui.sliceAxisComboBox.currentIndex = gui.ui.sliceAxisComboBox.findText("J slices (I-K planes)")
    assert gui.logic.parameter_node(gui.scene).GetParameter("sliceAxis") == "J slices (I-K planes)"
    click(gui.ui.applyButton)
    assert gui.ui.statusLabel.text.startswith("Planes: "), gui.ui.statusLabel.text
    assert shim.process_events_until(lambda: not gui.despeckle.running), "the despeckling job did not end"
    output = gui.parameterNode.outputVolume
    assert output.GetAttribute("Speckle2Self.SliceAxis").startswith("j")
    assert "(PyTorch fp32 on the CPU, guided refinement)" in gui.ui.statusLabel.text, gui.ui.statusLabel.text
    assert "Planes: " in gui.ui.statusLabel.text
    assert slicer.util.arrayFromVolume(output).shape == (64, 5, 72)


def test_auto_on_the_cpu_offers_openvino_once_and_installs_it_on_yes(gui, monkeypatch):
    from Speckle2SelfLib.engine import backends
    from Speckle2SelfWidgets import installer

    installed = []
    monkeypatch.setattr(backends, "runtime_installed", lambda name: bool(installed))
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirement: installed.append(requirement), raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", lambda: __import__("contextlib").nullcontext(), raising=False)
    monkeypatch.setattr(installer, "_offered", False)
    assert installer.offerFastBackend("fp32", "cpu") is False and not gui.shown.confirmations   # a named backend
    assert installer.offerFastBackend("auto", "cuda") is False and not gui.shown.confirmations  # the GPU runs
    gui.shown.confirm_answer = False
    assert installer.offerFastBackend("auto", "cpu") is False
    assert len(gui.shown.confirmations) == 1 and "OpenVINO" in gui.shown.confirmations[0] and not installed
    assert installer.offerFastBackend("auto", "cpu") is False and len(gui.shown.confirmations) == 1   # asked once
    monkeypatch.setattr(installer, "_offered", False)
    gui.shown.confirm_answer = True
    assert installer.offerFastBackend("auto", "cpu") is True
    assert installed == [installer.FAST_BACKEND_REQUIREMENT] and len(gui.shown.confirmations) == 2


# ----------------------------------------------------------------------------- live

def test_live_despeckles_each_new_frame_of_the_input(gui):
    volume = add_volume(gui.scene, speckle(seed=1), "Image_Reference")
    gui.parameterNode.inputVolume = volume
    gui.ui.liveCheckBox.checked = True
    assert gui.live.running and not gui.ui.inputSelector.enabled and not gui.ui.modelComboBox.enabled
    assert shim.process_events_until(lambda: gui.live.live.updates >= 1), "no live result"
    output = gui.parameterNode.outputVolume
    assert output is not None and output is not volume
    first = slicer.util.arrayFromVolume(output).copy()
    volume.SetAndObserveImageData(make_image(speckle(seed=2)))     # the stream sends a new frame
    assert shim.process_events_until(lambda: gui.live.live.updates >= 2), "the new frame was not despeckled"
    assert not np.array_equal(slicer.util.arrayFromVolume(output), first)
    gui.ui.liveCheckBox.checked = False
    assert not gui.live.running and gui.ui.inputSelector.enabled
    stopped = re.match(r"Live stopped: (\d+) frames despeckled, \d+ skipped\.", gui.ui.liveStatusLabel.text)
    assert stopped and int(stopped.group(1)) >= 2, gui.ui.liveStatusLabel.text


def test_live_does_not_write_into_a_sequence_frame_or_the_input(gui):
    volume = add_volume(gui.scene, speckle(seed=1), "Image_Reference")
    gui.parameterNode.inputVolume = volume
    gui.parameterNode.outputVolume = volume                  # the input as output: a new volume instead
    gui.ui.liveCheckBox.checked = True
    assert shim.process_events_until(lambda: gui.live.live.updates >= 1)
    assert gui.parameterNode.outputVolume is not volume
    gui.ui.liveCheckBox.checked = False


def test_apply_stops_live(gui):
    volume = add_volume(gui.scene, speckle())
    gui.parameterNode.inputVolume = volume
    gui.ui.liveCheckBox.checked = True
    assert gui.live.running
    click(gui.ui.applyButton)
    assert not gui.live.running and not gui.ui.liveCheckBox.checked and gui.despeckle.running
    assert shim.process_events_until(lambda: not gui.despeckle.running)


# ----------------------------------------------------------------------------- lumen

def carotid_with_seed(scene):
    rr, cc = np.ogrid[:96, :112]
    disk = (rr - 48) ** 2 + (cc - 56) ** 2
    frame = np.where(disk <= 14 ** 2, 15, np.where(disk <= 18 ** 2, 220, 90)).astype(np.uint8)
    volume = add_volume(scene, frame[None], "Carotid")
    seeds = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Seed")
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    seeds.AddControlPointWorld(vtk.vtkVector3d(*ijk_to_ras.MultiplyPoint((56.0, 48.0, 0.0, 1.0))[:3]))
    return volume, seeds


def test_segment_runs_in_the_background_and_shows_table_and_measurements(gui):
    volume, seeds = carotid_with_seed(gui.scene)
    gui.ui.lumenVolumeSelector.setCurrentNode(volume)
    gui.ui.seedSelector.setCurrentNode(seeds)
    assert gui.ui.segmentButton.enabled
    click(gui.ui.segmentButton)
    assert gui.ui.segmentButton.text == "Cancel" and not gui.ui.applyButton.enabled   # Apply waits for it
    assert shim.process_events_until(lambda: not gui.lumen.running), "the segmentation job did not end"
    p = gui.parameterNode
    assert p.lumenTable is not None and p.lumenTable.GetNumberOfRows() == 1
    assert p.lumenSegmentation is not None and gui.ui.openSegmentEditorButton.enabled
    assert gui.ui.segmentButton.text == "Segment" and gui.ui.segmentButton.enabled
    assert "1 frame(s) segmented" in gui.ui.lumenStatusLabel.text and "diameter" in gui.ui.lumenStatusLabel.text
    assert shim.unwrap(gui.ui.lumenTableView).tableModel().rowCount() == 2    # names + one frame
    assert not gui.shown.errors


def test_the_uncertainty_map_is_shown_over_the_output_and_reaches_the_lumen_table(gui):
    """#36 in the GUI: Apply with 'Uncertainty map' adds the map as a warm-over-cold overlay; Segment
    on that output adds each frame's uncertain boundary share to the table."""
    volume, seeds = carotid_with_seed(gui.scene)
    p = gui.parameterNode
    p.inputVolume = volume
    shim.unwrap(gui.ui.uncertaintyCheckBox).setChecked(True)
    assert p.uncertainty and gui.ui.uncertaintySelector.enabled
    click(gui.ui.applyButton)
    assert shim.process_events_until(lambda: not gui.despeckle.running), "the despeckling job did not end"
    assert not gui.shown.errors, gui.shown.errors
    output, uncertainty = p.outputVolume, p.uncertaintyVolume
    assert uncertainty is not None and uncertainty is not output and uncertainty.GetName() == "Carotid uncertainty"
    maps = slicer.util.arrayFromVolume(uncertainty)
    assert maps.shape == slicer.util.arrayFromVolume(output).shape and maps.dtype == np.float32 and maps.max() > 0
    display = uncertainty.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"
    assert display.GetWindowLevelMax() == pytest.approx(float(np.percentile(maps, 99)), rel=1e-3)
    p.seedPoints = seeds                                   # Segment lumen on the despeckled output
    assert p.lumenVolume is output
    click(gui.ui.segmentButton)
    assert shim.process_events_until(lambda: not gui.lumen.running), "the segmentation job did not end"
    table = p.lumenTable.GetTable()
    column = table.GetColumnByName("boundary_uncertain_share")
    assert column is not None and column.GetNumberOfTuples() == 1 and 0.0 <= column.GetValue(0) <= 1.0


def test_the_uncertainty_map_of_a_whole_sequence_plays_with_the_output_and_reaches_the_lumen_table(gui):
    """#36 for cine loops: Apply with 'Uncertainty map' on a sequence proxy (all frames) adds a map
    sequence played by the input's browser, its proxy shown over the despeckled proxy; Segment on
    every frame of that output adds each frame's uncertain boundary share."""
    import vtk

    from test_mrml_despeckle import make_sequence

    disk, seeds = carotid_with_seed(gui.scene)
    frame = slicer.util.arrayFromVolume(disk)[0]
    rng = np.random.default_rng(5)
    frames = [np.clip(frame + rng.normal(0, 6, frame.shape), 0, 255).astype(np.uint8) for _ in range(3)]
    sequence, browser, proxy = make_sequence(gui.scene, frames, name="Loop")
    ijk_to_ras = vtk.vtkMatrix4x4()
    proxy.GetIJKToRASMatrix(ijk_to_ras)
    seeds.RemoveAllControlPoints()
    seeds.AddControlPointWorld(vtk.vtkVector3d(*ijk_to_ras.MultiplyPoint((56.0, 48.0, 0.0, 1.0))[:3]))
    p = gui.parameterNode
    gui.ui.inputSelector.setCurrentNode(proxy)
    assert gui.ui.allFramesCheckBox.visible and p.allFrames
    shim.unwrap(gui.ui.uncertaintyCheckBox).setChecked(True)
    assert gui.ui.uncertaintyCheckBox.enabled and gui.ui.uncertaintySelector.enabled and p.uncertainty
    click(gui.ui.applyButton)
    assert shim.process_events_until(lambda: not gui.despeckle.running), "the despeckling job did not end"
    assert not gui.shown.errors, gui.shown.errors
    output, shown = p.outputVolume, p.uncertaintyVolume
    maps = browser.GetSequenceNode(shown)                  # the selector holds the map's proxy
    assert maps is gui.logic.last_uncertainty_node and maps.GetName() == "Loop uncertainty"
    assert maps.GetNumberOfDataNodes() == 3 and browser.GetSequenceNode(output) is not None
    assert [maps.GetNthIndexValue(k) for k in range(3)] == [sequence.GetNthIndexValue(k) for k in range(3)]
    values = np.concatenate([slicer.util.arrayFromVolume(maps.GetNthDataNode(k)) for k in range(3)])
    assert values.shape == (3, 96, 112) and np.isfinite(values).all() and values.min() >= 0
    display = shown.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"
    assert display.GetWindowLevelMax() == pytest.approx(float(np.percentile(values, 99)), rel=1e-3)
    assert gui.shown.layers[-1] is output
    p.seedPoints = seeds                                   # Segment lumen on every despeckled frame
    assert p.lumenVolume is output and p.lumenAllFrames
    click(gui.ui.segmentButton)
    assert shim.process_events_until(lambda: not gui.lumen.running), "the segmentation job did not end"
    assert not gui.shown.errors, gui.shown.errors
    column = p.lumenTable.GetTable().GetColumnByName("boundary_uncertain_share")
    assert column is not None and column.GetNumberOfTuples() == 3
    assert all(0.0 <= column.GetValue(k) <= 1.0 for k in range(3))


def test_cancel_stops_segmenting_and_adds_nothing(gui):
    volume, seeds = carotid_with_seed(gui.scene)
    gui.parameterNode.lumenVolume = volume
    gui.parameterNode.seedPoints = seeds
    before = gui.scene.GetNumberOfNodes()
    click(gui.ui.segmentButton)
    click(gui.ui.segmentButton)
    assert shim.process_events_until(lambda: not gui.lumen.running)
    assert gui.ui.lumenStatusLabel.text == "Cancelled; nothing was added to the scene."
    assert gui.scene.GetNumberOfNodes() == before and gui.parameterNode.lumenTable is None


def test_segment_without_a_placed_seed_says_so(gui):
    volume, _seeds = carotid_with_seed(gui.scene)
    empty = gui.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Empty")
    gui.parameterNode.lumenVolume = volume
    gui.parameterNode.seedPoints = empty
    click(gui.ui.segmentButton)
    assert not gui.lumen.running and gui.ui.lumenStatusLabel.text.startswith("Failed: Place a seed point")
    assert gui.shown.errors


# ----------------------------------------------------------------------------- adapt

def test_adapt_settings_are_saved_in_the_parameter_node_and_restored(gui):
    volume = add_volume(gui.scene, speckle(4))
    shim.unwrap(gui.ui.adaptInputSelector).setCheckState(volume, shim.QtCore.Qt.Checked)
    gui.ui.adaptMinutesSpinBox.value = 25
    gui.ui.adaptCropComboBox.currentIndex = gui.ui.adaptCropComboBox.findText("96")
    node = gui.logic.parameter_node(gui.scene)
    assert node.GetParameter("adaptMinutes") == "25" and node.GetParameter("adaptCrop") == "96"
    assert gui.parameterNode.adaptInputs == [volume]
    restored = gui.module.Speckle2SelfWidget()               # e.g. the scene saved and loaded again
    restored.setup()
    try:
        assert restored.ui.adaptMinutesSpinBox.value == 25 and restored.ui.adaptCropComboBox.currentText == "96"
        assert shim.unwrap(restored.ui.adaptInputSelector).checkedNodes() == [volume]
        assert restored.ui.adaptStartButton.enabled
    finally:
        restored.cleanup()


def test_adapt_trains_in_the_background_and_selects_the_new_model(gui, untrained_model):
    volume = add_volume(gui.scene, speckle(4, seed=5), "Stack")
    p = gui.parameterNode
    shim.unwrap(gui.ui.adaptCollapsibleButton).setProperty("collapsed", False)   # lists the models
    p.adaptInit = str(untrained_model)
    assert gui.ui.adaptInitComboBox.currentData == str(untrained_model)
    p.adaptInputs = [volume]
    gui.ui.adaptMinutesSpinBox.value = 0
    gui.ui.adaptStepsSpinBox.value = 2
    gui.ui.adaptCropComboBox.currentIndex = gui.ui.adaptCropComboBox.findText("64")
    gui.ui.adaptDeviceComboBox.currentIndex = gui.ui.adaptDeviceComboBox.findText("CPU")
    assert gui.ui.adaptStartButton.enabled
    click(gui.ui.adaptStartButton)
    assert gui.ui.adaptStartButton.text == "Stop" and not gui.ui.adaptStepsSpinBox.enabled
    assert shim.process_events_until(lambda: not gui.adapt.running, timeout=120), "the adaptation did not end"
    assert gui.ui.adaptStatusLabel.text.startswith("Done after 2 steps"), gui.ui.adaptStatusLabel.text
    assert gui.ui.adaptStartButton.text == "Start adaptation"
    assert p.model.endswith(".pt") and gui.logic.is_user_model(p.model)        # selected for Apply
    assert gui.ui.modelComboBox.currentData == p.model and gui.ui.adaptRemoveButton.enabled
    assert "4 frame(s)" in gui.ui.adaptWarningsLabel.text                      # too few frames: said so


def test_adapt_without_a_budget_says_so(gui):
    volume = add_volume(gui.scene, speckle(4))
    gui.parameterNode.adaptInputs = [volume]
    gui.ui.adaptMinutesSpinBox.value = 0
    gui.ui.adaptStepsSpinBox.value = 0
    click(gui.ui.adaptStartButton)
    assert not gui.adapt.running and gui.ui.adaptStatusLabel.text == "Give a time budget or a number of steps."


# ----------------------------------------------------------------------------- the module

def test_module_description_and_the_model_list(gui, untrained_model):
    parent = type("Parent", (), {})()
    gui.module.Speckle2Self(parent)
    assert parent.title == "Speckle2Self" and parent.categories == ["Ultrasound"] and "<a href=" in parent.helpText
    labels = [gui.ui.modelComboBox.itemText(i) for i in range(gui.ui.modelComboBox.count)]
    assert labels[-1] == "Load model file..." and any("default" in label for label in labels)
    assert gui.ui.modelComboBox.currentData == str(untrained_model)       # a model file, added to the list
    assert "untrained-test" in gui.ui.modelInfoLabel.text
    # Adapt starts from what its list shows, and that is the parameter node's choice
    assert gui.parameterNode.adaptInit and gui.parameterNode.adaptInit == gui.ui.adaptInitComboBox.currentData


def test_closing_the_scene_cancels_a_running_apply(gui):
    gui.parameterNode.inputVolume = add_volume(gui.scene, speckle(6))
    gui.parameterNode.batchSize = 1
    click(gui.ui.applyButton)
    gui.onSceneStartClose(None, None)
    assert not gui.despeckle.running and gui.ui.applyButton.text == "Apply" and gui.parameterNode is None


def test_the_modules_self_test_passes_on_the_widget(gui):
    """What Slicer's "Reload and Test" runs: the widget tests of Speckle2SelfTest, on this widget."""
    import types
    import unittest

    slicer.modules.speckle2self = types.SimpleNamespace(
        widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: gui))
    suite = unittest.TestSuite(gui.module.Speckle2SelfTest(name) for name in ("test_widget_apply", "test_widget_segment"))
    result = unittest.TestResult()
    suite.run(result)
    assert result.wasSuccessful() and result.testsRun == 2, result.errors + result.failures
