"""The Despeckle panel: input, output, model and options; Apply despeckles in the background and turns into Cancel."""

import slicer
from slicer.i18n import tr as _

from Speckle2SelfLib.scene.logic import SLICE_AXIS_LABELS, DespeckleRun, is_rgb
from Speckle2SelfLib.scene.nodes import find_sequence, volume_showing

from .installer import offerFastBackend, torchReady
from .jobpoller import JobPoller
from .panel import Panel, showError

BACKENDS = {"Auto": "auto", "fp32": "fp32", "bf16": "bf16", "OpenVINO": "openvino", "ONNX Runtime": "onnxruntime"}
#: The combo box's labels -> Speckle2SelfLib.engine.volume_axes choices ("auto" first: the default).
SLICE_AXES = {label: axis for axis, label in SLICE_AXIS_LABELS.items()}


class DespecklePanel(Panel):
    """Apply reads the frames on the main thread and despeckles them in a worker thread
    (Speckle2SelfLib.scene.despeckle.DespeckleJob) that a JobPoller polls; the result is written
    into the scene on the main thread at the end, or nothing when cancelled or failed."""

    POLL_MS = 100                     # progress, and the result written on the main thread

    def setup(self) -> None:
        self.poller = None
        self.ui.progressBar.hide()
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.host.updateInputDependentWidgets)
        self.ui.allFramesCheckBox.connect("toggled(bool)", self.host.updateInputDependentWidgets)
        self.planeToolTip = self.ui.sliceAxisComboBox.toolTip
        self.planeNote = ""

    @property
    def running(self) -> bool:
        return self.poller is not None

    def updateInputDependentWidgets(self) -> None:
        """'all frames' only for a sequence proxy; 'keep colour' only for RGB input; the plane
        choice only for a single volume of several slices (a sequence's frames are its planes)."""
        node = self.ui.inputSelector.currentNode()
        found = find_sequence(node) if node else None
        self.ui.allFramesCheckBox.visible = found is not None
        if found is not None:
            sequence, _browser = found
            self.ui.allFramesCheckBox.text = _("all {count} frames of sequence '{name}'").format(
                count=sequence.GetNumberOfDataNodes(), name=sequence.GetName())
        self.ui.keepColourCheckBox.enabled = bool(node and is_rgb(node))
        image = node.GetImageData() if node else None
        volume = bool(image and image.GetDimensions()[2] > 1)
        frames = found is not None and self.ui.allFramesCheckBox.checked
        self.ui.sliceAxisComboBox.enabled = volume and not frames
        self.ui.sliceAxisLabel.enabled = self.ui.sliceAxisComboBox.enabled
        # the uncertainty map: volumes, frames and whole sequences (the logic refuses three planes)
        self.ui.uncertaintyCheckBox.enabled = bool(node)
        self.ui.uncertaintySelector.enabled = self.ui.uncertaintyCheckBox.enabled
        self.ui.sliceAxisComboBox.toolTip = _("a sequence's frames are its planes") if frames else \
            self.planeToolTip if volume else _("only a 3D volume has planes to choose from")

    def updateFromParameterNode(self) -> None:
        if self.running:
            return
        p = self.parameterNode
        problem = None
        if not p or not p.inputVolume:
            problem = _("Select an input volume")
        elif not self.host.models.current() and not self.logic.has_bundled_model():
            problem = _("No bundled model: choose 'Load model file...'")
        elif self.host.lumen.running:   # Apply locks the lumen panel, and with it Segment's Cancel
            problem = _("Wait for the lumen segmentation to end (or cancel it)")
        self.ui.applyButton.enabled = problem is None
        self.ui.applyButton.toolTip = problem or _("Despeckle the input (click again to cancel)")
        # a guided result is a weighted mean of input pixels: it has the input's grey levels anyway
        self.ui.inputGreyLevelsCheckBox.enabled = bool(p and not p.guidedSmoothing)

    def onApplyButton(self) -> None:
        self.host.live.stop()             # Apply and Live would write into the same output volume
        if self.running:
            self.poller.cancel()          # the worker stops after its current batch (under a second)
            self.ui.applyButton.enabled = False
            self.ui.statusLabel.text = _("Cancelling after the current batch...")
            return
        if not torchReady():
            self.ui.statusLabel.text = _("PyTorch is needed to despeckle; it was not installed.")
            return
        p = self.parameterNode
        offerFastBackend(BACKENDS[p.backend], p.device.lower())
        try:   # frames are read here (main thread); the model loads and runs in a worker thread
            job = self.logic.start_process(
                p.inputVolume, p.outputVolume, all_frames=p.allFrames, model=p.model or None,
                device=p.device.lower(), backend=BACKENDS[p.backend], batch_size=p.batchSize or None, gamma=p.gamma,
                blend=p.blend, keep_colour=p.keepColour,
                grey_levels="network" if not (p.inputGreyLevels or p.guidedSmoothing) else "auto",
                refine="guided" if p.guidedSmoothing else "none", **self.sliceOption(), **self.uncertaintyOption())
        except Exception as err:  # shown to the user with the details; the scene is left as it was
            self.showFailure(err)
            return
        self.poller = JobPoller(job, self.POLL_MS, self.onProgress, self.onEnd)
        self.setRunning(True)
        self.planeNote = self.describePlane(job)
        if self.planeNote:
            self.ui.statusLabel.text = self.planeNote

    def sliceOption(self) -> dict:
        """The plane choice, for a single multi-slice volume only (sequences and 2D images ignore it)."""
        return {"slice_axis": SLICE_AXES.get(self.parameterNode.sliceAxis, "auto")} \
            if self.ui.sliceAxisComboBox.enabled else {}

    def uncertaintyOption(self) -> dict:
        p = self.parameterNode
        if not (p.uncertainty and self.ui.uncertaintyCheckBox.enabled):
            return {}
        return {"uncertainty": True, "uncertainty_node": p.uncertaintyVolume}

    @staticmethod
    def describePlane(job) -> str:
        """Which plane a volume job despeckles in, and why (auto says what it found)."""
        choice = getattr(job, "slice_choice", None)
        return _("Planes: {choice}").format(choice=choice.describe()) if choice is not None else ""

    def onProgress(self, state) -> None:
        """The bar moves while the worker thread keeps the GUI free."""
        self.ui.progressBar.maximum = max(state.total, 1)
        self.ui.progressBar.value = state.done
        self.ui.statusLabel.text = _("Despeckling... {done}/{total}").format(done=state.done, total=state.total)

    def onEnd(self, state) -> None:
        """The job has ended; a finished job has written its result into the scene (main thread)."""
        self.poller = None
        try:
            if state.cancelled:
                self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")
            elif state.error is not None:
                self.showFailure(state.error)
            else:
                self.showResult(DespeckleRun.from_result(state.result, self.logic.last_seconds))
        except Exception as err:  # showing the result failed: say so, and never leave Apply as Cancel
            self.showFailure(err)
        finally:
            self.setRunning(False)

    def showFailure(self, err) -> None:
        self.ui.statusLabel.text = _("Failed: {error}").format(error=err)
        showError(_("Despeckling failed:\n{error}").format(error=err), err)

    def setRunning(self, running: bool) -> None:
        """While running, Apply becomes Cancel and the inputs are locked."""
        ui = self.ui
        self.showBusy(running, (ui.inputSelector, ui.outputSelector, ui.allFramesCheckBox, ui.sliceAxisComboBox,
                                ui.uncertaintyCheckBox, ui.uncertaintySelector, ui.modelComboBox, ui.deviceComboBox,
                                ui.backendComboBox, ui.batchSizeSpinBox, ui.advancedCollapsibleButton,
                                ui.lumenCollapsibleButton, ui.liveCheckBox),
                      ui.applyButton, _("Cancel"), _("Apply"), ui.progressBar)
        if running:
            self.ui.statusLabel.text = _("Loading the model...")
        else:
            self.updateInputDependentWidgets()      # the plane choice is for some inputs only
            self.host.updateButtons()

    def showResult(self, result) -> None:
        p = self.parameterNode
        output = result.output_node
        p.outputVolume = output
        p.lumenVolume = output
        uncertainty = getattr(self.logic, "last_uncertainty_node", None) if p.uncertainty else None
        shown = volume_showing(uncertainty) if uncertainty is not None else None   # a sequence's: its proxy
        if shown is not None:
            p.uncertaintyVolume = shown
            showAsOverlay(shown, mapValues(uncertainty))
            slicer.util.setSliceViewerLayers(background=output, foreground=shown, foregroundOpacity=0.4, fit=True)
        else:
            slicer.util.setSliceViewerLayers(background=output, fit=True)
        status = _("Despeckled {frames} frame(s) in {seconds:.1f} s -> '{name}' ({engine})").format(
            frames=result.frames, seconds=result.seconds, name=output.GetName(), engine=self.logic.engine_description())
        self.ui.statusLabel.text = f"{status}\n{self.planeNote}" if self.planeNote else status

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.stop()
            self.poller = None
            self.setRunning(False)


