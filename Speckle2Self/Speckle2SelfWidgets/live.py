"""The Live check box: despeckle the input each time it changes (e.g. Image_Reference of OpenIGTLinkIF)."""

import logging
import traceback

import qt
import slicer
import vtk
from slicer.i18n import tr as _

from .despeckle import BACKENDS
from .installer import torchReady
from .panel import Panel

INPUT_EVENTS = (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent)


class LivePanel(Panel):
    """Modified events of the input only set a flag (coalesced); a QTimer on the main thread
    snapshots the input and writes the newest result (Speckle2SelfLib.scene.live.LiveVolumeDespeckler),
    while inference runs in its worker thread. MRML is only touched here, on the main thread."""

    INTERVAL_MS = 20                  # capture the newest input, show the newest result

    def setup(self) -> None:
        self.live = None
        self._inputNode = None
        self._inputChanged = False
        self._timer = qt.QTimer()
        self._timer.setInterval(self.INTERVAL_MS)
        self._timer.connect("timeout()", self.onTick)
        self.ui.liveCheckBox.connect("toggled(bool)", self.onToggled)

    @property
    def running(self) -> bool:
        return self.live is not None

    def onToggled(self, checked: bool) -> None:
        if checked:
            self.start()
        else:
            self.stop()

    def start(self) -> None:
        p = self.parameterNode
        if self.host.despeckle.running or not p or not p.inputVolume:
            self._setChecked(False)
            self.ui.liveStatusLabel.text = _("Wait for Apply to finish (or cancel it).") if self.host.despeckle.running \
                else _("Select an input volume to despeckle live.")
            return
        if not torchReady():
            self._setChecked(False)
            self.ui.liveStatusLabel.text = _("PyTorch is needed to despeckle; it was not installed.")
            return
        try:
            with slicer.util.WaitCursor():
                self.live = self.logic.start_live(p.inputVolume, p.outputVolume, model=p.model or None,
                                                  device=p.device.lower(), backend=BACKENDS[p.backend])
        except Exception as err:  # shown to the user; nothing was changed
            logging.error(traceback.format_exc())
            self._setChecked(False)
            self.ui.liveStatusLabel.text = _("Live failed: {error}").format(error=err)
            return
        self._inputNode = p.inputVolume
        for event in INPUT_EVENTS:
            self.host.addObserver(self._inputNode, event, self.onInputModified)
        self._lockInputs(True)
        self._inputChanged = True
        self._timer.start()
        self.ui.liveStatusLabel.text = _("Live: waiting for frames of '{name}'...").format(
            name=self._inputNode.GetName())

    def onInputModified(self, caller, event) -> None:
        self._inputChanged = True         # coalesced: the timer takes at most one snapshot per tick

    def onTick(self) -> None:
        live = self.live
        if live is None:
            return
        if self._inputNode is None or self._inputNode.GetScene() is None:
            self.stop()
            return
        try:
            if self._inputChanged:
                self._inputChanged = False
                live.capture()
            updated = live.apply()
        except Exception as err:  # e.g. a frame the model cannot take: stop and say why
            logging.error(traceback.format_exc())
            self.stop()
            self.ui.liveStatusLabel.text = _("Live stopped: {error}").format(error=err)
            return
        if updated:
            self.showUpdate(live)

    def showUpdate(self, live) -> None:
        if live.updates == 1:
            if self.parameterNode:
                self.parameterNode.outputVolume = live.output_node
            slicer.util.setSliceViewerLayers(background=live.output_node)
        stats = live.stats
        self.ui.liveStatusLabel.text = _(
            "Live: {done} frames despeckled, {dropped} skipped; {ms:.0f} ms per frame").format(
            done=stats.processed, dropped=stats.dropped, ms=stats.latency_ms_median or 0.0)

    def stop(self) -> None:
        live, self.live = self.live, None
        self._timer.stop()
        if self._inputNode is not None:
            for event in INPUT_EVENTS:
                self.host.removeObserver(self._inputNode, event, self.onInputModified)
            self._inputNode = None
        self._setChecked(False)
        if not self.host.despeckle.running:
            self._lockInputs(False)
        if live is not None:
            live.stop(timeout=5.0)        # waits for the frame in work (a fraction of a second)
            stats = live.stats
            self.ui.liveStatusLabel.text = _("Live stopped: {done} frames despeckled, {dropped} skipped.").format(
                done=stats.processed, dropped=stats.dropped)

    def _lockInputs(self, locked: bool) -> None:
        for widget in (self.ui.inputSelector, self.ui.modelComboBox, self.ui.deviceComboBox, self.ui.backendComboBox):
            widget.enabled = not locked

    def _setChecked(self, checked: bool) -> None:
        wasBlocked = self.ui.liveCheckBox.blockSignals(True)
        self.ui.liveCheckBox.checked = checked
        self.ui.liveCheckBox.blockSignals(wasBlocked)
