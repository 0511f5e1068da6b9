"""The paper's ablation (Table 5) on simulated speckle, every variant on the same budget.

Rows: loss pairs (reconstruction + consistency), scale sets (H = 1.0, M = 0.5, L = 0.25, and
one shared encoder) and the interpolation used by the perturbation. Each variant is trained
self-supervised from the same seed on the same simulated training frames, then scored by
PSNR / SSIM against the clean images of a separate simulated test set.

    python benchmarks/ablation.py [--steps 300] [--width 8] [--depth 2] [--crop 64] [--size 128]
        [--rows all|loss|scales|interp] [--threads 1]

On this project's 2-core CPU machines the default budget (300 steps of a width-8, depth-2 net)
takes a few minutes per row; the paper trains the full net for thousands of epochs on a GPU,
so read the table for the ordering of the rows, not the absolute figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

from Speckle2SelfLib import metrics  # noqa: E402
from Speckle2SelfLib.simulation import simulated_set  # noqa: E402

H, M, L = 1.0, 0.5, 0.25
ROWS = {
    "loss": [("MSE + L1 (paper)", dict()),
             ("MSE + MSE", dict(consistency="mse")),
             ("L1 + L1", dict(reconstruction="l1")),
             ("MSE only", dict(consistency="none")),
             ("L1 + MSE", dict(reconstruction="l1", consistency="mse"))],
    "scales": [("H+M+L (paper)", dict()),
               ("H+L", dict(scales=(H, L))),
               ("M+L", dict(scales=(M, L))),
               ("H+M", dict(scales=(H, M))),
               ("H+M+L, one shared encoder", dict(shared_encoder=True))],
    "interp": [("bilinear (paper)", dict()),
               ("area", dict(interpolation="area")),
               ("bicubic", dict(interpolation="bicubic"))],
}


def score(model_path: Path, noisy: List[np.ndarray], clean: List[np.ndarray]) -> Dict[str, float]:
    """PSNR/SSIM after an affine fit of the output to the clean grey scale (the B-mode grey
    scale differs from the phantom's, for every method alike)."""
    from Speckle2SelfLib.engine.inference import Despeckler

    engine = Despeckler.from_file(model_path, "cpu")
    psnrs, ssims = [], []
    for x, c in zip(noisy, clean):
        y = fit_to(engine.denoise(x), c)
        psnrs.append(metrics.psnr(c, y, 1.0))
        ssims.append(metrics.ssim(c, y, 1.0))
    return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


def fit_to(img: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return metrics.affine_fit(img, ref, (0.0, 1.0)).astype(np.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train-images", type=int, default=8)
    parser.add_argument("--test-images", type=int, default=4)
    parser.add_argument("--rows", default="all", choices=["all", *ROWS])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from Speckle2SelfLib.engine.training import FramePool, TrainConfig, train

    torch.set_num_threads(args.threads)
    train_noisy, _ = simulated_set(args.train_images, args.size, seed=0)
    test_noisy, test_clean = simulated_set(args.test_images, args.size, seed=1000)
    noisy_scores = [(metrics.psnr(c, fit_to(x, c), 1.0), metrics.ssim(c, fit_to(x, c), 1.0))
                    for x, c in zip(test_noisy, test_clean)]
    groups = list(ROWS) if args.rows == "all" else [args.rows]
    print(f"Budget per row: {args.steps} steps, batch {args.batch}, crop {args.crop}, width {args.width}, "
          f"depth {args.depth}; {args.train_images} training / {args.test_images} test images of "
          f"{args.size}x{args.size} (simulated, 7.5 MHz).\n")
    print("| group | variant | PSNR dB | SSIM | train s |\n|---|---|---|---|---|")
    print(f"| - | noisy input | {np.mean([s[0] for s in noisy_scores]):.2f} | "
          f"{np.mean([s[1] for s in noisy_scores]):.3f} | - |")
    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            for label, overrides in ROWS[group]:
                cfg = TrainConfig(width=args.width, depth=args.depth, crop=args.crop, batch=args.batch,
                                  steps=args.steps, upsample="resize", device="cpu", preview_every=0,
                                  checkpoint_every=10 ** 9, seed=0, **overrides)
                path = Path(tmp) / "m.pt"
                start = time.perf_counter()
                train(cfg, FramePool(train_noisy, {"frames": len(train_noisy)}), path, progress=False)
                seconds = time.perf_counter() - start
                s = score(path, test_noisy, test_clean)
                print(f"| {group} | {label} | {s['psnr']:.2f} | {s['ssim']:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
