"""The module's self-test on simulated speckle (no downloads): volume, sequence, cancel and the widget.

Slicer runs it from the module's "Reload and Test" button and from CTest
(slicer_add_python_unittest); Speckle2Self.py imports :class:`Speckle2SelfTest` so that both find it there.
"""

import functools
import importlib.util
import os

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from Speckle2SelfLib.scene.logic import Speckle2SelfLogic


def requiresTorch(testMethod):
    """Skip a test cleanly when PyTorch is not installed (never install it from a test): CTest's
    slicer_add_python_unittest calls each test_* method directly, without runTest's check."""
    @functools.wraps(testMethod)
    def wrapper(self, *args, **kwargs):
        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed; Speckle2Self's despeckling tests need it")
        return testMethod(self, *args, **kwargs)
    return wrapper


class Speckle2SelfTest(ScriptedLoadableModuleTest):
    """Self-test on simulated speckle (no downloads): volume, sequence, cancel and the widget."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        if importlib.util.find_spec("torch") is None:
            self.delayDisplay("PyTorch is not installed: Speckle2Self self-test skipped")
            return
        self.setUp()
        self.test_volume_is_despeckled_with_its_geometry()
        self.setUp()
        self.test_sequence_is_despeckled_and_browsed_together()
        self.setUp()
        self.test_cancel_leaves_the_scene_unchanged()
        self.setUp()
        self.test_widget_apply()
        self.setUp()
        self.test_widget_segment()
        self.delayDisplay("Speckle2Self tests passed")

    # ------------------------------------------------------------------ data and model
    @staticmethod
    def speckledFrames(count: int = 3, rows: int = 96, cols: int = 112):
        """uint8 speckled frames and a homogeneous-region mask (simulator when available)."""
        import numpy as np

        try:
            from Speckle2SelfLib.simulation import simulate_phantom
        except ImportError:
            simulate_phantom = None
        frames, masks = [], []
        for k in range(count):
            if simulate_phantom is not None:
                phantom, sim = simulate_phantom("layers", seed=k, size=(rows, cols))
                frames.append(np.round(sim.bmode * 255).astype(np.uint8))
                masks.append(phantom.homogeneous_mask)
            else:   # fully developed speckle: Rayleigh amplitude over a constant echo
                rng = np.random.default_rng(k)
                frames.append(np.clip(rng.rayleigh(60.0, (rows, cols)), 0, 255).astype(np.uint8))
                masks.append(np.ones((rows, cols), bool))
        return np.stack(frames), np.stack(masks)

    def model(self):
        """The default bundled model when installed, else a freshly exported untrained one."""
        if Speckle2SelfLogic().has_bundled_model():
            return None
        import torch
        from Speckle2SelfLib.engine.models import export_model
        from Speckle2SelfLib.engine.network import Speckle2SelfNet

        torch.manual_seed(0)
        path = os.path.join(slicer.app.temporaryPath, "Speckle2SelfTestModel.pt")
        export_model(Speckle2SelfNet(width=4), path, scales=(1.0, 0.5, 0.25), interpolation="bilinear",
                     name="self-test")
        return path

    def addVolume(self, frames, name="US"):
        volume = slicer.util.addVolumeFromArray(frames, name=name)
        volume.SetSpacing(0.3, 0.2, 1.5)
        volume.SetOrigin(5.0, -7.0, 3.0)
        return volume

    # ------------------------------------------------------------------ tests
    @requiresTorch
    def test_volume_is_despeckled_with_its_geometry(self):
        import numpy as np
        from Speckle2SelfLib.simulation import speckle_contrast

        frames, masks = self.speckledFrames(2)
        volume = self.addVolume(frames)
        before = slicer.util.arrayFromVolume(volume).copy()
        model = self.model()
        output = Speckle2SelfLogic(model, "auto").despeckle_volume(volume)
        result = slicer.util.arrayFromVolume(output)
        self.assertEqual(output.GetName(), "US despeckled")
        self.assertEqual(result.shape, frames.shape)
        self.assertEqual(result.dtype, np.uint8)
        self.assertEqual(output.GetSpacing(), volume.GetSpacing())
        self.assertEqual(output.GetOrigin(), volume.GetOrigin())
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), before)
        if model is None:     # a trained model must reduce speckle in the homogeneous region
            self.assertLess(speckle_contrast(result[0], masks[0]), 0.8 * speckle_contrast(frames[0], masks[0]))

    @requiresTorch
    def test_sequence_is_despeckled_and_browsed_together(self):
        import numpy as np

        frames, _masks = self.speckledFrames(3)
        sequence = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceNode", "Cine")
        sequence.SetIndexName("time")
        sequence.SetIndexUnit("s")
        for k in range(3):
            item = slicer.util.addVolumeFromArray(frames[k:k + 1], name=f"frame{k}")
            sequence.SetDataNodeAtValue(item, f"{0.05 * k:.2f}")
            displayNodes = [item.GetNthDisplayNode(i) for i in range(item.GetNumberOfDisplayNodes())]
            slicer.mrmlScene.RemoveNode(item)
            for displayNode in displayNodes:     # a removed node leaves its display nodes behind
                slicer.mrmlScene.RemoveNode(displayNode)
        browser = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "CineBrowser")
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
        proxy = browser.GetProxyNode(sequence)
        logic = Speckle2SelfLogic(self.model(), sequences_logic=slicer.modules.sequences.logic())
        result = logic.despeckle_sequence(proxy)
        self.assertEqual(result.sequence_node.GetNumberOfDataNodes(), 3)
        self.assertEqual(result.sequence_node.GetIndexName(), "time")
        self.assertEqual([result.sequence_node.GetNthIndexValue(i) for i in range(3)], ["0.00", "0.05", "0.10"])
        for k in range(3):
            browser.SetSelectedItemNumber(k)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.proxy_node),
                                          slicer.util.arrayFromVolume(result.sequence_node.GetNthDataNode(k)))

    @requiresTorch
    def test_cancel_leaves_the_scene_unchanged(self):
        from Speckle2SelfLib.engine.inference import Cancelled

        frames, _masks = self.speckledFrames(3)
        volume = self.addVolume(frames)
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(Cancelled):
            Speckle2SelfLogic(self.model()).despeckle_volume(volume, batch_size=1, cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)

    @requiresTorch
    def test_widget_apply(self):
        frames, _masks = self.speckledFrames(1)
        volume = self.addVolume(frames)
        widget = slicer.modules.speckle2self.widgetRepresentation().self()
        widget.initializeParameterNode()      # the scene was cleared: observe the new parameter node
        parameterNode = widget.parameterNode
        parameterNode.inputVolume = volume
        parameterNode.outputVolume = None
        parameterNode.model = self.model() or ""
        widget.despeckle.onApplyButton()  # despeckles in a worker thread; the GUI timer stores the result
        self.assertTrue(waitUntil(lambda: not widget.despeckle.running, 120), "the despeckling job did not end")
        output = parameterNode.outputVolume
        self.assertIsNotNone(output)
        self.assertEqual(output.GetName(), "US despeckled")
        self.assertEqual(widget.ui.applyButton.text, "Apply")

    @requiresTorch
    def test_widget_segment(self):
        """Segment runs in a background job; its table and segmentation appear when it ends."""
        import numpy as np

        rr, cc = np.ogrid[:96, :112]
        disk = (rr - 48) ** 2 + (cc - 56) ** 2
        frame = np.where(disk <= 14 ** 2, 15, np.where(disk <= 18 ** 2, 220, 90)).astype(np.uint8)
        volume = self.addVolume(frame[None], name="Carotid")
        seeds = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Seed")
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        seeds.AddControlPointWorld(vtk.vtkVector3d(*ijkToRas.MultiplyPoint((56.0, 48.0, 0.0, 1.0))[:3]))
        widget = slicer.modules.speckle2self.widgetRepresentation().self()
        widget.initializeParameterNode()
        parameterNode = widget.parameterNode
        parameterNode.lumenVolume = volume
        parameterNode.seedPoints = seeds
        parameterNode.lumenSegmentation = None
        parameterNode.lumenTable = None
        widget.lumen.onSegmentButton()    # segments in a worker thread; the GUI timer stores the result
        self.assertTrue(waitUntil(lambda: not widget.lumen.running, 60), "the segmentation job did not end")
        self.assertIsNotNone(parameterNode.lumenTable)
        self.assertEqual(parameterNode.lumenTable.GetNumberOfRows(), 1)
        self.assertIsNotNone(parameterNode.lumenSegmentation)
        self.assertEqual(widget.ui.segmentButton.text, "Segment")


def waitUntil(condition, seconds: float) -> bool:
    """Keep Slicer's event loop running (the job pollers' timers) until ``condition()`` or the time is up."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        slicer.app.processEvents()
        time.sleep(0.02)
    return True
