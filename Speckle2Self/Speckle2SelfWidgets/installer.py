"""PyTorch on first use: the module loads without torch and offers to install it when a panel needs it."""

import importlib
import importlib.util
import logging
import platform
import sys
import traceback

import slicer
from slicer.i18n import tr as _

TORCH_REQUIREMENT = ">=2.0"


def torchReady() -> bool:
    """ensurePythonDependencies inside error handling: a failed install (no network, pip
    error) is shown to the user and reported as 'not installed', never raised into Qt."""
    try:
        return ensurePythonDependencies()
    except Exception as err:
        logging.error(traceback.format_exc())
        slicer.util.errorDisplay(_("Installing PyTorch failed:\n{error}").format(error=err),
                                 detailedText=traceback.format_exc())
        return False


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


def torchDownloadNote() -> str:
    """What pip's default torch wheel is on this platform: PyPI's Linux wheels bundle CUDA."""
    if sys.platform.startswith("linux"):
        return _("from PyPI; on Linux this build includes the CUDA libraries, a download of several GB")
    return _("CPU build from PyPI, a download of a few hundred MB")


#: The fastest CPU path for the network (Speckle2SelfLib.engine.backends: "auto" takes it where it is
#: installed and agrees with the model); wheels exist for these machines.
FAST_BACKEND_REQUIREMENT = "openvino>=2024.0"
FAST_BACKEND_MACHINES = ("x86_64", "amd64", "arm64", "aarch64")
OFFERED_SETTING = "Speckle2Self/OfferedOpenVINO"
_offered = False      # asked since Slicer started (also where its settings cannot be written)


def offerFastBackend(backend: str, device: str) -> bool:
    """With backend Auto on a CPU, offer once to install OpenVINO beside torch (2-3x PyTorch's CPU
    speed, the same picture within 2 grey levels). The answer is kept: asked once per user where
    Slicer's settings can be written, else once each time Slicer starts. True when it is installed now."""
    global _offered
    from Speckle2SelfLib.scene.logic import runtime_installed

    if backend != "auto" or runtime_installed("openvino") or not _cpuWillRun(device):
        return runtime_installed("openvino")
    if platform.machine().lower() not in FAST_BACKEND_MACHINES or _offered or _settingValue(OFFERED_SETTING):
        return False
    _offered = True
    _setSetting(OFFERED_SETTING, "1")
    message = _(
        "Despeckling runs on the CPU here. OpenVINO makes it 2-3x faster with the same picture (within 2 "
        "grey levels). Install it with pip now?\n\n    {requirement}  (about 50 MB)\n\nYou will not be "
        "asked again; later: slicer.util.pip_install('openvino').").format(requirement=FAST_BACKEND_REQUIREMENT)
    if not slicer.util.confirmOkCancelDisplay(message, _("Faster despeckling on the CPU")):
        return False
    try:
        with slicer.util.WaitCursor():
            slicer.util.pip_install(FAST_BACKEND_REQUIREMENT)
    except Exception as err:  # the despeckling goes on without it
        logging.warning(f"Speckle2Self: OpenVINO was not installed ({err}); PyTorch runs the network")
        return False
    importlib.invalidate_caches()
    return runtime_installed("openvino")


def _cpuWillRun(device: str) -> bool:
    if device == "cpu":
        return True
    if device.startswith("cuda"):
        return False
    import torch

    return not torch.cuda.is_available() and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _settingValue(key: str):
    settings = getattr(slicer.app, "userSettings", None)
    try:
        return settings().value(key) if settings else None
    except Exception:
        return None


def _setSetting(key: str, value: str) -> None:
    settings = getattr(slicer.app, "userSettings", None)
    try:
        if settings:
            settings().setValue(key, value)
    except Exception as err:  # asked again when Slicer starts next, nothing worse
        logging.info(f"Speckle2Self: setting {key} not saved ({err})")
