"""Corrupt, foreign and tampered model files: refused at load time with one line naming the
file and the problem (exit 2 on the command line), never used for a result. Issue #16: a model
whose metadata was edited (e.g. its width) used to load as if it were real."""

from __future__ import annotations

import functools
import json
import pickle
import zipfile

import pytest
import torch

from test_bad_input_helpers import assert_refused, run_cli
from Speckle2SelfLib.engine import models
from Speckle2SelfLib.engine.models import METADATA_FILE, ModelFormatError, load_model


def _metadata(path):
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read(next(n for n in archive.namelist() if n.endswith(METADATA_FILE))))


@functools.lru_cache(maxsize=4)
def _scripted(source: str):
    return torch.jit.load(source)


def _resave(source, target, metadata: dict):
    """The same TorchScript weights under edited metadata (what a hand-edited file looks like)."""
    torch.jit.save(_scripted(str(source)), str(target), _extra_files={METADATA_FILE: json.dumps(metadata)})
    return target


def _edited(**changes):
    def make(model, tmp_path):
        meta = _metadata(model)
        for key, value in changes.items():
            if value is _DROP:
                meta.pop(key)
            else:
                meta[key] = value
        return _resave(model, tmp_path / "edited.pt", meta)
    return make


_DROP = object()


def _bytes(data: bytes):
    def make(model, tmp_path):
        path = tmp_path / "bad.pt"
        path.write_bytes(data(model) if callable(data) else data)
        return path
    return make


def _raw_metadata(text: str):
    def make(model, tmp_path):
        return _resave_raw(model, tmp_path / "raw.pt", text)
    return make


def _resave_raw(source, target, text):
    torch.jit.save(_scripted(str(source)), str(target), _extra_files={METADATA_FILE: text})
    return target


def _no_metadata(model, tmp_path):
    path = tmp_path / "bare.pt"
    torch.jit.save(_scripted(str(model)), str(path))
    return path


def _pickle(model, tmp_path):
    path = tmp_path / "pickled.pt"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    return path


def _checkpoint(model, tmp_path):
    path = tmp_path / "state.pt"
    torch.save(_scripted(str(model)).state_dict(), path)
    return path


def _other_weights(model, tmp_path):
    """Another network's weights under this model's metadata (checksum and width differ)."""
    from Speckle2SelfLib.engine.models import export_model
    from Speckle2SelfLib.engine.network import Speckle2SelfNet

    other = tmp_path / "other.pt"
    export_model(Speckle2SelfNet(width=6), other, scales=(1.0, 0.5, 0.25), interpolation="bilinear")
    meta = _metadata(model)
    meta["weights_sha256"] = _metadata(other)["weights_sha256"]
    return _resave(other, tmp_path / "swapped.pt", meta)


