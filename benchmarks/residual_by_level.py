"""How the speckle left around a network's output spreads with grey level (needs ../shared for carotid).

    python benchmarks/residual_by_level.py                       # bundled default, 12 carotid tuning images
    python benchmarks/residual_by_level.py --model M.pt --limit 40

For each frame: the input and the network's output (``refine="none"``, in the input's grey
levels), both as fractions of the frame's grey range; pixels are grouped by the output's level
and the table gives each group's share of pixels and the standard deviation of input minus
output there. A spread that is the same at every level means the speckle is additive on this
display scale (no variance-stabilising transform is called for); the guided refinement's
``refine_range_power`` is then a weighting of where boundaries matter, not a noise model
(CHANGELOG.md, v4). The simulated tuning images (seeds 1000+, 7.5 MHz)
are shown for comparison.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

import simulated  # noqa: E402  (benchmarks/simulated.py: the simulated tuning set)
from benchlib import carotid_data as carotid  # noqa: E402
from carotid import evenly  # noqa: E402
from Speckle2SelfLib.engine.inference import Despeckler  # noqa: E402

LEVEL_EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
MIN_PIXELS = 1000


def residual_table(engine: Despeckler, frames) -> list:
    """(low, high, share of pixels, residual std) per output-level group with enough pixels."""
    levels, residuals = [], []
    for frame in frames:
        frame = np.asarray(frame, dtype=np.float32)
        out = engine.denoise(frame, refine="none", grey_levels="input")
        lo, span = float(frame.min()), float(np.ptp(frame)) or 1.0
        levels.append(((out - lo) / span).ravel())
        residuals.append(((frame - out) / span).ravel())
    level, residual = np.concatenate(levels), np.concatenate(residuals)
    rows = []
    for low, high in zip(LEVEL_EDGES[:-1], LEVEL_EDGES[1:]):
        inside = (level >= low) & (level < high)
        if inside.sum() >= MIN_PIXELS:
            rows.append((low, high, float(inside.mean()), float(residual[inside].std())))
    return rows


def print_table(title: str, rows) -> None:
    print(f"\n{title}\n\n| output level | pixels | std(input - output) |\n|---|---:|---:|")
    for low, high, share, std in rows:
        print(f"| {low:.2f}-{high:.2f} | {share:.1%} | {std:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model file or bundled name (default: the bundled default)")
    parser.add_argument("--limit", type=int, default=12, help="carotid tuning images (default 12)")
    args = parser.parse_args(argv)
    engine = Despeckler.from_file(args.model, "cpu")
    if carotid.carotid_dir() is not None:
        cases = evenly(carotid.cases("tuning", with_mask=True), args.limit)
        print_table(f"Carotid tuning subjects, {len(cases)} images", residual_table(engine, [c.load()[0] for c in cases]))
    else:
        print("carotid images not found (../shared): simulated images only")
    images = simulated.simulate_set(simulated.TUNE_KINDS, simulated.TUNE_SEED_BASE, 512, simulated.TRAIN_FC)
    print_table("Simulated tuning images, 7.5 MHz", residual_table(engine, [im[0] for im in images]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
