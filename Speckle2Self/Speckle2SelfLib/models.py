"""Models on disk: TorchScript files that carry their own JSON metadata.

A model file is a TorchScript archive of the inference net (full-resolution encoder +
decoder) with ``speckle2self.json`` in its extra files. Loading never unpickles user
files: TorchScript archives are read by ``torch.jit.load``; anything else is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import __version__

METADATA_FILE = "speckle2self.json"
FORMAT_NAME = "speckle2self-model"
FORMAT_VERSION = 1
MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
MANIFEST = MODELS_DIR / "models.json"
REQUIRED_KEYS = ("format", "format_version", "architecture", "width", "scales", "interpolation",
                 "normalisation", "weights_sha256")


@contextmanager
def _quiet_torchscript():
    """TorchScript is deprecated in favour of torch.export, but Slicer extensions and
    _extra_files metadata rely on it; the warning would only confuse users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.*")
        yield


class ModelFormatError(ValueError):
    """The file is not a Speckle2Self TorchScript model."""


@dataclass
class LoadedModel:
    module: Any                 # torch.jit.ScriptModule: (N,1,H,W) in [0,1] -> same
    metadata: Dict[str, Any]
    path: Path


def weights_sha256(module) -> str:
    """SHA-256 over the parameters and buffers, in name order (stable across save/load)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_model(net, path, *, scales, interpolation: str, name: str = "speckle2self",
                 training: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Script ``net.inference_module()`` and save it with metadata. Returns the metadata."""
    import torch

    inference = net.inference_module().cpu().eval()
    with _quiet_torchscript():
        scripted = torch.jit.script(inference)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "name": name,
        "architecture": "speckle2self-multiencoder-shareddecoder",
        "width": net.width,
        "num_scales": net.num_scales,
        "upsample": net.upsample,
        "shared_encoder": net.shared_encoder,
        "depth": net.depth,
        "scales": list(scales),
        "interpolation": interpolation,
        "normalisation": "per-slice min-max to [0, 1]; output mapped back to the input range",
        "size_multiple": 2 ** net.depth,
        "training": training or {},
        "library_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_sha256": weights_sha256(scripted),
    }
    metadata.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with _quiet_torchscript():
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})
    tmp.replace(path)   # never leave a half-written model under the final name
    return metadata


def read_metadata(path) -> Dict[str, Any]:
    """A model file's metadata straight from its archive, without torch (for GUIs and listings).

    Only :func:`load_model` validates the weights; this just reads the JSON.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/extra/" + METADATA_FILE)), None)
            if member is None:
                raise ModelFormatError(f"{path}: no {METADATA_FILE} inside; not a Speckle2Self model")
            return json.loads(archive.read(member))
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{path}: cannot read model metadata ({err})") from err


def load_model(path, device: str = "cpu") -> LoadedModel:
    """Load and check a Speckle2Self TorchScript model. Raises ModelFormatError otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    _check_archive(path)
    extra = {METADATA_FILE: ""}
    try:
        with _quiet_torchscript():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as err:  # torch raises RuntimeError / ValueError variants
        raise ModelFormatError(
            f"{path}: not a TorchScript model ({_short(err)}). A training checkpoint or a pickled "
            "model cannot be loaded; export one with `speckle2self train ... --out MODEL.pt`") from err
    if not extra[METADATA_FILE]:
        raise ModelFormatError(f"{path}: TorchScript file without Speckle2Self metadata ({METADATA_FILE}); "
                               "export models with Speckle2SelfLib.models.export_model")
    metadata = _parse_metadata(path, extra[METADATA_FILE])
    if weights_sha256(module) != metadata["weights_sha256"]:
        raise ModelFormatError(f"{path}: weights do not match the checksum in the metadata; the file is corrupt")
    module.eval()
    return LoadedModel(module, metadata, path)


def _check_archive(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise ModelFormatError(f"{path}: not a TorchScript model (not a zip archive; truncated or another format)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        bad = zf.testzip()
    if bad is not None:
        raise ModelFormatError(f"{path}: archive member {bad} is corrupt; download or export the model again")
    if not any("/code/" in n for n in names):
        raise ModelFormatError(
            f"{path}: a PyTorch checkpoint or pickle, not a TorchScript model; it is refused because loading "
            "it would run pickled code. Export a model with `speckle2self train ... --out MODEL.pt`")


def _parse_metadata(path: Path, text) -> Dict[str, Any]:
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path}: metadata is not valid JSON ({err})") from err
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if metadata.get("format") != FORMAT_NAME or missing:
        raise ModelFormatError(f"{path}: not a Speckle2Self model (missing metadata: {', '.join(missing) or 'format'})")
    if int(metadata["format_version"]) > FORMAT_VERSION:
        raise ModelFormatError(f"{path}: model format {metadata['format_version']} is newer than this library "
                               f"supports ({FORMAT_VERSION}); update Speckle2Self")
    return metadata


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


# ----------------------------------------------------------------------------- bundled models

def bundled_models() -> List[Dict[str, Any]]:
    """Entries of Resources/Models/models.json: name, file, version, sha256, default, description."""
    if not MANIFEST.is_file():
        return []
    return json.loads(MANIFEST.read_text())["models"]


def bundled_model_path(name: Optional[str] = None) -> Path:
    """Path of a bundled model (the default one when name is None), checksum-verified."""
    entries = bundled_models()
    if not entries:
        raise FileNotFoundError(f"no bundled model in {MODELS_DIR}; pass a model file (--model MODEL.pt) "
                                "or train one with `speckle2self train`")
    if name is None:
        entry = next((e for e in entries if e.get("default")), entries[0])
    else:
        entry = next((e for e in entries if e["name"] == name), None)
        if entry is None:
            raise KeyError(f"no bundled model {name!r}; available: {', '.join(e['name'] for e in entries)}")
    path = MODELS_DIR / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"bundled model file {path} is missing; reinstall the extension")
    if file_sha256(path) != entry["sha256"]:
        raise ModelFormatError(f"{path}: checksum differs from models.json; the file is corrupt or was replaced")
    return path


def resolve_model_path(model: Optional[str]) -> Path:
    """A file path, a bundled model's name, or None for the default bundled model."""
    if model is None:
        return bundled_model_path()
    candidate = Path(model)
    if candidate.suffix or candidate.exists():
        return candidate
    return bundled_model_path(model)
