"""A small stand-in for what Slicer's application gives a scripted module, over a real Qt (PySide6).

slicer-core (PyPI) brings real MRML nodes and ``slicer.util`` but no Qt: no PythonQt ``qt``
module, no CTK or MRML widgets, no ``slicer.app``, ``slicer.modules``, ScriptedLoadableModule or
parameter node wrapper. This module provides just what Speckle2Self.py and its panels use, so
that the GUI code runs in tests under a real QApplication (offscreen):

* ``qt``: PySide6's classes; widgets are handed to the module's code wrapped PythonQt-style
  (:class:`PythonQtObject`: Qt properties as attributes, ``connect("signal(args)", slot)``);
* ``ctkCollapsibleButton``, ``ctkSliderWidget``, ``qMRMLNodeComboBox``, ``qMRMLCheckableNodeComboBox``,
  ``qSlicerMarkupsPlaceWidget``, ``qMRMLTableView``: small PySide6 widgets with the API the module uses,
  listing real MRML nodes of the scene;
* ``slicer.util.loadUI`` / ``childWidgetVariables`` (QUiLoader), ``slicer.app``, ``slicer.modules``,
  ``slicer.i18n``, ``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper``
  (typed fields stored in the real vtkMRMLScriptedModuleNode, ``connectGui`` for the .ui's
  ``SlicerParameterName`` widgets).

It is a test double of Slicer's application, never of MRML: the nodes are slicer-core's.
"""

from __future__ import annotations

import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets
from PySide6.QtCore import Property, Signal

import slicer
import slicer.util


# ----------------------------------------------------------------------------- PythonQt-style access

def unwrap(value):
    return value._qobject if isinstance(value, PythonQtObject) else value


def wrap(value):
    return PythonQtObject(value) if isinstance(value, QtCore.QObject) and not isinstance(value, PythonQtObject) \
        else value


class PythonQtObject:
    """A QObject as PythonQt shows it: ``widget.enabled = False`` sets the Qt property,
    ``widget.text`` reads it, ``widget.connect("clicked(bool)", slot)`` connects a signal;
    anything else is the object's own method (arguments unwrapped, QObjects returned wrapped)."""

    def __init__(self, qobject):
        object.__setattr__(self, "_qobject", qobject)

    def _property(self, name):
        meta = self._qobject.metaObject()
        index = meta.indexOfProperty(name)
        return meta.property(index) if index >= 0 else None

    def __getattr__(self, name):
        prop = self._property(name)
        if prop is not None:
            return wrap(prop.read(self._qobject))
        attribute = getattr(self._qobject, name)
        if not callable(attribute) or isinstance(attribute, (QtCore.SignalInstance,)):
            return wrap(attribute)

        def call(*args, **kwargs):
            return wrap(attribute(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))
        return call

    def __setattr__(self, name, value):
        prop = self._property(name)
        if prop is not None and prop.isWritable():
            if not prop.write(self._qobject, unwrap(value)):
                raise AttributeError(f"cannot set {name} of {type(self._qobject).__name__} to {value!r}")
        else:
            setattr(self._qobject, name, value)

    def connect(self, signature: str, slot):
        getattr(self._qobject, signature.split("(")[0]).connect(slot)

    def disconnect(self, signature: str, slot):
        getattr(self._qobject, signature.split("(")[0]).disconnect(slot)

    def __eq__(self, other):
        return unwrap(other) is self._qobject

    def __hash__(self):
        return hash(id(self._qobject))


class QTimer(QtCore.QTimer):
    """PythonQt's QTimer: connected with a signal signature string."""

    def connect(self, signature: str, slot):
        getattr(self, signature.split("(")[0]).connect(slot)


class QFileDialog(QtWidgets.QFileDialog):
    """PythonQt returns the chosen path alone; the tests set :attr:`answer` instead of clicking."""

    answer = ""

    @staticmethod
    def getOpenFileName(*args, **kwargs):
        return QFileDialog.answer


