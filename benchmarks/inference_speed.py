"""Inference speed and peak memory of the engine, per frame size and batch size.

    python benchmarks/inference_speed.py [--model M.pt | --width 32] [--device cpu|cuda]
        [--sizes 256 512 1024] [--batches 1 4 16] [--threads N] [--repeats 3]

Prints a markdown table: ms/frame, frames/s and peak memory (CPU: peak resident set of a
fresh subprocess per row; CUDA: torch.cuda.max_memory_allocated). Runs the real engine path
(Despeckler.denoise: normalisation, padding, batching, mapping back) on random uint8 frames.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))


def measure(model: str, device: str, size: int, batch: int, threads: int, repeats: int) -> dict:
    """One row, run in this process (the parent starts a fresh process per row)."""
    import resource

    import numpy as np
    import torch

    from Speckle2SelfLib.inference import Despeckler

    if threads:
        torch.set_num_threads(threads)
    engine = Despeckler.from_file(model, device)
    frames = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
    engine.denoise(frames, batch_size=batch)                 # warm-up (allocations, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.denoise(frames, batch_size=batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_frame = min(times) / batch
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": size, "batch": batch, "ms_per_frame": 1000 * per_frame, "fps": 1 / per_frame,
            "peak_mb": peak_mb}


def _model_path(args, tmp: Path) -> str:
    if args.model:
        return args.model
    from Speckle2SelfLib.models import export_model
    from Speckle2SelfLib.network import Speckle2SelfNet

    # Speed does not depend on the weights: an untrained net of the requested width will do.
    path = tmp / f"width{args.width}.pt"
    export_model(Speckle2SelfNet(args.width, upsample=args.upsample), path, scales=(1.0, 0.5, 0.25),
                 interpolation="bilinear", name=f"speed-test-w{args.width}")
    return str(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model file (default: an untrained net of --width)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--upsample", default="transposed", choices=["transposed", "resize"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--row", help=argparse.SUPPRESS)   # internal: run one row, print JSON
    args = parser.parse_args(argv)
    if args.row:
        size, batch = map(int, args.row.split(","))
        print(json.dumps(measure(args.model, args.device, size, batch, args.threads, args.repeats)))
        return 0
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = _model_path(args, Path(tmp))
        rows = []
        for size in args.sizes:
            for batch in args.batches:
                cmd = [sys.executable, __file__, "--model", model, "--device", args.device,
                       "--threads", str(args.threads), "--repeats", str(args.repeats), "--row", f"{size},{batch}"]
                rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU, {args.threads or torch.get_num_threads()} thread(s)"
    print(f"model: {Path(model).name if args.model else f'width {args.width} ({args.upsample})'}; device: {device}\n")
    print("| frame | batch | ms/frame | frames/s | peak memory (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}x{r['size']} | {r['batch']} | {r['ms_per_frame']:.1f} | {r['fps']:.1f} | {r['peak_mb']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