CASES = {
    "empty": (_bytes(b""), "not a zip"),
    "text": (_bytes(b"hello, I am not a model\n"), "not a zip"),
    "truncated": (_bytes(lambda m: m.read_bytes()[: len(m.read_bytes()) // 2]), "not a"),
    "pickle": (_pickle, "not a zip"),
    "state dict": (_checkpoint, "TorchScript"),
    "no metadata": (_no_metadata, "metadata"),
    "invalid json": (_raw_metadata("{not json"), "not valid JSON"),
    "not a speckle2self model": (_raw_metadata(json.dumps({"format": "other"})), "not a Speckle2Self model"),
    "width edited": (_edited(width=32), "width 32 but the weights have width 4"),
    "depth edited": (_edited(depth=3), "depth 3"),
    "upsample edited": (_edited(upsample="resize"), "upsample"),
    "size multiple edited": (_edited(size_multiple=8), "size multiple"),
    "head edited": (_edited(head="norm_relu"), "head"),
    "head edited to leaky": (_edited(head="norm_leaky"), "head"),
    "unknown head": (_edited(head="sigmoid"), "head"),
    "width not a number": (_edited(width="wide"), "width"),
    "working scale nan": (_edited(working_scale=float("nan")), "working_scale"),
    "scales out of range": (_edited(scales=[1.0, 2.0]), "scales"),
    "format version text": (_edited(format_version="two"), "format_version"),
    "newer format": (_edited(format_version=99), "newer"),
    "checksum edited": (_edited(weights_sha256="0" * 64), "checksum"),
    "weights swapped": (_other_weights, "width"),
    "required key missing": (_edited(interpolation=_DROP), "missing metadata"),
    "zero training steps": (_edited(training={"steps_done": 0}), "never trained"),
    "unknown refinement": (_edited(refine="sharpen"), "refine"),
    "refinement sigma out of range": (_edited(refine="guided", refine_sigma_px=500.0), "refine_sigma_px"),
    "refinement range not a number": (_edited(refine="guided", refine_range="wide"), "refine_range"),
    "refinement range power above 1": (_edited(refine="guided", refine_range_power=2.0), "refine_range_power"),
    "refinement sigma beyond float range": (_edited(refine="guided", refine_sigma_px=10 ** 400), "refine_sigma_px"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_model_is_refused_at_load(case, untrained_model, tmp_path, capsys):
    make, needle = CASES[case]
    path = make(untrained_model, tmp_path)
    with pytest.raises(ModelFormatError) as info:
        load_model(path)
    assert str(path) in str(info.value) and needle.lower() in str(info.value).lower()
    assert "\n" not in str(info.value)
    if case in CLI_CASES:
        result = run_cli(["info", path], capsys)
        assert_refused(result, 2, str(path), needle)
        assert result.out == ""


CLI_CASES = ("empty", "truncated", "state dict", "width edited", "checksum edited", "weights swapped")


def test_bad_model_is_refused_before_any_output_is_written(untrained_model, tmp_path, capsys):
    from PIL import Image

    from test_bad_input_helpers import speckle

    Image.fromarray(speckle((32, 32))).save(tmp_path / "a.png")
    model = _edited(width=16)(untrained_model, tmp_path)
    result = run_cli(["denoise", tmp_path / "a.png", tmp_path / "o.png", "--model", model], capsys)
    assert_refused(result, 2, "width 16")
    assert not (tmp_path / "o.png").exists()


def test_bundled_model_checksum_and_manifest_are_verified(untrained_model, tmp_path, monkeypatch):
    shelf = tmp_path / "Models"
    shelf.mkdir()
    (shelf / "m.pt").write_bytes(untrained_model.read_bytes())
    manifest = shelf / "models.json"
    monkeypatch.setattr(models, "MODELS_DIR", shelf)
    monkeypatch.setattr(models, "MANIFEST", manifest)
    entry = {"name": "m", "file": "m.pt", "sha256": models.file_sha256(shelf / "m.pt"), "default": True}
    manifest.write_text(json.dumps({"models": [entry]}))
    assert models.bundled_model_path() == shelf / "m.pt"
    manifest.write_text(json.dumps({"models": [dict(entry, sha256="f" * 64)]}))
    with pytest.raises(ModelFormatError, match="checksum differs from models.json"):
        models.bundled_model_path()
    manifest.write_text("{broken")
    with pytest.raises(ModelFormatError, match="list of bundled models is damaged"):
        models.bundled_models()


@pytest.mark.parametrize("content, needle", [
    (b"", "nor a training checkpoint"), (b"plain text, not a checkpoint", "nor a training checkpoint"),
    ({"weights": [1, 2]}, "no config/model/step"), ({"config": {}, "model": {}, "step": 0}, "0 training steps"),
], ids=["empty", "text", "foreign dict", "zero steps"])
def test_export_refuses_bad_checkpoints(content, needle, tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    else:
        torch.save(content, ckpt)
    result = run_cli(["export", ckpt, "--out", tmp_path / "m.pt"], capsys)
    assert_refused(result, 2, "run.ckpt", needle)
    assert not (tmp_path / "m.pt").exists()