def make_qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):     # dir(): PySide6 loads its classes on first use
        qt.__dict__.update({k: getattr(source, k) for k in dir(source) if k.startswith("Q") or k == "Qt"})
    qt.QTimer = QTimer
    qt.QFileDialog = QFileDialog
    qt.QUiLoader = QtUiTools.QUiLoader
    return qt


# ----------------------------------------------------------------------------- CTK and MRML widgets

class qMRMLWidget(QtWidgets.QWidget):
    """The .ui's top level: its setMRMLScene reaches every MRML widget (what the .ui's
    mrmlSceneChanged -> setMRMLScene connections do in Slicer)."""

    def setMRMLScene(self, scene):
        for child in self.findChildren(QtWidgets.QWidget):
            if child is not self and hasattr(child, "setMRMLScene"):
                child.setMRMLScene(scene)


class ctkCollapsibleButton(QtWidgets.QWidget):
    contentsCollapsed = Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _get_collapsed(self):
        return self._collapsed

    def _set_collapsed(self, value):
        if bool(value) != self._collapsed:
            self._collapsed = bool(value)
            self.contentsCollapsed.emit(self._collapsed)

    collapsed = Property(bool, _get_collapsed, _set_collapsed)
    text = Property(str, lambda self: self.property("_text") or "", lambda self, v: self.setProperty("_text", v))


class ctkSliderWidget(QtWidgets.QDoubleSpinBox):
    """A double spin box stands in for the slider and spin box pair."""


class qMRMLNodeComboBox(QtWidgets.QComboBox):
    """Lists the scene's nodes of ``nodeTypes`` (with "None" first), kept up to date as nodes
    are added and removed."""

    currentNodeChanged = Signal(object)
    nodeAdded = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observers = []
        self._types = []
        self.currentIndexChanged.connect(lambda _index: self.currentNodeChanged.emit(self.currentNode()))

    def _get_types(self):
        return list(self._types)

    def _set_types(self, types_):
        self._types = list(types_)
        self._refresh()

    nodeTypes = Property("QStringList", _get_types, _set_types)

    def setMRMLScene(self, scene):
        for tag in self._observers:
            self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observers = [scene.AddObserver(event, lambda *_: self._refresh())
                           for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent)]
        self._refresh()

    def nodes(self):
        if self._scene is None:
            return []
        found = []
        for class_name in self._types:
            for k in range(self._scene.GetNumberOfNodesByClass(class_name)):
                node = self._scene.GetNthNodeByClass(k, class_name)
                if node not in found and not node.GetHideFromEditors():
                    found.append(node)
        return found

    def _refresh(self):
        current = self.currentNode() if self.count() else None
        blocked = self.blockSignals(True)
        self.clear()
        self.addItem("None", None)
        for node in self.nodes():
            self.addItem(node.GetName(), node.GetID())
        index = self.findData(current.GetID()) if current is not None else 0
        self.setCurrentIndex(max(index, 0))
        self.blockSignals(blocked)
        if (self.currentNode() is None) != (current is None):
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self):
        node_id = self.currentData()
        return self._scene.GetNodeByID(node_id) if node_id and self._scene is not None else None

    def setCurrentNode(self, node):
        self.setCurrentIndex(max(self.findData(node.GetID()) if node is not None else 0, 0))


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    checkedNodesChanged = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self._checked = []

    def _refresh(self):
        super()._refresh()
        present = set(n.GetID() for n in self.nodes())
        self._checked = [i for i in self._checked if i in present]

    def checkedNodes(self):
        return [self._scene.GetNodeByID(i) for i in self._checked]

    def checkState(self, node):
        return QtCore.Qt.Checked if node.GetID() in self._checked else QtCore.Qt.Unchecked

    def setCheckState(self, node, state):
        checked = state == QtCore.Qt.Checked
        if checked == (node.GetID() in self._checked):
            return
        if checked:
            self._checked.append(node.GetID())
        else:
            self._checked.remove(node.GetID())
        self.checkedNodesChanged.emit()


class qSlicerMarkupsPlaceWidget(QtWidgets.QWidget):
    ForcePlaceSingleMarkup = 2

    def setMRMLScene(self, scene):
        self.scene = scene

    def setCurrentNode(self, node):
        self.current_node = node


