"""How far each CPU backend's output is from fp32 on real carotid images.

    python benchmarks/backend_agreement.py [--model M.pt] [--images DIR] [--limit 24]
        [--backends bf16 openvino onnxruntime] [--threads N]

Despeckles every --limit-th-spread image of DIR (default ../shared/data/carotid/images) through
the full engine (working scale auto, uint8 in and out) with fp32 and with each backend, and
prints the largest and mean absolute difference in grey levels (0-255) and the share of
pixels that differ by more than one grey level.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model file (default: the bundled default model)")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "carotid" / "images"))
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--backends", nargs="+", default=["bf16", "openvino", "onnxruntime"])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    import torch
    from PIL import Image

    from Speckle2SelfLib.engine.backends import available_backends
    from Speckle2SelfLib.engine.inference import Despeckler

    if args.threads:
        torch.set_num_threads(args.threads)
    files = sorted(Path(args.images).glob("*.png"))
    if not files:
        print(f"no PNG images in {args.images}", file=sys.stderr)
        return 1
    files = files[:: max(1, len(files) // args.limit)][: args.limit]
    frames = [np.asarray(Image.open(f).convert("L")) for f in files]
    reference = Despeckler.from_file(args.model, "cpu", backend="fp32")
    expected = [reference.denoise(f) for f in frames]
    usable = available_backends("cpu")
    print(f"model: {Path(reference.loaded.path).name}; {len(frames)} images from {args.images}\n")
    print("| backend | max abs diff (grey levels) | mean abs diff | pixels differing by > 1 level |")
    print("|---|---|---|---|")
    for backend in args.backends:
        if backend not in usable:
            print(f"| {backend} | not installed | | |")
            continue
        engine = Despeckler.from_file(args.model, "cpu", backend=backend)
        diffs = [np.abs(engine.denoise(f).astype(np.int32) - e) for f, e in zip(frames, expected)]
        every = np.concatenate([d.ravel() for d in diffs])
        print(f"| {backend} | {every.max()} | {every.mean():.4f} | {100 * (every > 1).mean():.3f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