def showAsOverlay(uncertainty, values=None) -> None:
    """A warm-over-cold colour map from 0 to the 99th percentile of ``values`` (default: the
    volume's; its rare extremes would wash out the rest), for showing over the despeckled image."""
    import numpy as np

    uncertainty.CreateDefaultDisplayNodes()
    display = uncertainty.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
    display.AutoWindowLevelOff()
    values = slicer.util.arrayFromVolume(uncertainty) if values is None else values
    display.SetWindowLevelMinMax(0.0, float(np.percentile(values, 99)) if values.size else 1.0)


#: Values of a map sequence its colour scale is taken from: a long cine loop is sampled evenly, so
#: that the scale costs the GUI thread no more than a few frames' worth of memory and time.
MAP_SCALE_SAMPLES = 4_000_000


def mapValues(uncertainty):
    """The map's values: of every item of a map sequence, so that one colour scale holds for the
    whole loop (a frame's own percentile would change the colours from frame to frame); at most
    about MAP_SCALE_SAMPLES of them, taken evenly from every item."""
    import numpy as np

    if not uncertainty.IsA("vtkMRMLSequenceNode"):
        return slicer.util.arrayFromVolume(uncertainty)
    items = [uncertainty.GetNthDataNode(i) for i in range(uncertainty.GetNumberOfDataNodes())]
    voxels = sum(int(np.prod(item.GetImageData().GetDimensions())) for item in items if item.GetImageData())
    step = max(1, -(-voxels // MAP_SCALE_SAMPLES))
    return np.concatenate([slicer.util.arrayFromVolume(item).ravel()[::step] for item in items]) if items \
        else np.zeros(0, np.float32)
