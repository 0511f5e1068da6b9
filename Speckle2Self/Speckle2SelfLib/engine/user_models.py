"""The user's own models (e.g. adapted to their scanner): a folder of TorchScript files and a
registry (``user_models.json``) of their names and SHA-256 checksums.

Where the folder is, first match wins:

1. ``$SPECKLE2SELF_USER_MODELS`` (any program: Slicer, the command line, a notebook);
2. the folder set by :func:`set_default_directory` (the Slicer module sets one under
   the folder of Slicer's settings file, e.g. ``~/.config/slicer.org/Speckle2Self/models``);
3. ``~/.speckle2self/models``.

Listing never loads a model with torch: each file's metadata is read from its archive and
its checksum compared with the registry. Files that are unreadable, not Speckle2Self
models, or whose checksum differs from the registered one are skipped with a message
(:func:`list_user_models` returns the messages; nothing is deleted). Model files copied
into the folder by hand are listed too (their checksum is taken as found).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .models import ModelFormatError, file_sha256, read_metadata

ENV_VARIABLE = "SPECKLE2SELF_USER_MODELS"
DEFAULT_DIRECTORY = Path("~/.speckle2self/models")
REGISTRY_FILE = "user_models.json"
MODEL_SUFFIX = ".pt"

_configured_directory: Optional[Path] = None


def set_default_directory(path) -> None:
    """The folder to use when $SPECKLE2SELF_USER_MODELS is not set (None: ~/.speckle2self/models)."""
    global _configured_directory
    _configured_directory = None if path is None else Path(path)


def user_models_dir(directory=None, create: bool = False) -> Path:
    """The user models folder (``directory`` when given; see the module docstring)."""
    if directory is not None:
        path = Path(directory)
    elif os.environ.get(ENV_VARIABLE):
        path = Path(os.environ[ENV_VARIABLE])
    elif _configured_directory is not None:
        path = _configured_directory
    else:
        path = DEFAULT_DIRECTORY
    path = path.expanduser()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class UserModel:
    """One usable model of the folder."""

    name: str
    path: Path
    sha256: str
    registered: bool = True             # False: copied into the folder by hand, not registered here
    metadata: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def description(self) -> str:
        adaptation = self.metadata.get("adaptation") or {}
        nodes = ", ".join(n.get("name", "?") for n in adaptation.get("source", {}).get("nodes", []))
        return f"{self.name} (adapted on {nodes})" if nodes else self.name


def slug(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, '-', '_', '.')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return cleaned[:80] or "model"


# ----------------------------------------------------------------------------- registry file

def _registry_path(directory) -> Path:
    return user_models_dir(directory) / REGISTRY_FILE


def _read_registry(directory) -> Tuple[List[Dict[str, Any]], List[str]]:
    path = _registry_path(directory)
    if not path.is_file():
        return [], []
    try:
        entries = json.loads(path.read_text())["models"]
        if not isinstance(entries, list):
            raise TypeError("'models' is not a list")
        entries = [e for e in entries if isinstance(e, dict) and {"name", "file", "sha256"} <= set(e)]
        return entries, []
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [], [f"{path}: the user model registry is damaged ({err}); its models are listed unregistered"]


def _write_registry(directory, entries: List[Dict[str, Any]]) -> None:
    path = _registry_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps({"models": entries}, indent=2))
    tmp.replace(path)      # never a half-written registry


# ----------------------------------------------------------------------------- public API

def list_user_models(directory=None) -> Tuple[List[UserModel], List[str]]:
    """(usable models, messages about skipped files), models in registry order then by name."""
    folder = user_models_dir(directory)
    if not folder.is_dir():
        return [], []
    entries, messages = _read_registry(directory)
    by_file = {e["file"]: e for e in entries}
    files = sorted(p for p in folder.glob("*" + MODEL_SUFFIX) if p.is_file())
    order = {e["file"]: i for i, e in enumerate(entries)}
    files.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    models: List[UserModel] = []
    for path in files:
        entry = by_file.get(path.name)
        try:
            metadata = read_metadata(path)
            if metadata.get("format") != "speckle2self-model" or "weights_sha256" not in metadata:
                raise ModelFormatError(f"{path}: not a Speckle2Self model")
            digest = file_sha256(path)
        except (ModelFormatError, OSError, ValueError) as err:
            messages.append(f"skipped user model {path.name}: {err}")
            continue
        if entry is not None and entry["sha256"] != digest:
            messages.append(f"skipped user model {path.name}: its checksum differs from the registered one "
                            "(the file was changed or is corrupt); export or adapt it again, or remove it")
            continue
        name = entry["name"] if entry else metadata.get("name") or path.stem
        models.append(UserModel(name, path, digest, entry is not None, metadata))
    for entry in entries:
        if not (folder / entry["file"]).is_file():
            messages.append(f"registered user model {entry['name']!r} is missing its file {entry['file']}")
    return models, messages


def register_user_model(path, name: Optional[str] = None, directory=None) -> UserModel:
    """Add (or update) a model file of the user models folder in the registry, with its checksum."""
    folder = user_models_dir(directory, create=True)
    path = Path(path)
    if path.parent.resolve() != folder.resolve():
        raise ValueError(f"{path} is not in the user models folder {folder}")
    metadata = read_metadata(path)
    digest = file_sha256(path)
    name = name or metadata.get("name") or path.stem
    entries, damaged = _read_registry(directory)
    if damaged:     # kept beside the new registry: its entries may be recoverable by hand
        registry = _registry_path(directory)
        registry.replace(registry.with_name(f"{registry.name}.damaged-{_dt.datetime.now():%Y%m%d-%H%M%S}"))
    entries = [e for e in entries if e["file"] != path.name]
    # another file already has this name: this one is told apart as its file is ("same-2.pt" -> "same-2"),
    # never by taking the other's entry (which would leave that file unchecked)
    taken = {e["name"] for e in entries}
    if name in taken:
        name = path.stem if path.stem not in taken else next(
            f"{name}-{k}" for k in range(2, len(taken) + 3) if f"{name}-{k}" not in taken)
    entries.append({"name": name, "file": path.name, "sha256": digest,
                    "registered": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    _write_registry(directory, entries)
    return UserModel(name, path, digest, True, metadata)


def find_user_model(name_or_path, directory=None) -> Optional[UserModel]:
    """The usable user model with this name, file name or path; None when there is none."""
    wanted = str(name_or_path)
    models, _messages = list_user_models(directory)
    for model in models:
        if wanted in (model.name, model.path.name, str(model.path)) or \
                (os.path.exists(wanted) and Path(wanted).resolve() == model.path.resolve()):
            return model
    return None


def is_user_model(path, directory=None) -> bool:
    """Whether ``path`` is a file of the user models folder."""
    try:
        return Path(path).resolve().parent == user_models_dir(directory).resolve()
    except (OSError, TypeError):
        return False


def remove_user_model(name_or_path, directory=None) -> Path:
    """Delete a user model's file and registry entry; returns the deleted path.

    Works for skipped (corrupt) files too when given their path or file name, and for an entry
    whose file is already gone (only the entry is removed).
    """
    folder = user_models_dir(directory)
    model = find_user_model(name_or_path, directory)
    if model is not None:
        path = model.path
    else:
        candidate = Path(str(name_or_path))
        path = candidate if candidate.is_absolute() else folder / candidate.name
        if not (is_user_model(path, directory) and path.suffix == MODEL_SUFFIX and path.is_file()):
            return _forget_missing(name_or_path, directory, folder)
    path.unlink()
    for leftover in (path.with_suffix(".ckpt"), path.with_suffix(".preview.png")):
        if leftover.is_file():
            leftover.unlink()
    entries, _messages = _read_registry(directory)
    kept = [e for e in entries if e["file"] != path.name]
    if len(kept) != len(entries):
        _write_registry(directory, kept)
    return path


def _forget_missing(name_or_path, directory, folder: Path) -> Path:
    """Drop the registry entry of a model whose file is gone (else it is reported on every
    listing, with nothing to delete); KeyError when no such entry exists either."""
    wanted = str(name_or_path)
    entries, _messages = _read_registry(directory)
    gone = [e for e in entries if wanted in (e["name"], e["file"], str(folder / e["file"]))
            and not (folder / e["file"]).is_file()]
    if not gone:
        raise KeyError(f"no user model {name_or_path!r} in {folder}")
    _write_registry(directory, [e for e in entries if e not in gone])
    return folder / gone[0]["file"]


def unique_model_path(name: str, directory=None) -> Path:
    """A not yet used ``<folder>/<slug(name)>[-N].pt``."""
    folder = user_models_dir(directory, create=True)
    base = slug(name)
    path = folder / (base + MODEL_SUFFIX)
    k = 2
    while path.exists():
        path = folder / f"{base}-{k}{MODEL_SUFFIX}"
        k += 1
    return path


def work_directory(directory=None) -> Path:
    """A fresh hidden folder inside the user models folder for a run's checkpoints and previews."""
    import tempfile

    folder = user_models_dir(directory, create=True)
    return Path(tempfile.mkdtemp(prefix=".adapt-", dir=folder))


def remove_work_directory(path) -> None:
    shutil.rmtree(path, ignore_errors=True)
