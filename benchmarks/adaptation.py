"""Adapting the default model to a new scanner and anatomy, measured on held-out frames (issue #13).

One real PLUS sequence (default: BoneUltrasound_L14.igs.mha, 21 frames of tissue over bone)
is split in time: the first 2/3 of its frames go into a headless MRML scene (slicer-core) as a
sequence node and the model is adapted on that node with the product's own code path
(``Speckle2SelfLib.engine.adapt.adapt``, starting from the bundled default model found through
``resolve_model_path(None)``); the remaining frames are held out. On every held-out frame the
input, the default model's output and the adapted model's output are compared by

* GLCM homogeneity (``metrics.glcm_homogeneity``, 8-bit levels) over the image content (the
  bounding box of rows/columns that are not black in some frame: the black side bands of the
  PLUS frames are left out, they would add the same constant to every method), and
* CNR (``benchlib.quality.cnr``) across the bright bone edge: in every column of a band across the bone
  (columns 260-499 of the 820-pixel-wide frame) the surface is the brightest row of the input
  frame smoothed with a 3-pixel Gaussian between rows 200 and 449; ROI A is the surface
  (+-2 rows), ROI B the acoustic shadow 20-50 rows below it. The ROIs come from the input
  frame, so all methods are measured on the same pixels.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/adaptation.py --minutes 10 --out-dir /tmp/adapted
    python benchmarks/adaptation.py --model /tmp/adapted/<name>.pt      # evaluate an adapted model again

Prints a markdown table and (``--json``) writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Speckle2Self"))

from benchlib import quality  # noqa: E402
from Speckle2SelfLib import metrics  # noqa: E402

DEFAULT_FILE = REPO.parent / "shared" / "data" / "sequences" / "BoneUltrasound_L14.igs.mha"
TRAIN_FRACTION = 2 / 3
EDGE_COLUMNS = (260, 500)          # band across the bone (absolute columns of the 820-px frame)
EDGE_SEARCH_ROWS = (200, 450)      # where the bone surface is searched
EDGE_SMOOTH_PX = 3.0
SURFACE_HALF_ROWS = 2              # ROI A: surface row +- 2
SHADOW_ROWS = (20, 51)             # ROI B: rows 20..50 below the surface


def split(n: int, fraction: float = TRAIN_FRACTION) -> Tuple[slice, slice]:
    """Training frames first (in time), held-out frames last."""
    k = int(round(n * fraction))
    if not 0 < k < n:
        raise ValueError(f"cannot split {n} frames into training and held-out frames")
    return slice(0, k), slice(k, n)


def content_box(frames: np.ndarray, dark: float = 0.02, share: float = 0.05) -> Tuple[slice, slice]:
    """Rows and columns where at least ``share`` of the pixels are above ``dark`` of the range in some frame."""
    lo, hi = float(frames.min()), float(frames.max())
    ever = (frames > lo + dark * (hi - lo)).any(axis=0)
    rows = np.flatnonzero(ever.mean(axis=1) >= share)
    cols = np.flatnonzero(ever.mean(axis=0) >= share)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def edge_rois(frame: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(bone surface, acoustic shadow below it) boolean masks from an input frame."""
    from scipy.ndimage import gaussian_filter

    smooth = gaussian_filter(frame.astype(np.float64), EDGE_SMOOTH_PX)
    (r0, r1), (c0, c1) = EDGE_SEARCH_ROWS, EDGE_COLUMNS
    surface_rows = r0 + smooth[r0:r1, c0:c1].argmax(axis=0)
    surface = np.zeros(frame.shape, bool)
    shadow = np.zeros(frame.shape, bool)
    for j, row in enumerate(surface_rows):
        surface[row - SURFACE_HALF_ROWS:row + SURFACE_HALF_ROWS + 1, c0 + j] = True
        shadow[row + SHADOW_ROWS[0]:row + SHADOW_ROWS[1], c0 + j] = True
    return surface, shadow


def score(outputs: np.ndarray, inputs: np.ndarray, box: Tuple[slice, slice]) -> Dict[str, List[float]]:
    homogeneity = [metrics.glcm_homogeneity(o[box]) for o in outputs]
    cnr = [quality.cnr(o, *edge_rois(i)) for o, i in zip(outputs, inputs)]
    return {"homogeneity": homogeneity, "cnr": cnr}


