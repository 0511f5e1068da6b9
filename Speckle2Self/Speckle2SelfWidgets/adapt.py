"""The Adapt model panel: fine-tune a model on the scene's own images, in the background."""

import logging
import traceback

import qt
import slicer
from slicer.i18n import tr as _

from .installer import torchReady
from .jobpoller import JobPoller
from .panel import Panel


class AdaptPanel(Panel):
    """The settings are the parameter node's (adaptInputs, adaptInit, adaptMinutes, adaptSteps,
    adaptCrop, adaptDevice), so they are saved with the scene. The frames are read on the main
    thread; training runs in the job's thread (Speckle2SelfLib.engine.adapt.AdaptJob) and a
    JobPoller shows its snapshot (progress, loss terms, loss plot, preview). The scene is never
    modified."""

    POLL_MS = 500                     # the run's progress; a step takes about a second
    PREVIEW_WIDTH = 360

    def setup(self) -> None:
        self.poller = None
        self._shownVersion = -1
        self._syncing = False
        self.ui.adaptProgressBar.maximum = 1000
        self.ui.adaptProgressBar.hide()
        self.ui.adaptStartButton.connect("clicked(bool)", self.onStartButton)
        self.ui.adaptRemoveButton.connect("clicked(bool)", self.onRemoveButton)
        self.ui.adaptInputSelector.connect("checkedNodesChanged()", self.onInputsChecked)
        self.ui.adaptInitComboBox.connect("currentIndexChanged(int)", self.onInitChosen)
        self.ui.adaptCollapsibleButton.connect("contentsCollapsed(bool)", self.onSectionToggled)
        self.populateInitCombo()

    @property
    def running(self) -> bool:
        return self.poller is not None

    # ------------------------------------------------------------------ settings <-> parameter node
    def onInputsChecked(self) -> None:
        if not self._syncing and self.parameterNode:
            self.parameterNode.adaptInputs = list(self.ui.adaptInputSelector.checkedNodes())
        self.updateButtons()

    def onInitChosen(self, index: int) -> None:
        if not self._syncing and self.parameterNode and index >= 0:
            self.parameterNode.adaptInit = self.ui.adaptInitComboBox.itemData(index) or ""

    def updateFromParameterNode(self) -> None:
        p = self.parameterNode
        if p is None:
            return
        self._syncing = True
        try:
            selector, wanted = self.ui.adaptInputSelector, list(p.adaptInputs)
            for node in set(selector.checkedNodes()) | set(wanted):
                selector.setCheckState(node, qt.Qt.Checked if node in wanted else qt.Qt.Unchecked)
            combo = self.ui.adaptInitComboBox
            index = combo.findData(p.adaptInit) if p.adaptInit else -1
            if index >= 0:
                combo.currentIndex = index
        finally:
            self._syncing = False
        if index < 0 and combo.count and p.adaptInit != (combo.currentData or ""):
            p.adaptInit = combo.currentData or ""     # none chosen or gone: Start uses what the list shows
        self.updateButtons()

    def onSectionToggled(self, collapsed: bool) -> None:
        if not collapsed and not self.running:
            self.populateInitCombo()      # models loaded since show up as starting points

    def populateInitCombo(self) -> None:
        """The models of the Model list; the parameter node's starting model, else the one selected there."""
        combo = self.ui.adaptInitComboBox
        self._syncing = True
        try:
            combo.clear()
            for label, model in self.host.models.models():
                combo.addItem(label, model)
            p = self.parameterNode
            chosen = combo.findData(p.adaptInit) if p and p.adaptInit else -1
            if chosen < 0:
                chosen = combo.findData(self.ui.modelComboBox.currentData)
            combo.currentIndex = max(chosen, 0)
        finally:
            self._syncing = False
        if self.parameterNode and combo.count:
            self.parameterNode.adaptInit = combo.currentData or ""   # Start uses what the list shows
        self.ui.adaptFolderLabel.text = _("User models folder: {folder}").format(
            folder=self.logic.user_models_directory())

    def updateButtons(self) -> None:
        if self.running:
            return
        p = self.parameterNode
        nodes = list(p.adaptInputs) if p else []
        self.ui.adaptStartButton.enabled = bool(nodes) and self.ui.adaptInitComboBox.count > 0
        self.ui.adaptStartButton.toolTip = _("Start fine-tuning in the background; click again to stop "
                                             "(the best weights so far are kept)") if nodes else \
            _("Check one or more volumes or sequences to adapt on")
        model = self.host.models.current()
        self.ui.adaptRemoveButton.enabled = bool(model) and self.logic.is_user_model(model)

    # ------------------------------------------------------------------ the run
    def onStartButton(self) -> None:
        if self.running:
            self.poller.cancel()          # the run ends after its current step, keeping the best weights
            self.ui.adaptStartButton.enabled = False
            self.ui.adaptStartButton.text = _("Stopping after the current step...")
            return
        if not torchReady():
            self.ui.adaptStatusLabel.text = _("PyTorch is needed to adapt a model; it was not installed.")
            return
        p = self.parameterNode
        if not p.adaptMinutes and not p.adaptSteps:
            self.ui.adaptStatusLabel.text = _("Give a time budget or a number of steps.")
            return
        try:
            with slicer.util.WaitCursor():
                job = self.logic.start_adaptation(
                    list(p.adaptInputs), init=p.adaptInit or None, minutes=p.adaptMinutes or None,
                    steps=p.adaptSteps or None, crop=int(p.adaptCrop), device=p.adaptDevice.lower())
        except Exception as err:  # bad input nodes or settings: nothing was started
            logging.error(traceback.format_exc())
            self.ui.adaptStatusLabel.text = _("Cannot adapt: {error}").format(error=err)
            return
        self._shownVersion = -1
        self.ui.adaptWarningsLabel.text = ""
        self.poller = JobPoller(job, self.POLL_MS, self.onProgress, self.onEnd)
        self.setRunning(True)
        self.showSnapshot(job.snapshot())

    def onProgress(self, state) -> None:
        self.showSnapshot(self.poller.job.snapshot())

    def showSnapshot(self, snap) -> None:
        """Progress, loss terms, warnings, and the preview and loss plot when they were rewritten."""
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
        if snap.version != self._shownVersion:
            self._shownVersion = snap.version
            self._showImage(self.ui.adaptPreviewLabel, snap.preview_path)
            self._showImage(self.ui.adaptLossPlotLabel, snap.loss_plot_path)

    def _showImage(self, label, path) -> None:
        if path is None:
            return
        pixmap = qt.QPixmap(str(path))
        if pixmap.isNull():                   # already removed (the run ended): keep the last one shown
            return
        if pixmap.width() > self.PREVIEW_WIDTH:
            pixmap = pixmap.scaledToWidth(self.PREVIEW_WIDTH, qt.Qt.SmoothTransformation)
        label.setPixmap(pixmap)

    def onEnd(self, state) -> None:
        """The run ended: select its (registered) model, or say why there is none."""
        job, self.poller = self.poller.job, None
        self.showSnapshot(job.snapshot())
        self.setRunning(False)
        if not state.finished:
            self.ui.adaptStatusLabel.text = _("Adaptation ended without a model: {error}").format(
                error=state.error or job.error)
            return
        result = state.result
        models = self.host.models
        models.populate()
        self.populateInitCombo()
        if self.parameterNode:
            self.parameterNode.model = str(result.path)   # despeckle with the adapted model from now on
        models.select(str(result.path))
        models.showInfo(followRecommendation=True)        # the adapted model's recommended output
        self.ui.adaptStatusLabel.text = _(
            "{how} after {steps} steps: model '{name}' saved to {path} and selected above.").format(
            how=_("Stopped") if result.stopped else _("Done"), steps=result.steps, name=result.name,
            path=result.path)
        self.updateButtons()

    def setRunning(self, running: bool) -> None:
        ui = self.ui
        self.showBusy(running, (ui.adaptInputSelector, ui.adaptInitComboBox, ui.adaptMinutesSpinBox,
                                ui.adaptStepsSpinBox, ui.adaptCropComboBox, ui.adaptDeviceComboBox,
                                ui.adaptRemoveButton),
                      ui.adaptStartButton, _("Stop"), _("Start adaptation"), ui.adaptProgressBar)
        if not running:
            self.updateButtons()

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.job.stop()        # the run ends by itself after its step; nothing to wait for here
            self.poller.stop()
            self.poller = None
            self.setRunning(False)

    def onRemoveButton(self) -> None:
        models = self.host.models
        model = models.current()
        if not model or not self.logic.is_user_model(model):
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Delete the user model file {path}?").format(path=model), _("Remove model")):
            return
        p = self.parameterNode
        with slicer.util.tryWithErrorDisplay(_("Removing the model failed."), waitCursor=True):
            self.logic.remove_user_model(model)
            if p and p.model == model:
                p.model = ""
            models.populate()
            self.populateInitCombo()
            models.select(p.model if p else "")
            self.ui.adaptStatusLabel.text = _("Removed {path}.").format(path=model)
        self.updateButtons()
