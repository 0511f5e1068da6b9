"""``speckle2self segment`` in an environment without vtk (issue #11): one clear line, no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from conftest import REPO

BLOCK_VTK = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('vtk', 'vtkmodules', 'slicer'):\n"
    "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
    "sys.meta_path.insert(0, Block())\n"
    "for name in [n for n in sys.modules if n.split('.')[0] in ('vtk', 'vtkmodules', 'slicer')]:\n"
    "    del sys.modules[name]\n"
    f"sys.path.insert(0, {str(REPO / 'Speckle2Self')!r})\n"
    "from Speckle2SelfLib.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


def test_segment_without_vtk_prints_one_line_and_exits_2(tmp_path):
    from PIL import Image

    rr, cc = np.ogrid[:64, :80]
    image = np.where(np.hypot(rr - 32, cc - 40) < 10, 20, 150).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    out = tmp_path / "mask.png"
    run = subprocess.run([sys.executable, "-c", BLOCK_VTK, "segment", str(tmp_path / "scan.png"), "--seed", "40,32",
                          "--out", str(out), "--no-despeckle", "--method", "flood"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "pip install vtk" in lines[0] and "--method flood" in lines[0]
    assert not out.exists()
