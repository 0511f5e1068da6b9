"""What every panel shares: the module widget it lives in (its ui, logic and parameter node)."""

import logging
import traceback

import slicer


class Panel:
    """One section of the module's .ui. ``host`` is the module widget: ``host.ui`` (the .ui's
    widgets), ``host.logic`` (Speckle2SelfLogic) and ``host.parameterNode`` (the wrapped
    parameter node, None while the scene closes); the other panels are ``host.despeckle``,
    ``host.live``, ``host.lumen``, ``host.adapt`` and ``host.models``."""

    def __init__(self, host):
        self.host = host

    @property
    def ui(self):
        return self.host.ui

    @property
    def logic(self):
        return self.host.logic

    @property
    def parameterNode(self):
        return self.host.parameterNode

    def updateFromParameterNode(self) -> None:
        """Enable and label the panel's widgets after a change of the parameter node."""

    def stop(self) -> None:
        """End what the panel runs (the scene closes or the module is reloaded)."""

    @staticmethod
    def showBusy(running: bool, locked, button, busyText: str, idleText: str, progressBar) -> None:
        """While a job runs its inputs are locked, its button turns into the way to stop it (and
        stays clickable) and the progress bar shows; all back when it has ended."""
        for widget in locked:
            widget.enabled = not running
        button.text = busyText if running else idleText
        button.enabled = True
        progressBar.visible = running
        progressBar.value = 0


def showError(message: str, err) -> None:
    """A dialog with the message and the traceback as details; the traceback goes to the log too."""
    details = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    logging.error(details)
    slicer.util.errorDisplay(message, detailedText=details)
