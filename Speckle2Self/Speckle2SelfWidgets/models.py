"""The Model list: bundled models, the user's adapted models and model files, with a line about the chosen one."""

import os

import qt
import slicer
from slicer.i18n import tr as _

from .panel import Panel

LOAD_MODEL_ITEM = "__load_model_file__"


class ModelChooser(Panel):
    """``ui.modelComboBox``: item data is a bundled model's name or a model file's path; the
    parameter node's ``model`` ("" for the default) is what Apply, Live and Adapt use."""

    def setup(self) -> None:
        self._updating = False
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.populate()

    def populate(self) -> None:
        """Bundled models (checksum-verified when loaded), user models, then 'Load model file...'."""
        combo = self.ui.modelComboBox
        self._updating = True
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
            self._updating = False

    def models(self) -> list:
        """(label, model) of every model in the list (not 'Load model file...')."""
        combo = self.ui.modelComboBox
        return [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count)
                if combo.itemData(i) != LOAD_MODEL_ITEM]

    def current(self) -> str:
        data = self.ui.modelComboBox.currentData
        return "" if data in (None, LOAD_MODEL_ITEM) else str(data)

    def select(self, model: str) -> None:
        """Show ``model`` in the list (a model file not listed yet is added); when it is gone,
        the list's choice is written back, so that Apply uses what the list shows."""
        combo = self.ui.modelComboBox
        self._updating = True
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
            self._updating = False
        if model and index < 0 and self.parameterNode:
            # e.g. a scene saved with a model file that is gone: Apply must use what the list shows
            self.ui.statusLabel.text = _("Model {model} was not found; using {shown}.").format(
                model=model, shown=combo.currentText)
            self.parameterNode.model = self.current()
        self.showInfo()

    def onModelChanged(self, index: int) -> None:
        if self._updating or not self.parameterNode:
            return
        if self.ui.modelComboBox.itemData(index) == LOAD_MODEL_ITEM:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Load Speckle2Self model"), "",
                _("TorchScript models (*.pt *.pth *.ts *.zip);;All files (*)"))
            if not path:
                self.select(self.parameterNode.model)
                return
            self.parameterNode.model = path
            self.select(path)     # also when it was the model already (no Modified event)
        else:
            self.parameterNode.model = self.current()
        self.showInfo(followRecommendation=True)
        self.host.adapt.updateButtons()

    def showInfo(self, followRecommendation: bool = False) -> None:
        """Name, width, training steps and data of the selected model (read without torch)."""
        model = self.current() or None
        try:
            description = self.logic.describe_model(model)
            guided = self.logic.recommends_guided_smoothing(model)
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.ui.modelInfoLabel.text = f"<span style='color:#c00'>{err}</span>"
            return
        self.ui.modelInfoLabel.text = description or _("No bundled model in this installation: load a model file.")
        if followRecommendation and description:
            # a newly chosen model starts with the output it recommends (what the CLI's
            # --refine auto gives); the user may still change the checkbox
            self.parameterNode.guidedSmoothing = guided
