"""Models on disk: TorchScript files that carry their own JSON metadata.

A model file is a TorchScript archive of the inference net (full-resolution encoder +
decoder) with ``speckle2self.json`` in its extra files. Loading never unpickles user
files: TorchScript archives are read by ``torch.jit.load``; anything else is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import threading
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .. import __version__

METADATA_FILE = "speckle2self.json"
FORMAT_NAME = "speckle2self-model"
FORMAT_VERSION = 1


def _find_models_dir() -> Path:
    """Where the bundled models live in each way the library is installed:
    a pip wheel (package data ``Speckle2SelfLib/bundled_models``), a Slicer extension (the
    module's ``Resources/Models``, installed there by CMake) or the source tree (the
    repository's top-level ``Resources/Models``, also what an editable install sees)."""
    lib = Path(__file__).resolve().parents[1]        # Speckle2SelfLib (this file is engine/models.py)
    candidates = (lib / "bundled_models", lib.parent / "Resources" / "Models",
                  lib.parents[1] / "Resources" / "Models")
    return next((c for c in candidates if (c / "models.json").is_file()), candidates[-1])


MODELS_DIR = _find_models_dir()
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


#: TorchScript compilation is not thread-safe: two exports of the default network at once hung
#: here, or failed ("Can't redefine method: forward on class ... Conv2d"), losing an adaptation.
_TORCHSCRIPT_LOCK = threading.RLock()


def export_model(net, path, *, scales, interpolation: str, name: str = "speckle2self",
                 training: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Script ``net.inference_module()`` and save it with metadata. Returns the metadata."""
    import torch

    inference = net.inference_module().cpu().eval()
    with _TORCHSCRIPT_LOCK, _quiet_torchscript():
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
        "head": getattr(net, "head", "linear"),
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
    with _TORCHSCRIPT_LOCK, _quiet_torchscript():
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})
    tmp.replace(path)   # never leave a half-written model under the final name
    return metadata


def rewrite_metadata(src, dst, change: Callable[[Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
    """Copy the model ``src`` to ``dst`` (may be the same file) with the metadata ``change`` returns
    for a copy of its own; the weights and their checksum stay. The copy is loaded and checked
    before it takes the name. Returns the metadata written."""
    import copy

    import torch

    loaded = load_model(src)                     # refuses anything that is not a valid model
    metadata = change(copy.deepcopy(loaded.metadata))
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with _quiet_torchscript():
        torch.jit.save(loaded.module, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})
    try:
        load_model(tmp)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)
    return metadata


def rewrite_recommendation(src, dst, refine: Dict[str, Any], name: Optional[str] = None) -> Dict[str, Any]:
    """Copy the model ``src`` to ``dst`` with another recommended output (``refine`` holds the
    "refine" key and any guided settings, as ``speckle2self export --refine ...`` gives them) and
    optionally another name (:func:`rewrite_metadata`). A new "refine" replaces the model's
    settings; "guided" over a guided model keeps those it does not set. Returns the metadata written."""
    from .refine import RECOMMENDATION_KEYS, overridden

    def change(metadata):
        updated = {k: v for k, v in metadata.items() if k not in RECOMMENDATION_KEYS}
        updated.update(overridden(metadata, refine))
        if name:
            updated["name"] = name
        return updated

    return rewrite_metadata(src, dst, change)


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
            "model cannot be loaded; a training checkpoint becomes a model with `speckle2self export CHECKPOINT.ckpt "
            "--out MODEL.pt`") from err
    if not extra[METADATA_FILE]:
        raise ModelFormatError(f"{path}: TorchScript file without Speckle2Self metadata ({METADATA_FILE}); "
                               "export models with Speckle2SelfLib.engine.models.export_model")
    metadata = _parse_metadata(path, extra[METADATA_FILE])
    if weights_sha256(module) != metadata["weights_sha256"]:
        raise ModelFormatError(f"{path}: weights do not match the checksum in the metadata; the file is corrupt")
    module.eval()
    check_module_matches_metadata(module, metadata, path)
    return LoadedModel(module, metadata, path)


def check_module_matches_metadata(module, metadata: Dict[str, Any], path="model") -> None:
    """Refuse a model whose metadata does not describe its network (an edited or mixed-up file).

    Compares width, depth, upsampling, head and size multiple with the scripted module's
    layers and parameter shapes, and runs a tiny forward pass of known shape: the output must
    have the input's shape, be finite and lie in [0, 1]. Raises ModelFormatError.
    """
    import torch

    def refuse(what: str) -> None:
        raise ModelFormatError(f"{path}: {what}; the metadata was edited or does not belong to these weights")

    layers = {name: mod for name, mod in module.named_modules()}
    kinds = {name: str(getattr(mod, "original_name", "")) for name, mod in layers.items()}
    enc_convs = [n for n in layers if n.startswith("encoder.") and kinds[n] == "Conv2d"]
    stride2 = [n for n in enc_convs if tuple(layers[n].stride)[0] == 2]
    if enc_convs:
        actual_width = int(layers[enc_convs[0]].weight.shape[0])
        if int(metadata["width"]) != actual_width:
            refuse(f"metadata says width {metadata['width']} but the weights have width {actual_width}")
        for k, name in enumerate(stride2):
            expected = actual_width * 2 ** k
            if int(layers[name].weight.shape[0]) != expected:
                refuse(f"encoder stage {k} has {layers[name].weight.shape[0]} channels, not {expected}")
    if "depth" in metadata and stride2 and int(metadata["depth"]) != len(stride2):
        refuse(f"metadata says depth {metadata['depth']} but the network has {len(stride2)} stride-2 stages")
    if "upsample" in metadata and any(n.startswith("decoder.") for n in kinds):
        transposed = any(k == "ConvTranspose2d" for n, k in kinds.items() if n.startswith("decoder."))
        if (metadata["upsample"] == "transposed") != transposed:
            refuse(f"metadata says upsample {metadata['upsample']!r} but the decoder "
                   f"{'has' if transposed else 'has no'} transposed convolutions")
    if "head" in metadata:
        decoder_layers = [n for n in kinds if n.startswith("decoder.layers.") and n.count(".") == 2]
        last = kinds[decoder_layers[-1]] if decoder_layers else ""
        has_norm_head = len(decoder_layers) >= 2 and kinds[decoder_layers[-2]] == "InstanceNorm2d"
        ends = {"norm_relu": "ReLU", "norm_leaky": "LeakyReLU"}
        found = last if has_norm_head and last in ends.values() else None
        if decoder_layers and ends.get(metadata["head"]) != found:
            refuse(f"metadata says head {metadata['head']!r} but the decoder ends otherwise")
    multiple = int(getattr(module, "size_multiple", 0) or 0)
    if multiple and "size_multiple" in metadata and int(metadata["size_multiple"]) != multiple:
        refuse(f"metadata says size multiple {metadata['size_multiple']} but the network pads to {multiple}")
    multiple = multiple or 16
    probe = torch.linspace(0, 1, (2 * multiple + 3) * (2 * multiple + 5)).reshape(1, 1, 2 * multiple + 3,
                                                                             2 * multiple + 5)
    try:
        # optimized_execution(False): no JIT profiling run for a probe (0.04 s instead of 0.5 s).
        with torch.jit.optimized_execution(False), torch.inference_mode():
            out = module(probe)
    except Exception as err:  # a network that cannot run a 1-channel frame
        raise ModelFormatError(f"{path}: the network fails on a test frame ({_short(err)})") from err
    if tuple(out.shape) != tuple(probe.shape):
        refuse(f"a {tuple(probe.shape)} test frame gives output of shape {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()) or float(out.min()) < 0 or float(out.max()) > 1:
        raise ModelFormatError(f"{path}: the network gives values outside [0, 1] or NaN on a test frame; "
                               "the file is corrupt")


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
            "it would run pickled code. A training checkpoint becomes a model with `speckle2self export CHECKPOINT.ckpt "
            "--out MODEL.pt`")


def _parse_metadata(path: Path, text) -> Dict[str, Any]:
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path}: metadata is not valid JSON ({err})") from err
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if metadata.get("format") != FORMAT_NAME or missing:
        raise ModelFormatError(f"{path}: not a Speckle2Self model (missing metadata: {', '.join(missing) or 'format'})")
    try:
        newer = int(metadata["format_version"]) > FORMAT_VERSION
    except (TypeError, ValueError):
        raise ModelFormatError(f"{path}: format_version {metadata['format_version']!r} is not a number") from None
    if newer:
        raise ModelFormatError(f"{path}: model format {metadata['format_version']} is newer than this library "
                               f"supports ({FORMAT_VERSION}); update Speckle2Self")
    problem = _metadata_problem(metadata)
    if problem:
        raise ModelFormatError(f"{path}: invalid metadata: {problem}")
    return metadata


def _metadata_problem(m: Dict[str, Any]) -> Optional[str]:
    """The first value of the metadata that no exported model has, or None."""
    import math

    from .refine import REFINE_RANGE_LIMITS, REFINE_RANGE_POWER_LIMITS, REFINE_SIGMA_LIMITS

    def number(key, lo, hi, integer=False):
        value = m[key]
        try:
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (integer and not float(value).is_integer()) or not math.isfinite(value) or not lo <= value <= hi
        except OverflowError:               # an integer beyond float range
            bad = True
        if bad:
            return f"{key} = {value!r} (expected {'a whole number' if integer else 'a number'} in [{lo}, {hi}])"
        return None

    checks = [number("width", 1, 4096, True)]
    for key, lo, hi, integer in (("depth", 1, 8, True), ("num_scales", 1, 16, True), ("size_multiple", 1, 256, True),
                                 ("working_scale", 0.05, 4.0, False), ("working_view_difference", 1e-9, 1e9, False),
                                 ("refine_sigma_px", *REFINE_SIGMA_LIMITS, False),
                                 ("refine_range", *REFINE_RANGE_LIMITS, False),
                                 ("refine_range_power", *REFINE_RANGE_POWER_LIMITS, False)):
        if key in m and m[key] is not None:
            checks.append(number(key, lo, hi, integer))
    scales = m["scales"]
    if not isinstance(scales, list) or not scales or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1 for s in scales):
        checks.append(f"scales = {scales!r} (expected a list of numbers in (0, 1])")
    if m["interpolation"] not in ("bilinear", "bicubic", "area", "nearest"):
        checks.append(f"interpolation = {m['interpolation']!r}")
    if "upsample" in m and m["upsample"] not in ("transposed", "resize"):
        checks.append(f"upsample = {m['upsample']!r}")
    if "head" in m and m["head"] not in ("linear", "norm_relu", "norm_leaky"):
        checks.append(f"head = {m['head']!r}")
    if "refine" in m and m["refine"] not in ("guided", "none"):
        checks.append(f"refine = {m['refine']!r} (expected guided or none)")
    if not isinstance(m["weights_sha256"], str):
        checks.append("weights_sha256 is not a string")
    training = m.get("training")
    if isinstance(training, dict) and training.get("steps_done") is not None:
        try:
            untrained = int(training["steps_done"]) < 1
        except (TypeError, ValueError):
            untrained = True
        if untrained:
            checks.append(f"training.steps_done = {training['steps_done']!r}: the network was never trained "
                          "(train it with --steps N, N >= 1)")
    return next((c for c in checks if c), None)


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


# ----------------------------------------------------------------------------- bundled models

def bundled_models() -> List[Dict[str, Any]]:
    """Entries of Resources/Models/models.json: name, file, version, sha256, default, description."""
    if not MANIFEST.is_file():
        return []
    try:
        entries = json.loads(MANIFEST.read_text())["models"]
        if not all(isinstance(e, dict) and {"name", "file", "sha256"} <= set(e) for e in entries):
            raise KeyError("name/file/sha256")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelFormatError(f"{MANIFEST}: the list of bundled models is damaged ({_short(err)}); "
                               "reinstall the extension") from err
    return entries


def bundled_entry(name: str, entries: Optional[List[Dict[str, Any]]] = None) -> Optional[Dict[str, Any]]:
    """The models.json entry of the bundled model called ``name``, or whose file is ``name``.pt
    (v1's file is "...-v1.pt", its name has no "-v1"); None when there is none."""
    entries = bundled_models() if entries is None else entries
    return next((e for e in entries if e["name"] == name), None) or \
        next((e for e in entries if Path(e["file"]).stem == name), None)


def bundled_model_path(name: Optional[str] = None) -> Path:
    """Path of a bundled model (the default one when name is None), checksum-verified."""
    entries = bundled_models()
    if not entries:
        raise FileNotFoundError(f"no bundled model in {MODELS_DIR}; pass a model file (--model MODEL.pt) "
                                "or train one with `speckle2self train`")
    if name is None:
        entry = next((e for e in entries if e.get("default")), entries[0])
    else:
        entry = bundled_entry(name, entries)
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


def describe_model(metadata: Dict[str, Any]) -> str:
    """One-paragraph summary of model metadata: name, width, training steps and data."""
    training = metadata.get("training") or {}
    data = training.get("data") or {}
    data_text = ", ".join(f"{k}: {v}" for k, v in data.items()) if isinstance(data, dict) else str(data)
    parts = [f"{metadata.get('name', '?')}",
             f"width {metadata.get('width', '?')}",
             f"scales {metadata.get('scales', '?')}",
             f"{training.get('steps_done', '?')} training steps"]
    if metadata.get("working_view_difference"):
        parts.append(f"grain-adaptive (view difference {metadata['working_view_difference']:.3f} "
                     f"at working scale {metadata.get('working_scale', 1.0):g})")
    elif metadata.get("working_scale", 1.0) != 1.0:
        parts.append(f"working scale {metadata['working_scale']:g}")
    if metadata.get("refine") == "guided":
        from .refine import model_settings
        try:
            settings = model_settings(metadata)
            power = f" on guide levels ^ {settings['range_power']:g}" if settings["range_power"] != 1.0 else ""
            parts.append(f"recommends guided smoothing (sigma {settings['sigma_px']:g} px, "
                         f"range {settings['range_sigma']:g}{power})")
        except (TypeError, ValueError):     # not validated here (read without loading): say so
            parts.append("recommends guided smoothing (its settings are not numbers: the model will be refused)")
    if training.get("minutes_done") is not None:
        parts.append(f"{training['minutes_done']} min on {training.get('device_used', '?')}")
    if data_text:
        parts.append(f"data: {data_text}")
    if metadata.get("created"):
        parts.append(f"created {metadata['created']}")
    return "; ".join(parts)
