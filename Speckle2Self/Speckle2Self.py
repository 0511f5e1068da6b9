"""Speckle2Self: self-supervised ultrasound despeckling in 3D Slicer (the module's GUI).

All computation lives in Speckle2SelfLib (numpy/torch/MRML, testable without Qt): the logic is
Speckle2SelfLib.scene.logic.Speckle2SelfLogic, and this file holds the module description, the
parameter node, the widget that connects the .ui to the logic, and the self-test. torch is
imported lazily, so the module loads without it and offers to install it (through the PyTorch
extension when present) on first use.
"""

import importlib
import importlib.util
import logging
import os
import traceback
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode,
                    vtkMRMLTableNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from Speckle2SelfLib.scene.logic import DespeckleRun, Speckle2SelfLogic, is_rgb

HOMEPAGE = "https://github.com/speckle2self/SlicerSpeckle2Self"
LOAD_MODEL_ITEM = "__load_model_file__"
TORCH_REQUIREMENT = ">=2.0"
DEVICES = ["Auto", "CPU", "CUDA"]
BACKENDS = {"Auto": "auto", "fp32": "fp32", "bf16": "bf16", "OpenVINO": "openvino", "ONNX Runtime": "onnxruntime"}


#
# Speckle2Self
#

class Speckle2Self(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Speckle2Self")
        self.parent.categories = ["Ultrasound"]
        self.parent.dependencies = []
        self.parent.contributors = ["Speckle2Self contributors"]
        self.parent.helpText = _(
            "Removes speckle from ultrasound images, volumes and cine sequences with Speckle2Self, a "
            "self-supervised network (multi-scale perturbation, one encoder per scale, a shared decoder). "
            "Grey and RGB inputs are supported; with 'keep colour' a colour Doppler overlay stays unchanged. "
            "The 'Segment lumen' section segments a vessel lumen from a seed point on the despeckled image. "
            "The 'Adapt model' section fine-tunes a model on the scene's own images (self-supervised) to adapt it "
            "to your scanner and anatomy. "
            f'See the <a href="{HOMEPAGE}">documentation</a>. From the Python console: '
            "<code>from Speckle2SelfLib.scene.logic import despeckle_node; despeckle_node(getNode('US'))</code>.")
        self.parent.acknowledgementText = _(
            "Speckle2Self follows the self-supervised despeckling method of the Speckle2Self paper "
            "(multi-scale perturbation). The module layout follows SlicerNNUnet and SlicerMONAIAuto3DSeg; "
            "PyTorch is provided by the SlicerPyTorch extension.")
        try:   # 'Adapt model': user models beside Slicer's settings, for the GUI and the Python console alike
            userModelsDirectory()
        except Exception as err:  # never keep the module from loading
            logging.warning(f"Speckle2Self: user models folder not set up ({err})")


#
# Parameter node
#

@parameterNodeWrapper
class Speckle2SelfParameterNode:
    """What the user chose; saved with the scene and restored when it is loaded.

    model: "" for the default bundled model, a bundled model's name, or a model file path.
    batchSize: 0 means automatic. inputGreyLevels: the output keeps each input frame's brightness
    and contrast (off: the network's own grey levels). guidedSmoothing: the network's output steers
    an edge-keeping smoothing of the input (off: the network's output itself). lumen*: the
    'Segment lumen' section.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    allFrames: bool = True
    outputVolume: vtkMRMLScalarVolumeNode
    model: str = ""
    device: Annotated[str, Choice(DEVICES)] = "Auto"
    backend: Annotated[str, Choice(list(BACKENDS))] = "Auto"       # CPU path: Speckle2SelfLib.engine.backends
    batchSize: Annotated[int, WithinRange(0, 256)] = 0
    blend: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    gamma: Annotated[float, WithinRange(0.2, 3.0)] = 1.0
    inputGreyLevels: bool = True
    keepColour: bool = False
    guidedSmoothing: bool = True
    lumenVolume: vtkMRMLScalarVolumeNode
    seedPoints: vtkMRMLMarkupsFiducialNode
    lumenMethod: Annotated[str, Choice(["radial", "flood", "growcut"])] = "radial"   # segmentation.METHODS
    tolerance: Annotated[float, WithinRange(1.0, 100.0)] = 2.0   # segmentation.DESPECKLED_TOLERANCE
    lumenAllFrames: bool = True
    lumenSegmentation: vtkMRMLSegmentationNode
    lumenTable: vtkMRMLTableNode


#
# Widget
#

class Speckle2SelfWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Despeckle, Live, Segment-lumen and Adapt-model panels over Speckle2SelfLogic. Apply and
    Segment run in background jobs (a worker thread that never touches MRML) polled by a QTimer;
    Cancel (the Apply or Segment button while running) stops them within a second."""

    def __init__(self, parent=None, logic=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic            # injectable (tests); created in setup() otherwise
        self._parameterNode: Optional[Speckle2SelfParameterNode] = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._updatingModelCombo = False
        self._job = None                  # the running Speckle2SelfLib.scene.despeckle.DespeckleJob
        self._jobTimer = None
        self._segmentJob = None           # the running Speckle2SelfLib.scene.lumen.SegmentJob
        self._segmentTimer = None
        self._segmentCancelRequested = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/Speckle2Self.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = Speckle2SelfLogic(sequences_logic=slicer.modules.sequences.logic())

        self.ui.progressBar.hide()
        self.ui.lumenProgressBar.hide()
        self.ui.seedPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.lumenTableView.setMRMLScene(slicer.mrmlScene)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelComboChanged)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateInputDependentWidgets)
        self.ui.lumenVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateInputDependentWidgets)
        self.ui.seedSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.seedPlaceWidget.setCurrentNode)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)

        try:   # again here: onReload drops the Lib's modules, and with them the user models default folder
            userModelsDirectory()
        except Exception as err:
            logging.warning(f"Speckle2Self: user models folder not set up ({err})")
        self.populateModelCombo()
        self.initializeParameterNode()
        self.setupLive()
        self.setupAdapt()

    def cleanup(self) -> None:
        self._cancelRequested = True
        if getattr(self, "_job", None) is not None:
            self._job.cancel()
        self.stopSegmentation()
        for timer in (self._jobTimer, self._segmentTimer):   # a reloaded widget must not poll on
            if timer is not None:
                timer.stop()
        self.stopLive()
        self.stopAdapt()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode and not self._running:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRequested = True      # a run in progress stops; its nodes would go with the scene
        if getattr(self, "_job", None) is not None:
            self._job.cancel()
        self.stopSegmentation()
        self.stopLive()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A loaded scene brings its own parameter node: show its choices."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload the Lib too, so that edits to it take effect without restarting Slicer: its
        modules are dropped and imported afresh (in dependency order) when the module file reloads."""
        import sys

        for name in [n for n in sys.modules if n == "Speckle2SelfLib" or n.startswith("Speckle2SelfLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(Speckle2SelfParameterNode(self.logic.parameter_node(slicer.mrmlScene)))
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[Speckle2SelfParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are connected here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        self.selectModelInCombo(self._parameterNode.model)
        self.updateInputDependentWidgets()
        self.updateButtons()

    def updateInputDependentWidgets(self, *args) -> None:
        """'all frames' only for a sequence proxy; 'keep colour' only for RGB input."""
        from Speckle2SelfLib.scene.nodes import find_sequence

        node = self.ui.inputSelector.currentNode()
        found = find_sequence(node) if node else None
        self.ui.allFramesCheckBox.visible = found is not None
        if found is not None:
            sequence, _browser = found
            self.ui.allFramesCheckBox.text = _("all {count} frames of sequence '{name}'").format(
                count=sequence.GetNumberOfDataNodes(), name=sequence.GetName())
        self.ui.keepColourCheckBox.enabled = bool(node and is_rgb(node))
        lumenNode = self.ui.lumenVolumeSelector.currentNode()
        slices = lumenNode.GetImageData().GetDimensions()[2] if lumenNode and lumenNode.GetImageData() else 1
        # it decides between the seed's frame and all of them for a sequence and for a multi-slice volume
        self.ui.lumenAllFramesCheckBox.visible = bool(lumenNode and (find_sequence(lumenNode) or slices > 1))
        self.updateButtons()

    def updateButtons(self) -> None:
        p = self._parameterNode
        if self._running:
            return
        problem = None
        if not p or not p.inputVolume:
            problem = _("Select an input volume")
        elif not self.currentModel() and not self.logic.has_bundled_model():
            problem = _("No bundled model: choose 'Load model file...'")
        elif self._segmentJob is not None:   # Apply locks the lumen panel, and with it Segment's Cancel
            problem = _("Wait for the lumen segmentation to end (or cancel it)")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Despeckle the input (click again to cancel)")
        if self._segmentJob is not None:
            return                        # Segment is Cancel while it runs
        canSegment = bool(p and p.lumenVolume and p.seedPoints)
        self.ui.segmentButton.enabled = canSegment
        self.ui.segmentButton.toolTip = _("Segment the lumen around the seed") if canSegment else \
            _("Select an image and a seed point list (place a point inside the lumen)")
        self.ui.openSegmentEditorButton.enabled = bool(p and p.lumenSegmentation)
        self.ui.toleranceSliderWidget.enabled = bool(p and p.lumenMethod != "radial")   # radial needs none
        # a guided result is a weighted mean of input pixels: it has the input's grey levels anyway
        self.ui.inputGreyLevelsCheckBox.enabled = bool(p and not p.guidedSmoothing)

    # ------------------------------------------------------------------ models
    def populateModelCombo(self) -> None:
        """Bundled models (checksum-verified when loaded), then 'Load model file...'."""
        combo = self.ui.modelComboBox
        self._updatingModelCombo = True
        try:
            combo.clear()
            for entry in self.logic.bundled_models():
                label = entry["name"] + (f" ({entry['version']})" if entry.get("version") else "")
                if entry.get("default"):
                    label += _(" - default")
                combo.addItem(label, entry["name"])
            for model in self.logic.user_models():      # "Adapt model" results, selected by file path
                combo.addItem(_("{name} (user model)").format(name=model.name), str(model.path))
            combo.addItem(_("Load model file..."), LOAD_MODEL_ITEM)
        finally:
            self._updatingModelCombo = False

    def currentModel(self) -> str:
        data = self.ui.modelComboBox.currentData
        return "" if data in (None, LOAD_MODEL_ITEM) else str(data)

    def selectModelInCombo(self, model: str) -> None:
        combo = self.ui.modelComboBox
        self._updatingModelCombo = True
        try:
            if not model:
                defaults = [i for i, e in enumerate(self.logic.bundled_models()) if e.get("default")]
                index = defaults[0] if defaults else 0
            else:
                index = combo.findData(model)
                if index < 0 and os.path.isfile(model):
                    combo.insertItem(combo.count - 1, os.path.basename(model), model)
                    index = combo.findData(model)
            if index >= 0:
                combo.currentIndex = index
        finally:
            self._updatingModelCombo = False
        if model and index < 0 and self._parameterNode:
            # e.g. a scene saved with a model file that is gone: Apply must use what the list shows
            self.ui.statusLabel.text = _("Model {model} was not found; using {shown}.").format(
                model=model, shown=combo.currentText)
            self._parameterNode.model = self.currentModel()
        self.showModelInfo()

    def onModelComboChanged(self, index: int) -> None:
        if self._updatingModelCombo or not self._parameterNode:
            return
        if self.ui.modelComboBox.itemData(index) == LOAD_MODEL_ITEM:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Load Speckle2Self model"), "",
                _("TorchScript models (*.pt *.pth *.ts *.zip);;All files (*)"))
            if not path:
                self.selectModelInCombo(self._parameterNode.model)
                return
            self._parameterNode.model = path
            self.selectModelInCombo(path)     # also when it was the model already (no Modified event)
        else:
            self._parameterNode.model = self.currentModel()
        self.showModelInfo(followRecommendation=True)

    def showModelInfo(self, followRecommendation: bool = False) -> None:
        """Name, width, training steps and data of the selected model (read without torch)."""
        from Speckle2SelfLib.engine.models import describe_model
        from Speckle2SelfLib.engine.refine import recommended_mode

        try:
            metadata = self.logic.model_metadata(self.currentModel() or None)
            text = describe_model(metadata) if metadata else \
                _("No bundled model in this installation: load a model file.")
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.ui.modelInfoLabel.text = f"<span style='color:#c00'>{err}</span>"
            return
        self.ui.modelInfoLabel.text = text
        if followRecommendation and metadata:
            # a newly chosen model starts with the output it recommends (what the CLI's
            # --refine auto gives); the user may still change the checkbox
            self._parameterNode.guidedSmoothing = recommended_mode(metadata) == "guided"

    # ------------------------------------------------------------------ despeckle
    def onApplyButton(self) -> None:
        self.stopLive()                   # Apply and Live would write into the same output volume
        if self._running:
            self._cancelRequested = True
            if getattr(self, "_job", None) is not None:
                self._job.cancel()        # the worker stops after its current batch (under a second)
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling after the current batch...")
            return
        if not self.torchReady():
            self.ui.statusLabel.text = _("PyTorch is needed to despeckle; it was not installed.")
            return
        p = self._parameterNode
        try:   # frames are read here (main thread); the model loads and runs in a worker thread
            self._job = self.logic.start_process(
                p.inputVolume, p.outputVolume, all_frames=p.allFrames, model=p.model or None,
                device=p.device.lower(), backend=BACKENDS[p.backend], batch_size=p.batchSize or None, gamma=p.gamma,
                blend=p.blend, keep_colour=p.keepColour, grey_levels="network" if not (p.inputGreyLevels or p.guidedSmoothing) else "auto",
                refine="guided" if p.guidedSmoothing else "none")
        except Exception as err:  # shown to the user with the details; the scene is left as it was
            self._showDespeckleError(err)
            return
        self.setRunning(True)
        self._jobTimer = qt.QTimer()
        self._jobTimer.setInterval(self.JOB_POLL_MS)
        self._jobTimer.connect("timeout()", self.onJobTick)
        self._jobTimer.start()

    JOB_POLL_MS = 100                     # GUI timer: progress, and the result written on the main thread

    def onJobTick(self) -> None:
        """QTimer on the main thread: show the worker's progress; when it has ended, the job
        writes its result into the scene here (MRML is never used from the worker thread)."""
        job = getattr(self, "_job", None)
        if job is None:
            return
        if self._cancelRequested:
            job.cancel()
        state = job.poll()
        if state.running:
            self.onProgress(state.done, state.total)
            return
        self._jobTimer.stop()
        self._job = None
        try:
            if state.cancelled:
                self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            elif state.error is not None:
                self._showDespeckleError(state.error)
            else:
                self.showResult(DespeckleRun.from_result(state.result, self.logic.last_seconds))
        except Exception as err:  # showing the result failed: say so, and never leave Apply as Cancel
            self._showDespeckleError(err)
        finally:
            self.setRunning(False)

    def _showDespeckleError(self, err) -> None:
        self.ui.statusLabel.text = _("Failed: {error}").format(error=err)
        self._showError(_("Despeckling failed:\n{error}").format(error=err), err)

    @staticmethod
    def _showError(message: str, err) -> None:
        details = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        logging.error(details)
        slicer.util.errorDisplay(message, detailedText=details)

    def torchReady(self) -> bool:
        """ensurePythonDependencies inside error handling: a failed install (no network, pip
        error) is shown to the user and reported as 'not installed', never raised into Qt."""
        try:
            return self.ensurePythonDependencies()
        except Exception as err:
            logging.error(traceback.format_exc())
            slicer.util.errorDisplay(_("Installing PyTorch failed:\n{error}").format(error=err),
                                     detailedText=traceback.format_exc())
            return False

    @staticmethod
    def ensurePythonDependencies() -> bool:
        """torch is needed for despeckling. Offer PyTorch extension's installer (it picks the CUDA
        build that matches the driver), else pip after one confirmation. False when not installed."""
        if importlib.util.find_spec("torch") is not None:
            return True
        if hasattr(slicer.modules, "pytorchutils"):
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
            return torch is not None
        message = _(
            "Speckle2Self needs PyTorch, which is not installed. This will be installed with pip:\n\n"
            "    torch{requirement}  ({build})\n\n"
            "For a specific CUDA build, cancel and install the 'PyTorch' extension from the Extensions "
            "Manager instead. Install now?").format(requirement=TORCH_REQUIREMENT, build=torchDownloadNote())
        if not slicer.util.confirmOkCancelDisplay(message, _("Install PyTorch")):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install(f"torch{TORCH_REQUIREMENT}")
        importlib.invalidate_caches()
        return importlib.util.find_spec("torch") is not None

    def onProgress(self, done: int, total: int) -> None:
        """Called from the job timer: update the bar (the worker thread keeps the GUI free)."""
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = _("Despeckling... {done}/{total}").format(done=done, total=total)

    def setRunning(self, running: bool) -> None:
        """While running, Apply becomes Cancel and the inputs are locked."""
        self._running = running
        self._cancelRequested = False
        for widget in (self.ui.inputSelector, self.ui.outputSelector, self.ui.allFramesCheckBox,
                       self.ui.modelComboBox, self.ui.deviceComboBox, self.ui.backendComboBox, self.ui.batchSizeSpinBox,
                       self.ui.advancedCollapsibleButton, self.ui.lumenCollapsibleButton, self.ui.liveCheckBox):
            widget.enabled = not running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.visible = running
        self.ui.progressBar.value = 0
        if running:
            self.ui.statusLabel.text = _("Loading the model...")
            slicer.app.processEvents()
        else:
            self.updateButtons()

    def showResult(self, result) -> None:
        p = self._parameterNode
        output = result.output_node
        p.outputVolume = output
        p.lumenVolume = output
        slicer.util.setSliceViewerLayers(background=output, fit=True)
        self.ui.statusLabel.text = _("Despeckled {frames} frame(s) in {seconds:.1f} s -> '{name}'").format(
            frames=result.frames, seconds=result.seconds, name=output.GetName())

    # ------------------------------------------------------------------ live
    LIVE_INTERVAL_MS = 20                 # GUI timer: capture the newest input, show the newest result

    def setupLive(self) -> None:
        """'Live': despeckle the input each time it changes (e.g. Image_Reference of OpenIGTLinkIF).

        Modified events of the input only set a flag (coalesced); a QTimer on the main thread
        snapshots the input and writes the newest result (Speckle2SelfLib.stream.LiveVolumeDespeckler),
        while inference runs in its worker thread. MRML is only touched here, on the main thread.
        """
        self._live = None
        self._liveNode = None
        self._liveDirty = False
        self._liveTimer = qt.QTimer()
        self._liveTimer.setInterval(self.LIVE_INTERVAL_MS)
        self._liveTimer.connect("timeout()", self.onLiveTick)
        self.ui.liveCheckBox.connect("toggled(bool)", self.onLiveToggled)

    def onLiveToggled(self, checked: bool) -> None:
        if checked:
            self.startLive()
        else:
            self.stopLive()

    def startLive(self) -> None:
        p = self._parameterNode
        if self._running or not p or not p.inputVolume:
            self._setLiveChecked(False)
            self.ui.liveStatusLabel.text = _("Wait for Apply to finish (or cancel it).") if self._running else \
                _("Select an input volume to despeckle live.")
            return
        if not self.torchReady():
            self._setLiveChecked(False)
            self.ui.liveStatusLabel.text = _("PyTorch is needed to despeckle; it was not installed.")
            return
        from Speckle2SelfLib.engine.inference import Despeckler
        from Speckle2SelfLib.scene.live import LiveVolumeDespeckler
        from Speckle2SelfLib.scene.nodes import find_sequence

        output = p.outputVolume
        if output is not None and (output is p.inputVolume or output.IsA("vtkMRMLVectorVolumeNode")
                                   or find_sequence(output) is not None):
            output = None                 # grey, never the input, never a sequence's frame: a new volume
        try:
            with slicer.util.WaitCursor():
                despeckler = Despeckler.from_file(p.model or None, p.device.lower(), BACKENDS[p.backend])
                self._live = LiveVolumeDespeckler(despeckler, p.inputVolume, output)
        except Exception as err:  # shown to the user; nothing was changed
            logging.error(traceback.format_exc())
            self._setLiveChecked(False)
            self.ui.liveStatusLabel.text = _("Live failed: {error}").format(error=err)
            return
        self._liveNode = p.inputVolume
        for event in (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent):
            self.addObserver(self._liveNode, event, self.onLiveInputModified)
        for widget in (self.ui.inputSelector, self.ui.modelComboBox, self.ui.deviceComboBox, self.ui.backendComboBox):
            widget.enabled = False
        self._liveDirty = True
        self._liveTimer.start()
        self.ui.liveStatusLabel.text = _("Live: waiting for frames of '{name}'...").format(
            name=self._liveNode.GetName())

    def onLiveInputModified(self, caller, event) -> None:
        self._liveDirty = True            # coalesced: the timer takes at most one snapshot per tick

    def onLiveTick(self) -> None:
        live = self._live
        if live is None:
            return
        if self._liveNode is None or self._liveNode.GetScene() is None:
            self.stopLive()
            return
        try:
            if self._liveDirty:
                self._liveDirty = False
                live.capture()
            updated = live.apply()
        except Exception as err:  # e.g. a frame the model cannot take: stop and say why
            logging.error(traceback.format_exc())
            self.stopLive()
            self.ui.liveStatusLabel.text = _("Live stopped: {error}").format(error=err)
            return
        if not updated:
            return
        if live.updates == 1:
            if self._parameterNode:
                self._parameterNode.outputVolume = live.output_node
            slicer.util.setSliceViewerLayers(background=live.output_node)
        stats = live.stats
        self.ui.liveStatusLabel.text = _(
            "Live: {done} frames despeckled, {dropped} skipped; {ms:.0f} ms per frame").format(
            done=stats.processed, dropped=stats.dropped, ms=stats.latency_ms_median or 0.0)

    def stopLive(self) -> None:
        live = getattr(self, "_live", None)
        if getattr(self, "_liveTimer", None) is not None:
            self._liveTimer.stop()
        if getattr(self, "_liveNode", None) is not None:
            for event in (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent):
                self.removeObserver(self._liveNode, event, self.onLiveInputModified)
            self._liveNode = None
        self._live = None
        if hasattr(self, "ui"):
            self._setLiveChecked(False)
            if not self._running:
                for widget in (self.ui.inputSelector, self.ui.modelComboBox, self.ui.deviceComboBox,
                               self.ui.backendComboBox):
                    widget.enabled = True
        if live is not None:
            live.stop(timeout=5.0)        # waits for the frame in work (a fraction of a second)
            stats = live.stats
            self.ui.liveStatusLabel.text = _("Live stopped: {done} frames despeckled, {dropped} skipped.").format(
                done=stats.processed, dropped=stats.dropped)

    def _setLiveChecked(self, checked: bool) -> None:
        wasBlocked = self.ui.liveCheckBox.blockSignals(True)
        self.ui.liveCheckBox.checked = checked
        self.ui.liveCheckBox.blockSignals(wasBlocked)

    # ------------------------------------------------------------------ adapt model
    ADAPT_INTERVAL_MS = 500               # GUI timer: show the background run's progress
    ADAPT_CROPS = [64, 96, 128, 192, 256]
    ADAPT_PREVIEW_WIDTH = 360

    def setupAdapt(self) -> None:
        """'Adapt model': fine-tune a model on the scene's own images (Speckle2SelfLib.engine.adapt).

        The frames are read here, on the main thread; training runs in the job's thread and a
        QTimer shows its snapshot (progress, loss terms, loss plot, preview). MRML is never
        touched off the main thread, and the scene is never modified.
        """
        self._adaptJob = None
        self._adaptVersion = -1
        self._adaptTimer = qt.QTimer()
        self._adaptTimer.setInterval(self.ADAPT_INTERVAL_MS)
        self._adaptTimer.connect("timeout()", self.onAdaptTick)
        for crop in self.ADAPT_CROPS:
            self.ui.adaptCropComboBox.addItem(str(crop), crop)
        self.ui.adaptCropComboBox.currentIndex = self.ADAPT_CROPS.index(128)
        for device in DEVICES:
            self.ui.adaptDeviceComboBox.addItem(device)
        self.ui.adaptProgressBar.maximum = 1000
        self.ui.adaptProgressBar.hide()
        self.ui.adaptStartButton.connect("clicked(bool)", self.onAdaptStartButton)
        self.ui.adaptRemoveButton.connect("clicked(bool)", self.onAdaptRemoveButton)
        self.ui.adaptInputSelector.connect("checkedNodesChanged()", self.updateAdaptButtons)
        self.ui.adaptCollapsibleButton.connect("contentsCollapsed(bool)", self.onAdaptSectionToggled)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateAdaptButtons)
        self.populateAdaptInitCombo()
        self.updateAdaptButtons()

    def onAdaptSectionToggled(self, collapsed: bool) -> None:
        if not collapsed and not self.adaptRunning():
            self.populateAdaptInitCombo()     # models loaded since show up as starting points

    def adaptRunning(self) -> bool:
        return self._adaptJob is not None and self._adaptJob.is_running()

    def populateAdaptInitCombo(self) -> None:
        """The models of the Model list (bundled, user models, loaded files); the one selected there first."""
        source, combo = self.ui.modelComboBox, self.ui.adaptInitComboBox
        combo.clear()
        for i in range(source.count):
            if source.itemData(i) != LOAD_MODEL_ITEM:
                combo.addItem(source.itemText(i), source.itemData(i))
        selected = combo.findData(source.currentData) if source.currentData != LOAD_MODEL_ITEM else -1
        combo.currentIndex = max(selected, 0)
        self.ui.adaptFolderLabel.text = _("User models folder: {folder}").format(
            folder=self.logic.user_models_directory())

    def updateAdaptButtons(self, *args) -> None:
        if not hasattr(self, "_adaptTimer") or self.adaptRunning():
            return
        nodes = self.ui.adaptInputSelector.checkedNodes()
        self.ui.adaptStartButton.enabled = bool(nodes) and self.ui.adaptInitComboBox.count > 0
        self.ui.adaptStartButton.toolTip = _("Start fine-tuning in the background; click again to stop "
                                             "(the best weights so far are kept)") if nodes else \
            _("Check one or more volumes or sequences to adapt on")
        model = self.currentModel()
        self.ui.adaptRemoveButton.enabled = bool(model) and self.logic.is_user_model(model)

    def onAdaptStartButton(self) -> None:
        if self.adaptRunning():
            self._adaptJob.stop()
            self.ui.adaptStartButton.enabled = False
            self.ui.adaptStartButton.text = _("Stopping after the current step...")
            return
        if not self.torchReady():
            self.ui.adaptStatusLabel.text = _("PyTorch is needed to adapt a model; it was not installed.")
            return
        minutes = self.ui.adaptMinutesSpinBox.value or None
        steps = self.ui.adaptStepsSpinBox.value or None
        if not minutes and not steps:
            self.ui.adaptStatusLabel.text = _("Give a time budget or a number of steps.")
            return
        try:
            with slicer.util.WaitCursor():
                self._adaptJob = self.logic.start_adaptation(
                    self.ui.adaptInputSelector.checkedNodes(), init=self.ui.adaptInitComboBox.currentData or None,
                    minutes=minutes, steps=steps, crop=int(self.ui.adaptCropComboBox.currentData),
                    device=self.ui.adaptDeviceComboBox.currentText.lower())
        except Exception as err:  # bad input nodes or settings: nothing was started
            logging.error(traceback.format_exc())
            self.ui.adaptStatusLabel.text = _("Cannot adapt: {error}").format(error=err)
            return
        self._adaptVersion = -1
        self.ui.adaptWarningsLabel.text = ""
        self.setAdaptRunning(True)
        self._adaptTimer.start()
        self.onAdaptTick()

    def setAdaptRunning(self, running: bool) -> None:
        for widget in (self.ui.adaptInputSelector, self.ui.adaptInitComboBox, self.ui.adaptMinutesSpinBox,
                       self.ui.adaptStepsSpinBox, self.ui.adaptCropComboBox, self.ui.adaptDeviceComboBox,
                       self.ui.adaptRemoveButton):
            widget.enabled = not running
        self.ui.adaptStartButton.text = _("Stop") if running else _("Start adaptation")
        self.ui.adaptStartButton.enabled = True
        self.ui.adaptProgressBar.visible = running
        if not running:
            self.updateAdaptButtons()

    def onAdaptTick(self) -> None:
        job = self._adaptJob
        if job is None:
            self._adaptTimer.stop()
            return
        snap = job.snapshot()
        self.ui.adaptProgressBar.value = int(1000 * snap.fraction)
        if snap.step:
            loss = snap.loss
            self.ui.adaptStatusLabel.text = _(
                "{phase}: step {step}, {minutes:.1f} min; loss {total:.4f} (reconstruction {rec:.4f}, "
                "consistency {cons:.4f})").format(phase=snap.phase.capitalize(), step=snap.step,
                                                  minutes=snap.elapsed_s / 60, total=loss.get("total", 0.0),
                                                  rec=loss.get("reconstruction", 0.0),
                                                  cons=loss.get("consistency", 0.0))
        else:
            self.ui.adaptStatusLabel.text = _("Preparing the frames and the model...")
        self.ui.adaptWarningsLabel.text = "\n".join("\u26a0 " + w for w in snap.warnings)
        if snap.version != self._adaptVersion:
            self._adaptVersion = snap.version
            self._showAdaptImage(self.ui.adaptPreviewLabel, snap.preview_path)
            self._showAdaptImage(self.ui.adaptLossPlotLabel, snap.loss_plot_path)
        if not job.is_running():
            self.finishAdaptation()

    def _showAdaptImage(self, label, path) -> None:
        if path is None:
            return
        pixmap = qt.QPixmap(str(path))
        if pixmap.isNull():                   # already removed (the run ended): keep the last one shown
            return
        if pixmap.width() > self.ADAPT_PREVIEW_WIDTH:
            pixmap = pixmap.scaledToWidth(self.ADAPT_PREVIEW_WIDTH, qt.Qt.SmoothTransformation)
        label.setPixmap(pixmap)

    def finishAdaptation(self) -> None:
        """The run ended: select its (registered) model, or say why there is none."""
        self._adaptTimer.stop()
        job, self._adaptJob = self._adaptJob, None
        self.setAdaptRunning(False)
        if job.error is not None:
            self.ui.adaptStatusLabel.text = _("Adaptation ended without a model: {error}").format(error=job.error)
            return
        result = job.result
        self.populateModelCombo()
        self.populateAdaptInitCombo()
        if self._parameterNode:
            self._parameterNode.model = str(result.path)   # despeckle with the adapted model from now on
        self.selectModelInCombo(str(result.path))
        self.showModelInfo(followRecommendation=True)    # the adapted model's recommended output
        self.ui.adaptStatusLabel.text = _(
            "{how} after {steps} steps: model '{name}' saved to {path} and selected above.").format(
            how=_("Stopped") if result.stopped else _("Done"), steps=result.steps, name=result.name,
            path=result.path)
        self.updateAdaptButtons()

    def stopAdapt(self) -> None:
        job = getattr(self, "_adaptJob", None)
        if job is not None:
            job.stop()
        if getattr(self, "_adaptTimer", None) is not None:
            self._adaptTimer.stop()

    def onAdaptRemoveButton(self) -> None:
        model = self.currentModel()
        if not model or not self.logic.is_user_model(model):
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Delete the user model file {path}?").format(path=model), _("Remove model")):
            return
        with slicer.util.tryWithErrorDisplay(_("Removing the model failed."), waitCursor=True):
            self.logic.remove_user_model(model)
            if self._parameterNode and self._parameterNode.model == model:
                self._parameterNode.model = ""
            self.populateModelCombo()
            self.populateAdaptInitCombo()
            self.selectModelInCombo(self._parameterNode.model if self._parameterNode else "")
            self.ui.adaptStatusLabel.text = _("Removed {path}.").format(path=model)
        self.updateAdaptButtons()

    # ------------------------------------------------------------------ lumen
    SEGMENT_POLL_MS = 100                 # GUI timer: progress, and the result written on the main thread

    def onSegmentButton(self) -> None:
        """Segment: the frames are read here (main thread) and segmented in a worker thread
        (Speckle2SelfLib.scene.lumen.SegmentJob) that a QTimer polls; the button cancels while it runs."""
        if self._segmentJob is not None:
            self._segmentCancelRequested = True
            self._segmentJob.cancel()     # the worker stops after the current frame
            self.ui.segmentButton.enabled = False
            self.ui.lumenStatusLabel.text = _("Cancelling after the current frame...")
            return
        p = self._parameterNode
        try:
            self._segmentJob = self.logic.start_segmentation(
                p.lumenVolume, p.seedPoints, method=p.lumenMethod, tolerance=p.tolerance,
                all_frames=p.lumenAllFrames, segmentation_node=p.lumenSegmentation, table_node=p.lumenTable)
        except Exception as err:  # bad input or seed: shown with the details; nothing was started
            self.ui.lumenStatusLabel.text = _("Failed: {error}").format(error=err)
            self._showError(_("Lumen segmentation failed:\n{error}").format(error=err), err)
            return
        self.setSegmenting(True)
        self._segmentTimer = qt.QTimer()
        self._segmentTimer.setInterval(self.SEGMENT_POLL_MS)
        self._segmentTimer.connect("timeout()", self.onSegmentTick)
        self._segmentTimer.start()

    def onSegmentTick(self) -> None:
        """QTimer on the main thread: show the worker's progress; when it has ended, the job
        writes all its outputs into the scene here (or none, when cancelled or failed)."""
        job = self._segmentJob
        if job is None:
            return
        if self._segmentCancelRequested:
            job.cancel()
        state = job.poll()
        if state.running:
            self.ui.lumenProgressBar.maximum = max(state.total, 1)
            self.ui.lumenProgressBar.value = state.done
            self.ui.lumenStatusLabel.text = _("Segmenting... {done}/{total} frame(s)").format(
                done=state.done, total=state.total)
            return
        self._segmentTimer.stop()
        self._segmentJob = None
        self.setSegmenting(False)
        if state.cancelled:
            self.ui.lumenStatusLabel.text = _("Cancelled; nothing was added to the scene.")
        elif state.error is not None:
            self.ui.lumenStatusLabel.text = _("Failed: {error}").format(error=state.error)
            self._showError(_("Lumen segmentation failed:\n{error}").format(error=state.error), state.error)
        else:
            try:
                self.showLumenResult(state.result)
            except Exception as err:  # the nodes are in the scene; showing them failed: say why
                self.ui.lumenStatusLabel.text = _("Failed: {error}").format(error=err)
                self._showError(_("Showing the lumen segmentation failed:\n{error}").format(error=err), err)

    def setSegmenting(self, running: bool) -> None:
        """While segmenting, Segment becomes Cancel and the lumen inputs are locked."""
        self._segmentCancelRequested = False
        for widget in (self.ui.lumenVolumeSelector, self.ui.seedSelector, self.ui.seedPlaceWidget,
                       self.ui.lumenMethodComboBox, self.ui.toleranceSliderWidget, self.ui.lumenAllFramesCheckBox,
                       self.ui.openSegmentEditorButton):
            widget.enabled = not running
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment")
        self.ui.segmentButton.enabled = True
        self.ui.lumenProgressBar.visible = running
        self.ui.lumenProgressBar.value = 0
        if running:
            self.ui.lumenStatusLabel.setStyleSheet("")
            self.ui.lumenStatusLabel.text = _("Segmenting...")
        self.updateButtons()              # also Apply: unavailable while segmenting

    def stopSegmentation(self) -> None:
        job = getattr(self, "_segmentJob", None)
        if job is not None:
            job.cancel()
            self._segmentCancelRequested = True

    def showLumenResult(self, result) -> None:
        """Select the outputs, show the chart and the table (flagged frames in red) and say so."""
        p = self._parameterNode
        p.lumenSegmentation = result.segmentation_node
        p.lumenTable = result.table_node
        if result.plot_chart_node is not None:     # diameter over frames, in the layout's plot view
            slicer.modules.plots.logic().ShowChartInLayout(result.plot_chart_node)
        slicer.util.setSliceViewerLayers(background=p.lumenVolume)
        self.ui.lumenTableView.setMRMLTableNode(result.table_node)
        flaggedRows = [row for row, k in enumerate(result.frames) if result.sequence.flagged[k]]
        self._paintRowsRed(flaggedRows, len(result.frames))
        seedFrame = result.seed_ijk[2]      # table order starts at frame 0, not necessarily at the seed
        first = result.sequence.measurements[seedFrame] if seedFrame < len(result.sequence.measurements) else None
        if first is not None:
            text = _("{frames} frame(s) segmented; seed frame: area {area:.1f} mm2, diameter {diameter:.2f} mm").format(
                frames=len(result.frames), area=first.area_mm2, diameter=first.equivalent_diameter_mm)
            if flaggedRows:
                k = result.frames[flaggedRows[0]]
                text += "\n" + _("{count} frame(s) FLAGGED as implausible (red rows), e.g. frame {frame}: {reason}").format(
                    count=len(flaggedRows), frame=k, reason=result.sequence.flag_reasons[k])
            self.ui.lumenStatusLabel.text = text
            self.ui.lumenStatusLabel.setStyleSheet("color: #c00000" if flaggedRows else "")
        self.updateButtons()

    def _paintRowsRed(self, rows, rowCount: int) -> None:
        """Show the table rows of flagged frames in red. Display only: the model's signals are
        blocked so that nothing is written back to the table node."""
        view = self.ui.lumenTableView
        model = view.tableModel() if hasattr(view, "tableModel") else view.model()
        model = model.sourceModel() if hasattr(model, "sourceModel") else model
        if model is None or not hasattr(model, "item"):
            return
        offset = max(model.rowCount() - rowCount, 0)   # 1 when column names are shown as a first row
        background, foreground = qt.QBrush(qt.QColor(255, 200, 200)), qt.QBrush(qt.QColor(170, 0, 0))
        wasBlocked = model.blockSignals(True)
        try:
            for row in rows:
                for column in range(model.columnCount()):
                    item = model.item(row + offset, column)
                    if item is not None:
                        item.setBackground(background)
                        item.setForeground(foreground)
        finally:
            model.blockSignals(wasBlocked)
        view.viewport().update()

    def onOpenSegmentEditor(self) -> None:
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.lumenSegmentation)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
        setSource(p.lumenVolume)


def torchDownloadNote() -> str:
    """What pip's default torch wheel is on this platform: PyPI's Linux wheels bundle CUDA."""
    import sys

    if sys.platform.startswith("linux"):
        return _("from PyPI; on Linux this build includes the CUDA libraries, a download of several GB")
    return _("CPU build from PyPI, a download of a few hundred MB")


def userModelsDirectory() -> str:
    """Where "Adapt model" keeps its models: $SPECKLE2SELF_USER_MODELS, else Speckle2Self/models
    beside Slicer's settings file (set as the Lib's default, for the GUI and the console alike)."""
    from Speckle2SelfLib.engine import user_models

    settings = os.path.dirname(slicer.app.slicerUserSettingsFilePath)
    user_models.set_default_directory(os.path.join(settings, "Speckle2Self", "models"))
    return str(user_models.user_models_dir())


#
# Test
#

def requiresTorch(testMethod):
    """Skip a test cleanly when PyTorch is not installed (never install it from a test): CTest's
    slicer_add_python_unittest calls each test_* method directly, without runTest's check."""
    import functools

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
        import time

        frames, _masks = self.speckledFrames(1)
        volume = self.addVolume(frames)
        widget = slicer.modules.speckle2self.widgetRepresentation().self()
        widget.initializeParameterNode()      # the scene was cleared: observe the new parameter node
        parameterNode = widget._parameterNode
        parameterNode.inputVolume = volume
        parameterNode.outputVolume = None
        parameterNode.model = self.model() or ""
        widget.onApplyButton()            # despeckles in a worker thread; the GUI timer stores the result
        deadline = time.monotonic() + 120
        while widget._running and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertFalse(widget._running, "the despeckling job did not end")
        output = parameterNode.outputVolume
        self.assertIsNotNone(output)
        self.assertEqual(output.GetName(), "US despeckled")
        self.assertEqual(widget.ui.applyButton.text, "Apply")

    @requiresTorch
    def test_widget_segment(self):
        """Segment runs in a background job; its table and segmentation appear when it ends."""
        import time

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
        parameterNode = widget._parameterNode
        parameterNode.lumenVolume = volume
        parameterNode.seedPoints = seeds
        parameterNode.lumenSegmentation = None
        parameterNode.lumenTable = None
        widget.onSegmentButton()          # segments in a worker thread; the GUI timer stores the result
        deadline = time.monotonic() + 60
        while widget._segmentJob is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertIsNone(widget._segmentJob, "the segmentation job did not end")
        self.assertIsNotNone(parameterNode.lumenTable)
        self.assertEqual(parameterNode.lumenTable.GetNumberOfRows(), 1)
        self.assertIsNotNone(parameterNode.lumenSegmentation)
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
