"""Speckle2Self: self-supervised ultrasound despeckling in 3D Slicer (the module's GUI).

All computation lives in Speckle2SelfLib (numpy/torch/MRML, testable without Qt): the logic is
Speckle2SelfLib.scene.logic.Speckle2SelfLogic. This file holds the module description, the
parameter node and the widget that builds the panels (Speckle2SelfWidgets: one file per panel)
and connects them to the parameter node. torch is imported lazily, so the module loads without
it and offers to install it (through the PyTorch extension when present) on first use.
"""

import logging
import os
import sys
from typing import Annotated, Optional

import vtk

import slicer
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode,
                    vtkMRMLTableNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from Speckle2SelfLib.scene.logic import Speckle2SelfLogic
from Speckle2SelfWidgets.adapt import AdaptPanel
from Speckle2SelfWidgets.despeckle import BACKENDS, SLICE_AXES, DespecklePanel
from Speckle2SelfWidgets.live import LivePanel
from Speckle2SelfWidgets.lumen import LumenPanel
from Speckle2SelfWidgets.models import ModelChooser
from Speckle2SelfWidgets.selftest import Speckle2SelfTest  # noqa: F401 (Slicer looks for <Module>Test here)

HOMEPAGE = "https://github.com/speckle2self/SlicerSpeckle2Self"
DEVICES = ["Auto", "CPU", "CUDA"]
ADAPT_CROPS = ["64", "96", "128", "192", "256"]


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
        setUpUserModelsDirectory()     # for the GUI and the Python console alike


@parameterNodeWrapper
class Speckle2SelfParameterNode:
    """What the user chose, in every panel; saved with the scene and restored when it is loaded.

    model: "" for the default bundled model, a bundled model's name, or a model file path.
    sliceAxis: the plane of a 3D volume the network runs in (the label of a volume_axes choice).
    batchSize: 0 means automatic. inputGreyLevels: the output keeps each input frame's brightness
    and contrast (off: the network's own grey levels). guidedSmoothing: the network's output steers
    an edge-keeping smoothing of the input (off: the network's output itself). uncertainty: also a
    map of where not to trust the output (uncertaintyVolume; for a sequence, the proxy of the map
    sequence). lumen*: the 'Segment lumen' panel. adapt*: the 'Adapt model' panel (minutes, steps:
    0 is no limit).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    allFrames: bool = True
    sliceAxis: Annotated[str, Choice(list(SLICE_AXES))] = next(iter(SLICE_AXES))    # engine.volume_axes
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
    uncertainty: bool = False
    uncertaintyVolume: vtkMRMLScalarVolumeNode
    lumenVolume: vtkMRMLScalarVolumeNode
    seedPoints: vtkMRMLMarkupsFiducialNode
    lumenMethod: Annotated[str, Choice(["radial", "flood", "growcut"])] = "radial"   # segmentation.METHODS
    tolerance: Annotated[float, WithinRange(1.0, 100.0)] = 2.0   # segmentation.DESPECKLED_TOLERANCE
    lumenAllFrames: bool = True
    lumenSegmentation: vtkMRMLSegmentationNode
    lumenTable: vtkMRMLTableNode
    adaptInputs: list[vtkMRMLNode]
    adaptInit: str = ""
    adaptMinutes: Annotated[int, WithinRange(0, 1440)] = 10
    adaptSteps: Annotated[int, WithinRange(0, 1000000)] = 0
    adaptCrop: Annotated[str, Choice(ADAPT_CROPS)] = "128"          # pixels; a multiple of 16
    adaptDevice: Annotated[str, Choice(DEVICES)] = "Auto"


class Speckle2SelfWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Builds the Despeckle, Live, Segment-lumen and Adapt-model panels from the .ui, connects
    them to the parameter node and to the scene's events. Long work runs in background jobs
    that a JobPoller polls; Apply, Segment and Start turn into Cancel (Stop) while they run."""

    def __init__(self, parent=None, logic=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic            # injectable (tests); created in setup() otherwise
        self.parameterNode: Optional[Speckle2SelfParameterNode] = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/Speckle2Self.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        if self.logic is None:
            self.logic = Speckle2SelfLogic(sequences_logic=slicer.modules.sequences.logic())
        setUpUserModelsDirectory()     # again here: onReload drops the Lib's modules, and with them this setting

        self.models = ModelChooser(self)
        self.despeckle = DespecklePanel(self)
        self.live = LivePanel(self)
        self.lumen = LumenPanel(self)
        self.adapt = AdaptPanel(self)
        for panel in self.panels:
            panel.setup()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()

    @property
    def panels(self) -> list:
        return [self.models, self.despeckle, self.live, self.lumen, self.adapt]

    def cleanup(self) -> None:
        for panel in self.panels:     # a reloaded widget must not poll on
            panel.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self.parameterNode and not (self.despeckle.running or self.lumen.running):
            self.parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        for panel in (self.despeckle, self.live, self.lumen):   # their nodes would go with the scene
            panel.stop()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        """A loaded scene brings its own parameter node: show its choices."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload the Lib and the panels too, so that edits to them take effect without restarting
        Slicer: their modules are dropped and imported afresh when the module file reloads."""
        for name in [n for n in sys.modules if n.split(".")[0] in ("Speckle2SelfLib", "Speckle2SelfWidgets")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(Speckle2SelfParameterNode(self.logic.parameter_node(slicer.mrmlScene)))
        if not self.parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self.parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[Speckle2SelfParameterNode]) -> None:
        if self.parameterNode:
            self.parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.parameterNode = inputParameterNode
        if self.parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are connected here.
            self._parameterNodeGuiTag = self.parameterNode.connectGui(self.ui)
            self.addObserver(self.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if not self.parameterNode:
            return
        self.models.select(self.parameterNode.model)
        self.updateInputDependentWidgets()

    def updateInputDependentWidgets(self, *args) -> None:
        self.despeckle.updateInputDependentWidgets()
        self.lumen.updateInputDependentWidgets()
        self.updateButtons()

    def updateButtons(self) -> None:
        for panel in (self.despeckle, self.lumen, self.adapt):
            panel.updateFromParameterNode()


def setUpUserModelsDirectory() -> None:
    """Where "Adapt model" keeps its models: $SPECKLE2SELF_USER_MODELS, else Speckle2Self/models
    beside Slicer's settings file (the Lib's default, for the GUI and the console alike)."""
    try:
        settings = os.path.dirname(slicer.app.slicerUserSettingsFilePath)
        Speckle2SelfLogic.use_user_models_directory(os.path.join(settings, "Speckle2Self", "models"))
    except Exception as err:  # never keep the module from loading
        logging.warning(f"Speckle2Self: user models folder not set up ({err})")
