"""The Segment lumen panel: one seed point -> lumen segmentation, measurement table and diameter chart."""

import logging

import qt
import slicer
from slicer.i18n import tr as _

from Speckle2SelfLib.scene.despeckle import is_map_of
from Speckle2SelfLib.scene.lumen import add_boundary_uncertainty
from Speckle2SelfLib.scene.nodes import find_sequence

from .jobpoller import JobPoller
from .panel import Panel, showError


class LumenPanel(Panel):
    """Segment reads the frames on the main thread and segments them in a worker thread
    (Speckle2SelfLib.scene.lumen.SegmentJob) that a JobPoller polls; the button cancels while it
    runs, and all outputs are written into the scene at the end (none when cancelled or failed)."""

    POLL_MS = 100                     # progress, and the result written on the main thread

    def setup(self) -> None:
        self.poller = None
        self.ui.lumenProgressBar.hide()
        self.ui.seedPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.lumenTableView.setMRMLScene(slicer.mrmlScene)
        self.ui.lumenVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.host.updateInputDependentWidgets)
        self.ui.seedSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.seedPlaceWidget.setCurrentNode)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.openSegmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)

    @property
    def running(self) -> bool:
        return self.poller is not None

    def updateInputDependentWidgets(self) -> None:
        """'all frames' decides between the seed's frame and all of them, for a sequence and
        for a multi-slice volume."""
        node = self.ui.lumenVolumeSelector.currentNode()
        slices = node.GetImageData().GetDimensions()[2] if node and node.GetImageData() else 1
        self.ui.lumenAllFramesCheckBox.visible = bool(node and (find_sequence(node) or slices > 1))

    def updateFromParameterNode(self) -> None:
        if self.running:
            return                        # Segment is Cancel while it runs
        p = self.parameterNode
        canSegment = bool(p and p.lumenVolume and p.seedPoints)
        self.ui.segmentButton.enabled = canSegment
        self.ui.segmentButton.toolTip = _("Segment the lumen around the seed") if canSegment else \
            _("Select an image and a seed point list (place a point inside the lumen)")
        self.ui.openSegmentEditorButton.enabled = bool(p and p.lumenSegmentation)
        self.ui.toleranceSliderWidget.enabled = bool(p and p.lumenMethod != "radial")   # radial needs none

    def onSegmentButton(self) -> None:
        if self.running:
            self.poller.cancel()          # the worker stops after the current frame
            self.ui.segmentButton.enabled = False
            self.ui.lumenStatusLabel.text = _("Cancelling after the current frame...")
            return
        p = self.parameterNode
        try:
            job = self.logic.start_segmentation(
                p.lumenVolume, p.seedPoints, method=p.lumenMethod, tolerance=p.tolerance,
                all_frames=p.lumenAllFrames, segmentation_node=p.lumenSegmentation, table_node=p.lumenTable)
        except Exception as err:  # bad input or seed: shown with the details; nothing was started
            self.showFailure(_("Lumen segmentation failed:\n{error}"), err)
            return
        self.poller = JobPoller(job, self.POLL_MS, self.onProgress, self.onEnd)
        self.setSegmenting(True)

    def onProgress(self, state) -> None:
        self.ui.lumenProgressBar.maximum = max(state.total, 1)
        self.ui.lumenProgressBar.value = state.done
        self.ui.lumenStatusLabel.text = _("Segmenting... {done}/{total} frame(s)").format(
            done=state.done, total=state.total)

    def onEnd(self, state) -> None:
        """The job has ended; a finished job has written all its outputs into the scene."""
        self.poller = None
        self.setSegmenting(False)
        if state.cancelled:
            self.ui.lumenStatusLabel.text = _("Cancelled; nothing was added to the scene.")
        elif state.error is not None:
            self.showFailure(_("Lumen segmentation failed:\n{error}"), state.error)
        else:
            try:
                self.showResult(state.result)
            except Exception as err:  # the nodes are in the scene; showing them failed: say why
                self.showFailure(_("Showing the lumen segmentation failed:\n{error}"), err)

    def addBoundaryUncertainty(self, result) -> None:
        """Where the segmented volume has an uncertainty map (Despeckle's 'Uncertainty map'), the
        table gets each frame's share of the contour whose position is uncertain (for a sequence's
        frames: from the map sequence that the remembered map's proxy shows)."""
        p = self.parameterNode
        uncertainty = p.uncertaintyVolume
        if not is_map_of(uncertainty, p.lumenVolume):
            return
        try:
            add_boundary_uncertainty(result, uncertainty, p.lumenVolume)
        except ValueError as err:      # e.g. the sequence changed since: the table stays as it is
            logging.info(f"Speckle2Self: no boundary uncertainty column ({err})")

    def showFailure(self, message: str, err) -> None:
        self.ui.lumenStatusLabel.text = _("Failed: {error}").format(error=err)
        showError(message.format(error=err), err)

    def setSegmenting(self, running: bool) -> None:
        """While segmenting, Segment becomes Cancel and the lumen inputs are locked."""
        ui = self.ui
        self.showBusy(running, (ui.lumenVolumeSelector, ui.seedSelector, ui.seedPlaceWidget, ui.lumenMethodComboBox,
                                ui.toleranceSliderWidget, ui.lumenAllFramesCheckBox, ui.openSegmentEditorButton),
                      ui.segmentButton, _("Cancel"), _("Segment"), ui.lumenProgressBar)
        if running:
            self.ui.lumenStatusLabel.setStyleSheet("")
            self.ui.lumenStatusLabel.text = _("Segmenting...")
        self.host.updateButtons()         # also Apply: unavailable while segmenting

    def stop(self) -> None:
        if self.poller is not None:
            self.poller.stop()
            self.poller = None
            self.setSegmenting(False)

    def showResult(self, result) -> None:
        """Select the outputs, show the chart and the table (flagged frames in red) and say so."""
        p = self.parameterNode
        p.lumenSegmentation = result.segmentation_node
        p.lumenTable = result.table_node
        self.addBoundaryUncertainty(result)
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
        self.host.updateButtons()

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
        p = self.parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.lumenSegmentation)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode
        setSource(p.lumenVolume)
