"""scripts/gpu_train.py and scripts/gpu_session.sh: training on a GPU machine, checked on a CPU.

The GPU machine has torch, numpy and pillow but no SimpleITK, pydicom, vtk or slicer: the
training path must import without them. The toy run is the real script at toy size (crop 64,
batch 4, one step per run, 64x64 timing frames) on a few synthetic speckle PNGs, with those
modules blocked in every process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_train.py"
SESSION = REPO / "scripts" / "gpu_session.sh"
BLOCKED = ("SimpleITK", "pydicom", "vtk", "slicer")

#: Installed as sitecustomize.py on PYTHONPATH: every process (spawned workers too) refuses them.
BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError("blocked for this test: " + name)
            return None
    sys.meta_path.insert(0, _Block())
""")


def _blocked_env(tmp_path: Path) -> dict:
    hook = tmp_path / "blocker"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hook)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _gpu_train():
    spec = importlib.util.spec_from_file_location("gpu_train_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _speckle_pngs(folder: Path, n: int = 4, size: int = 96) -> None:
    """Bright and dark bands times Rayleigh speckle, as 8-bit PNGs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for k in range(n):
        tissue = 0.3 + 0.6 * (np.sin(yy / (6 + k)) > 0) * (np.hypot(yy - 48, xx - 48) > 15)
        frame = tissue * rng.rayleigh(1.0, (size, size))
        Image.fromarray(np.clip(frame * 90, 0, 255).astype(np.uint8)).save(folder / f"subject{k % 2}_{k}.png")


def test_training_path_imports_without_simpleitk_pydicom_vtk_or_slicer(tmp_path):
    pytest.importorskip("torch")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import Speckle2SelfLib.engine.training, Speckle2SelfLib.engine.inference\n"
            "import Speckle2SelfLib.engine.models, Speckle2SelfLib.fileio.imageio\n"
            "import importlib.util as u; s = u.spec_from_file_location('g', %r); m = u.module_from_spec(s)\n"
            "s.loader.exec_module(m)\n"
            "bad = [n for n in sys.modules if n.split('.')[0] in %r]\n"
            "assert not bad, bad\n"
            "import SimpleITK\n") % (str(REPO / "Speckle2Self"), str(SCRIPT), BLOCKED)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_blocked_env(tmp_path),
                          cwd=tmp_path, timeout=120)
    # The last line proves the blocker is active: everything before it imported without those modules.
    assert done.returncode != 0 and "blocked for this test: SimpleITK" in done.stderr, done.stderr[-2000:]
    assert "AssertionError" not in done.stderr, done.stderr[-2000:]


def test_device_pool_draws_the_library_crops():
    """A frame exactly one crop in size: every unrotated sample is its views (or their mirror image)."""
    torch = pytest.importorskip("torch")
    from Speckle2SelfLib.engine.perturbation import minmax_normalise

    gpu_train = _gpu_train()
    frame = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    pool = gpu_train.DeviceFramePool([frame], {}, "cpu", crop=64, rotate_degrees=10.0)
    pool.prepare_views((1.0, 0.5, 0.25))
    rng = np.random.default_rng(0)
    views = pool.sample(rng, 6, 64, augment_prob=0.0)
    assert len(views) == 3 and all(v.shape == (6, 1, 64, 64) for v in views)
    library = gpu_train.FramePool([frame], {})
    library.prepare_views((1.0, 0.5, 0.25))
    expected = minmax_normalise(torch.from_numpy(library._views[0][0].astype(np.float32))[None, None])[0, 0]
    for sample in views[0][:, 0]:
        assert torch.allclose(sample, expected, atol=1e-6) or torch.allclose(sample, expected.flip(-1), atol=1e-6)
    turned = pool.sample(rng, 5, 64, augment_prob=1.0)
    for v in turned:
        assert v.shape == (5, 1, 64, 64) and bool(torch.isfinite(v).all())
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0 + 1e-6


def test_large_models_are_compressed_or_split_to_come_back(tmp_path, untrained_model):
    pytest.importorskip("torch")
    from Speckle2SelfLib.engine.models import load_model

    gpu_train = _gpu_train()
    size = untrained_model.stat().st_size
    packed = tmp_path / "packed"
    packed.mkdir()
    assert gpu_train.fit_for_return(untrained_model, packed, limit=size) == [untrained_model.name]
    assert (packed / untrained_model.name).read_bytes() == untrained_model.read_bytes()
    (packed / untrained_model.name).unlink()
    names = gpu_train.fit_for_return(untrained_model, packed, limit=size - 1)
    assert names == [untrained_model.name] and (packed / names[0]).stat().st_size < size
    load_model(packed / names[0])                     # deflated archive: loads, weights check out
    split = tmp_path / "split"
    split.mkdir()
    names = gpu_train.fit_for_return(untrained_model, split, limit=4096)
    assert len(names) > 1 and all(n.startswith(untrained_model.name + ".part") for n in names)
    joined = tmp_path / "joined.pt"
    joined.write_bytes(b"".join((split / n).read_bytes() for n in sorted(names, key=lambda n: int(n.rsplit("part", 1)[1]))))
    load_model(joined)


def test_toy_gpu_session_on_cpu_writes_three_loadable_models(tmp_path):
    pytest.importorskip("torch")
    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.engine.models import read_metadata, resolve_model_path
    from Speckle2SelfLib.engine.refine import recommendation

    data, out = tmp_path / "data", tmp_path / "out"
    _speckle_pngs(data)
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out), "--toy", "--device", "cpu",
           "--steps", "1", "--minutes", "5", "--session-minutes", "12"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_blocked_env(tmp_path), cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "done"
    models = []
    for key, spec in (("a", "gpu-a-w32-d4-paper.pt"), ("b", "gpu-b-w16-d2-default-finetune.pt"),
                      ("c", "gpu-c-w16-d2-scratch.pt")):
        run = summary["runs"][key]
        assert run["ok"] and run["file"] == spec and run["steps"] == 1, run
        assert run["images_per_s"] > 0
        bench = summary["benchmark"][spec]
        assert {"net_fp32_b1_ms_per_frame", "net_bf16_b2_ms_per_frame", "engine_fp32_b2_ms_per_frame"} <= set(bench)
        assert spec in files
        models.append(out / spec)
    assert "bundled default (reference)" in summary["benchmark"]
    assert {"summary.md", "preview.png"} <= set(files)
    widths = []
    # every model recommends the default's refinement (b inherits it, a and c have it written in)
    default = recommendation(read_metadata(resolve_model_path(None)))
    assert default.get("refine") == "guided"
    for path in models:
        meta = read_metadata(path)
        assert recommendation(meta) == default
        assert meta["working_view_difference"] and meta["training"]["command"].startswith("python3 scripts/gpu_train.py")
        assert meta["training"]["data"]["masks_used"] is False
        widths.append((meta["width"], meta["depth"], meta["upsample"], meta["head"]))
        frame = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
        result = Despeckler.from_file(path, "cpu").denoise(frame)
        assert result.shape == frame.shape and result.dtype == frame.dtype
    assert widths == [(32, 4, "transposed", "norm_relu"), (16, 2, "resize", "norm_leaky"),
                      (16, 2, "resize", "norm_relu")]
    # The paper-size model is over 16 MiB as written: it came back compressed, and still loads.
    assert (out / "gpu-a-w32-d4-paper.pt").stat().st_size <= 16 * 2**20


def test_prepare_copies_real_files_and_records_the_source(tmp_path):
    gpu_train = _gpu_train()
    real, links, dest = tmp_path / "real", tmp_path / "links", tmp_path / "dest"
    _speckle_pngs(real, n=3, size=48)
    links.mkdir()
    for p in real.iterdir():
        (links / p.name).symlink_to(p)
    assert gpu_train.prepare(dest, links) == 0
    copied = sorted(dest.glob("*.png"))
    assert len(copied) == 3 and not any(p.is_symlink() for p in copied)
    info = json.loads((dest / "SOURCE.json").read_text())
    assert info["files"] == 3 and info["subjects"] == ["subject0", "subject1"]


def test_prepare_refuses_test_subject_images(tmp_path):
    gpu_train = _gpu_train()
    from benchlib import carotid_data

    try:
        test_case = carotid_data.cases("test")[0]
    except FileNotFoundError:
        pytest.skip("carotid data (../shared) not available")
    source = tmp_path / "source"
    source.mkdir()
    (source / test_case.image.name).symlink_to(test_case.image)
    assert gpu_train.prepare(tmp_path / "dest", source) == 2


def test_session_script_fails_fast_without_training_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, GPU_DATA=str(empty), OUT=str(tmp_path / "out"))
    done = subprocess.run(["bash", str(SESSION)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "--prepare" in done.stderr and ".gpu_data" in done.stderr
    assert not (tmp_path / "out").exists()