def headless_scene():
    """An MRML scene set up as Slicer sets one up (as Testing/conftest.py does)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    sequences_logic = slicer.vtkSlicerSequencesLogic()
    sequences_logic.SetMRMLApplicationLogic(app_logic)
    sequences_logic.SetMRMLScene(scene)
    return scene, (app_logic, sequences_logic)


def add_sequence(scene, frames: np.ndarray, spacing, name: str):
    import slicer
    import vtk
    from vtk.util import numpy_support

    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    for k, frame in enumerate(frames):
        image = vtk.vtkImageData()
        image.SetDimensions(frame.shape[1], frame.shape[0], 1)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(frame).ravel(), deep=True))
        item = slicer.vtkMRMLScalarVolumeNode()
        item.SetAndObserveImageData(image)
        item.SetSpacing(*spacing)
        sequence.SetDataNodeAtValue(item, str(k))
    return sequence


def run_adaptation(train_frames: np.ndarray, spacing, name: str, minutes: float, device: str, out_dir) -> Path:
    from Speckle2SelfLib.scene.adapt import adapt

    scene, _logics = headless_scene()
    sequence = add_sequence(scene, train_frames, spacing, name)
    last = [0.0]

    def report(progress) -> None:
        if time.monotonic() - last[0] >= 60 or progress.phase in ("done", "failed"):
            last[0] = time.monotonic()
            loss = progress.loss
            print(f"  {progress.phase}: step {progress.step}, {progress.elapsed_s / 60:.1f} min, "
                  f"loss {loss.get('total', float('nan')):.4f} (rec {loss.get('reconstruction', float('nan')):.4f}, "
                  f"cons {loss.get('consistency', float('nan')):.4f})", flush=True)

    result = adapt([sequence], minutes=minutes, init=None, device=device, directory=out_dir, on_update=report,
                   poll_s=2.0)
    print(f"adapted model: {result.path} ({result.steps} steps)", flush=True)
    for warning in result.warnings:
        print(f"  warning: {warning}")
    return result.path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", default=str(DEFAULT_FILE), help="PLUS sequence (.igs.mha)")
    parser.add_argument("--minutes", type=float, default=10.0, help="adaptation time budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out-dir", default=None, help="user models folder for the adapted model (default: a temp dir)")
    parser.add_argument("--model", default=None, help="evaluate this adapted model instead of adapting one")
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    import torch

    from Speckle2SelfLib.fileio.imageio import read_frames
    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.engine.models import file_sha256, read_metadata, resolve_model_path

    torch.set_num_threads(1)
    data = read_frames(args.file)
    frames = data.frames
    train, held = split(len(frames))
    name = Path(args.file).name.split(".")[0]
    print(f"{name}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]}; adapting on frames "
          f"{train.start}-{train.stop - 1}, evaluating on held-out frames {held.start}-{held.stop - 1}", flush=True)
    default = resolve_model_path(None)
    if args.model:
        adapted = Path(args.model)
    else:
        import tempfile

        out_dir = args.out_dir or tempfile.mkdtemp(prefix="speckle2self-adapted-")
        adapted = run_adaptation(frames[train], data.spacing, name, args.minutes, args.device, out_dir)

    inputs = frames[held]
    box = content_box(frames)
    rows = {"input": score(inputs, inputs, box)}
    for label, model in (("default", default), ("adapted", adapted)):
        outputs = Despeckler.from_file(model, "cpu").denoise(inputs)
        rows[label] = score(outputs, inputs, box)
    meta = read_metadata(adapted)
    adaptation = meta.get("adaptation", {})
    print()
    print(f"| {name}, held-out frames {held.start}-{held.stop - 1} (n = {len(inputs)}) | GLCM homogeneity | "
          "CNR bone surface vs shadow |")
    print("|---|---|---|")
    for label, values in rows.items():
        h, c = np.array(values["homogeneity"]), np.array(values["cnr"])
        print(f"| {label} | {h.mean():.4f} ± {h.std():.4f} | {c.mean():.3f} ± {c.std():.3f} |")
    dh = np.array(rows["adapted"]["homogeneity"]) - np.array(rows["default"]["homogeneity"])
    dc = np.array(rows["adapted"]["cnr"]) - np.array(rows["default"]["cnr"])
    print(f"\nadapted - default, per held-out frame: homogeneity {dh.mean():+.4f} (higher on {int((dh > 0).sum())}/"
          f"{len(dh)} frames), CNR {dc.mean():+.3f} (higher on {int((dc > 0).sum())}/{len(dc)} frames)")
    print(f"default model: {default.name} (sha256 {file_sha256(default)[:12]}); adapted: {adapted.name}, "
          f"{adaptation.get('steps')} steps (best {adaptation.get('best_step')}) in {adaptation.get('minutes')} min "
          f"on {adaptation.get('device')}, lr {adaptation.get('lr')}, crop {adaptation.get('crop')}, "
          f"batch {adaptation.get('batch')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"file": Path(args.file).name, "train_frames": [train.start, train.stop],
                                               "held_out_frames": [held.start, held.stop], "default": str(default),
                                               "adapted": str(adapted), "adaptation": adaptation, "scores": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
