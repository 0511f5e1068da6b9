"""A non-editable pip install ships the bundled models and finds them (not only the source tree)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in the environment")
    import shutil

    out = tmp_path_factory.mktemp("wheel")
    # Build from a copy of what the wheel is made of: an in-tree build would leave build/ behind.
    src = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "Speckle2Self" / "Speckle2SelfLib", src / "Speckle2Self" / "Speckle2SelfLib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "Resources" / "Models", src / "Resources" / "Models")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.glob("speckle2self-*.whl")
    return path


def test_wheel_carries_every_bundled_model(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (REPO / "Resources" / "Models").iterdir() if p.is_file()}
    assert {f"Speckle2SelfLib/bundled_models/{n}" for n in shipped} <= names
    lib = REPO / "Speckle2Self" / "Speckle2SelfLib"
    sources = {"Speckle2SelfLib/" + f.relative_to(lib).as_posix() for f in lib.rglob("*.py") if "__pycache__" not in f.parts}
    assert "Speckle2SelfLib/engine/models.py" in sources and sources <= names, sorted(sources - names)
    assert not [n for n in names if "benchlib" in n], "benchmark-only code stays out of the wheel"


def test_installed_wheel_loads_its_default_model(wheel, tmp_path):
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = ("import Speckle2SelfLib.engine.models as m; p = m.bundled_model_path(); "
             "print(p); print(m.read_metadata(p)['name'])")
    # run from an empty folder with only the installed copy on the path: no source tree to fall back on
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    path, name = run.stdout.split()
    assert Path(path).is_relative_to(target) and name.startswith("speckle2self")
