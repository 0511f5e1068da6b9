"""Speckle grain and view differences of every data set at hand, and the working scale the
default model would pick for each (Speckle2SelfLib.engine.grain).

    python benchmarks/grain.py [--model MODEL.pt]

View difference at s: std(view_s - full view) / std(full view) on the central region; near 0
the multi-scale views are copies of each other (coarse speckle) and the self-supervised loss
rewards copying. Grain: full width at half maximum of the speckle autocorrelation (pixels).
Prints a markdown table. Real data come from ../shared; the simulated rows need nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

from benchlib.carotid_data import shared_dir  # noqa: E402
from benchlib.grain_size import estimate_grain  # noqa: E402
from Speckle2SelfLib.engine import grain  # noqa: E402


def datasets():
    """(name, frames) pairs: simulated always, real ones where ../shared is present."""
    from Speckle2SelfLib.simulation import simulated_set
    yield "simulated B-mode, 7.5 MHz (512 px)", np.stack(simulated_set(4, 512, seed=2000)[0])
    base = shared_dir()
    if base is None:
        return
    from benchlib import carotid_data as carotid
    from Speckle2SelfLib.fileio.imageio import read_frames
    for split in ("tuning", "test"):
        cases = carotid.cases(split)
        picks = [cases[i].load()[0] for i in np.linspace(0, len(cases) - 1, 8).round().astype(int)]
        yield f"carotid B-mode, {split} subjects", np.stack(picks).astype(np.float32)
    for pattern in ("sequences/*.mha", "dicom/*.dcm"):
        for path in sorted((base / "data").glob(pattern)):
            data = read_frames(path)
            frames = [np.asarray(f, np.float32) for f in list(data.frames)[:8]]
            frames = [f for f in frames if f.shape == frames[0].shape]
            yield path.name, np.stack(frames)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model file (default: the bundled default model)")
    args = parser.parse_args(argv)
    from Speckle2SelfLib.engine.models import load_model, resolve_model_path
    meta = load_model(resolve_model_path(args.model)).metadata
    target = meta.get("working_view_difference")
    print(f"Model {meta.get('name')}: trained at working scale {meta.get('working_scale', 1.0)}, "
          f"view difference {target}\n")
    print("| data | frames | size | view diff. 0.5 | view diff. 0.25 | grain axial x lateral (px) | working scale |")
    print("|---|---:|---|---:|---:|---|---:|")
    for name, frames in datasets():
        diff = grain.view_difference(frames)
        g = estimate_grain(frames)
        scale = grain.match_working_scale(frames, target) if target else 1.0
        g_text = f"{g.axial_px:.1f} x {g.lateral_px:.1f}" if g else "-"
        print(f"| {name} | {len(frames)} | {frames.shape[2]}x{frames.shape[1]} | {diff.get(0.5, float('nan')):.3f} | "
              f"{diff.get(0.25, float('nan')):.3f} | {g_text} | {scale:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