class qMRMLTableView(QtWidgets.QTableView):
    """Shows a vtkMRMLTableNode's cells in a QStandardItemModel (column names as a first row,
    as Slicer's table view shows them)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._model = QtGui.QStandardItemModel(self)
        self.setModel(self._model)

    def setMRMLScene(self, scene):
        self.scene = scene

    def tableModel(self):
        return self._model

    def setMRMLTableNode(self, node):
        table = node.GetTable()
        self._model.clear()
        self._model.appendRow([QtGui.QStandardItem(table.GetColumnName(c)) for c in range(table.GetNumberOfColumns())])
        for r in range(table.GetNumberOfRows()):
            self._model.appendRow([QtGui.QStandardItem(table.GetValue(r, c).ToString())
                                   for c in range(table.GetNumberOfColumns())])


CUSTOM_WIDGETS = (qMRMLWidget, ctkCollapsibleButton, ctkSliderWidget, qMRMLNodeComboBox, qMRMLCheckableNodeComboBox,
                  qSlicerMarkupsPlaceWidget, qMRMLTableView)


def loadUI(path):
    """The .ui built by QUiLoader with the widgets above; its <connections> (scene propagation)
    are what qMRMLWidget.setMRMLScene does, so they are left out."""
    tree = ET.parse(path)
    root = tree.getroot()
    for connections in root.findall("connections"):
        root.remove(connections)
    for prop in root.iter("property"):     # the .ui gives the slider's settings that a spin box lacks
        if prop.get("name") in ("pageStep", "tracking"):
            prop.set("name", "_" + prop.get("name"))
    loader = QtUiTools.QUiLoader()
    for widget_class in CUSTOM_WIDGETS:
        loader.registerCustomWidget(widget_class)
    data = QtCore.QByteArray(ET.tostring(root))
    buffer = QtCore.QBuffer(data)
    buffer.open(QtCore.QIODevice.ReadOnly)
    widget = loader.load(buffer)
    assert widget is not None, loader.errorString()
    return PythonQtObject(widget)


def childWidgetVariables(widget):
    """Every named child widget, PythonQt-wrapped, as attributes."""
    namespace = types.SimpleNamespace()
    for child in unwrap(widget).findChildren(QtCore.QObject):
        if child.objectName() and not child.objectName().startswith("qt_"):
            setattr(namespace, child.objectName(), PythonQtObject(child))
    return namespace


# ----------------------------------------------------------------------------- parameter node wrapper

class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class Field:
    """One typed field of a parameter node: its string form in the node, or node references."""

    def __init__(self, name, hint, default):
        self.name = name
        self.validators = []
        if typing.get_origin(hint) is typing.Annotated:
            hint, *self.validators = typing.get_args(hint)
        self.is_list = typing.get_origin(hint) is list
        self.type = typing.get_args(hint)[0] if self.is_list else hint
        self.is_node = isinstance(self.type, type) and issubclass(self.type, slicer.vtkMRMLNode)
        self.default = [] if self.is_list else default

    def read(self, node):
        if self.is_node:
            ids = [node.GetNthNodeReferenceID(self.name, k) for k in range(node.GetNumberOfNodeReferences(self.name))]
            nodes = [node.GetScene().GetNodeByID(i) for i in ids if i]
            return nodes if self.is_list else (nodes[0] if nodes else None)
        if not node.GetParameterNames() or self.name not in node.GetParameterNames():
            return self.default
        text = node.GetParameter(self.name)
        return text == "True" if self.type is bool else self.type(text)

    def write(self, node, value):
        self.check(value)
        if self.is_node:
            node.RemoveNodeReferenceIDs(self.name)
            for item in (value if self.is_list else [value]):
                if item is not None:
                    node.AddNodeReferenceID(self.name, item.GetID())
            node.Modified()
        else:
            node.SetParameter(self.name, str(self.type(value)))

    def check(self, value):
        for validator in self.validators:
            if isinstance(validator, Choice) and value not in validator.choices:
                raise ValueError(f"{self.name}: {value!r} is not one of {validator.choices}")
            if isinstance(validator, WithinRange) and not validator.minimum <= value <= validator.maximum:
                raise ValueError(f"{self.name}: {value!r} is outside [{validator.minimum}, {validator.maximum}]")


def parameterNodeWrapper(cls):
    hints = typing.get_type_hints(cls, include_extras=True, localns=vars(slicer))
    fields = {name: Field(name, hint, cls.__dict__.get(name)) for name, hint in hints.items()}

    class Wrapped:
        _fields = fields

        def __init__(self, parameterNode):
            object.__setattr__(self, "parameterNode", parameterNode)
            present = set(parameterNode.GetParameterNames() or ())
            for field in fields.values():     # defaults are written once, as Slicer's wrapper does
                if not field.is_node and field.name not in present:
                    field.write(parameterNode, field.default)

        def __getattr__(self, name):
            if name in fields:
                return fields[name].read(self.parameterNode)
            if name in ("AddObserver", "RemoveObserver", "HasObserver"):   # observed like the node it wraps
                return getattr(self.parameterNode, name)
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no field {name}")
            fields[name].write(self.parameterNode, value)

        def __bool__(self):
            return True

        def connectGui(self, ui):
            return GuiConnection(self, ui)

        def disconnectGui(self, tag):
            if tag is not None:
                tag.disconnect()

    Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
    return Wrapped


class GuiConnection:
    """Two-way binding of the .ui widgets that name a field in their SlicerParameterName."""

    def __init__(self, wrapper, ui):
        self.wrapper = wrapper
        self.bound = []
        for proxy in vars(ui).values():
            widget = unwrap(proxy)
            name = widget.property("SlicerParameterName")
            if name:
                self.bound.append((widget, wrapper._fields[name]))
        for widget, field in self.bound:
            if isinstance(widget, QtWidgets.QComboBox) and not isinstance(widget, qMRMLNodeComboBox):
                choices = next(v.choices for v in field.validators if isinstance(v, Choice))
                widget.clear()
                widget.addItems([str(c) for c in choices])
            for validator in field.validators:
                if isinstance(validator, WithinRange) and hasattr(widget, "setRange"):
                    widget.setRange(validator.minimum, validator.maximum)
            self._signal(widget).connect(self._widgetChanged)
        self.tag = wrapper.parameterNode.AddObserver("ModifiedEvent", lambda *_: self.updateWidgets())
        self.updateWidgets()

    @staticmethod
    def _signal(widget):
        if isinstance(widget, qMRMLNodeComboBox):
            return widget.currentNodeChanged
        if isinstance(widget, QtWidgets.QCheckBox):
            return widget.toggled
        if isinstance(widget, QtWidgets.QComboBox):
            return widget.currentTextChanged
        return widget.valueChanged

    @staticmethod
    def _value(widget):
        if isinstance(widget, qMRMLNodeComboBox):
            return widget.currentNode()
        if isinstance(widget, QtWidgets.QCheckBox):
            return widget.isChecked()
        if isinstance(widget, QtWidgets.QComboBox):
            return widget.currentText()
        return widget.value()

    def _widgetChanged(self, *args):
        for widget, field in self.bound:
            value = self._value(widget)
            if value != field.read(self.wrapper.parameterNode):
                field.write(self.wrapper.parameterNode, value)

    def updateWidgets(self):
        for widget, field in self.bound:
            value = field.read(self.wrapper.parameterNode)
            blocked = widget.blockSignals(True)
            try:
                if isinstance(widget, qMRMLNodeComboBox):
                    widget.setCurrentNode(value)
                elif isinstance(widget, QtWidgets.QCheckBox):
                    widget.setChecked(bool(value))
                elif isinstance(widget, QtWidgets.QComboBox):
                    widget.setCurrentText(str(value))
                else:
                    widget.setValue(value)
            finally:
                widget.blockSignals(blocked)

    def disconnect(self):
        self.wrapper.parameterNode.RemoveObserver(self.tag)
        for widget, _field in self.bound:
            self._signal(widget).disconnect(self._widgetChanged)


# ----------------------------------------------------------------------------- module base classes and app

class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent if parent is not None else ModuleParent()
        self.moduleName = type(self).__name__[:-len("Widget")]
        self.layout = PythonQtObject(self.parent.layout())

    def setup(self):
        pass

    def resourcePath(self, filename):
        return str(MODULE_DIR / "Resources" / filename)

    def onReload(self):
        pass


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=0):
        print(message)


class ModuleParent(QtWidgets.QWidget):
    """The module panel a widget is set up in; ``isEntered`` as Slicer's module panel has it."""

    def __init__(self):
        super().__init__()
        self.setLayout(QtWidgets.QVBoxLayout())
        self.isEntered = True


