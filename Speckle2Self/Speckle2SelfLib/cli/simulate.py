"""``speckle2self simulate``: a phantom's simulated B-mode image, and its clean image, reference and envelope."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..simulation import LATERAL_SCALINGS, PHANTOM_KINDS, check_fc, make_phantom, simulate_bmode


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``speckle2self simulate``."""
    from .options import int_at_least, positive_float   # finite and > 0: inf dB would write an all-black image

    parser.add_argument("--phantom", choices=PHANTOM_KINDS, default="carotid", help="clean phantom to image")
    parser.add_argument("--fc", type=_frequency, default=7.5e6,
                        help="centre frequency in Hz, 0.5e6..1e8 (default 7.5e6, i.e. 7.5 MHz)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="random seed of phantom layout and speckle")
    parser.add_argument("--size", type=int, nargs="+", default=[512], metavar="N",
                        help="output size: N (square) or H W (default 512)")
    parser.add_argument("--out", required=True, help="noisy B-mode image to write (8-bit PNG)")
    parser.add_argument("--clean", help="clean image to write (8-bit PNG)")
    parser.add_argument("--reference", help="expected speckle-free B-mode to write (8-bit PNG)")
    parser.add_argument("--envelope", help="linear pre-log envelope to write (.npy, float32)")
    parser.add_argument("--dynamic-range-db", type=positive_float, default=60.0, help="display dynamic range (dB)")
    parser.add_argument("--lateral-scaling", choices=LATERAL_SCALINGS, default="must",
                        help="lateral grain vs fc: MUST's receive f-number rule (default) or plain c/fc")


def _frequency(text: str) -> float:
    try:
        return check_fc(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("fc must be", "must be")) from None


def _write_png(path: str, img01: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)).save(path)


def run_simulate(args: argparse.Namespace) -> int:
    """Run ``speckle2self simulate``; returns the exit status (2 on bad arguments)."""
    size = list(args.size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 16:
        print(f"error: --size takes N or H W with values >= 16, got {args.size}", file=sys.stderr)
        return 2
    named = [(option, path) for option, path in (("--out", args.out), ("--clean", args.clean),
                                                  ("--reference", args.reference), ("--envelope", args.envelope))
             if path is not None]
    seen = {}
    for option, path in named:
        key = Path(path).resolve()
        if key in seen:
            print(f"error: {seen[key]} and {option} name the same file {path}; give each output its own name",
                  file=sys.stderr)
            return 2
        seen[key] = option
    for path in (args.out, args.clean, args.reference):
        if path is not None and Path(path).suffix.lower() != ".png":
            print(f"error: {path}: images are written as PNG; use a .png file name", file=sys.stderr)
            return 2
    if args.envelope is not None and Path(args.envelope).suffix.lower() != ".npy":
        print(f"error: {args.envelope}: the envelope is written as NumPy .npy; use a .npy name", file=sys.stderr)
        return 2
    phantom = make_phantom(args.phantom, size=size, seed=args.seed)
    sim = simulate_bmode(phantom.clean, fc=args.fc, seed=args.seed, dynamic_range_db=args.dynamic_range_db,
                         lateral_scaling=args.lateral_scaling)
    outputs = ((args.out, sim.bmode), (args.clean, sim.clean), (args.reference, sim.reference))
    for path, image in outputs:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            _write_png(path, image)
    if args.envelope is not None:
        Path(args.envelope).parent.mkdir(parents=True, exist_ok=True)
        np.save(args.envelope, sim.envelope)
    print(f"simulated {args.phantom} phantom at {args.fc / 1e6:.2f} MHz, {size[0]}x{size[1]} px -> {args.out}")
    return 0