class ShownCalls:
    """Records what the module asked the application to show (dialogs, views, chart)."""

    def __init__(self):
        self.errors, self.layers, self.charts, self.confirmations = [], [], [], []
        self.confirm_answer = True

    def errorDisplay(self, text, **kwargs):
        self.errors.append(text)

    def confirmOkCancelDisplay(self, text, *args, **kwargs):
        self.confirmations.append(text)
        return self.confirm_answer

    def setSliceViewerLayers(self, background="keep-current", **kwargs):
        self.layers.append(background)


MODULE_DIR = Path(__file__).resolve().parents[1] / "Speckle2Self"


def install(scene, tmp_path, monkeypatch) -> ShownCalls:
    """Make ``import qt``, ``slicer.app``, ``slicer.modules``, ``slicer.mrmlScene``, ... work for
    the module's code, on ``scene`` (slicer-core's); returns what the module showed."""
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")     # no display: Qt draws into memory
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    shown = ShownCalls()
    monkeypatch.setitem(sys.modules, "qt", make_qt_module())
    for name, attributes in {
        "slicer.i18n": {"tr": lambda text: text},
        "slicer.parameterNodeWrapper": {"parameterNodeWrapper": parameterNodeWrapper, "Choice": Choice,
                                        "WithinRange": WithinRange},
        "slicer.ScriptedLoadableModule": {"ScriptedLoadableModule": ScriptedLoadableModule,
                                          "ScriptedLoadableModuleWidget": ScriptedLoadableModuleWidget,
                                          "ScriptedLoadableModuleTest": ScriptedLoadableModuleTest},
    }.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.setattr(slicer, name.split(".")[1], module, raising=False)
    plots = types.SimpleNamespace(ShowChartInLayout=shown.charts.append)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        sequences=types.SimpleNamespace(logic=lambda: scene.sequences_logic),
        plots=types.SimpleNamespace(logic=lambda: plots)), raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(
        processEvents=app.processEvents, temporaryPath=str(tmp_path), testingEnabled=lambda: True,
        slicerUserSettingsFilePath=str(tmp_path / "settings" / "Slicer.ini"), applicationName="Slicer",
        setOverrideCursor=lambda *a: None, restoreOverrideCursor=lambda *a: None), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "qSlicerMarkupsPlaceWidget", qSlicerMarkupsPlaceWidget, raising=False)
    for name, value in {"loadUI": loadUI, "childWidgetVariables": childWidgetVariables,
                        "errorDisplay": shown.errorDisplay, "confirmOkCancelDisplay": shown.confirmOkCancelDisplay,
                        "setSliceViewerLayers": shown.setSliceViewerLayers,
                        "mainWindow": lambda: None}.items():
        monkeypatch.setattr(slicer.util, name, value)
    for prefix in ("Speckle2Self", "Speckle2SelfWidgets"):   # imported afresh over this shim
        for module_name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
            monkeypatch.delitem(sys.modules, module_name)
    return shown


def process_events_until(condition, timeout: float = 60.0) -> bool:
    """Run the Qt event loop (the job pollers' timers) until ``condition()`` or the timeout."""
    import time

    app = QtWidgets.QApplication.instance()
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        app.processEvents(QtCore.QEventLoop.AllEvents, 50)
        time.sleep(0.01)
    return True


