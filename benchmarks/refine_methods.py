"""The guided refinement's two implementations: agreement, time per pixel and peak memory.

    python benchmarks/refine_methods.py [--model M.pt] [--frames 16] [--sizes 256 512 1024 2048 4000]
        [--threads 2] [--repeats 3] [--direct-up-to 1024] [--device cpu|cuda] [--skip-agreement] [--skip-timing]

* Agreement: on real carotid frames (../shared; simulated speckle when absent) the model's network
  output steers both the product's bilateral grid (``refine.guided_filter``) and the direct
  reference sum (``refine.guided_smoothing``) at the model's own settings: mean and 99th
  percentile |difference| in grey levels of 255, for the shipped grid settings and for other
  spatial sigma factors and cell sizes (what ``refine.GRID_SIGMA_FACTOR`` and
  ``GRID_CELLS_PER_SIGMA`` were chosen by).
* Time and memory: each (method, frame size) in a fresh process on one frame of random speckle
  steered by a smooth guide: ms per frame, ns per pixel (flat = time proportional to the
  pixels) and the process's peak resident memory (the frame, the guide and the filter's own
  needs; the network is not run): the median of ``--repeats`` runs (the direct filter's above
  1024 px: one run). The direct filter is timed up to ``--direct-up-to`` pixels on a side (its
  cost grows with the window, so large frames take minutes).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))
sys.path.insert(0, str(ROOT / "benchmarks"))
CAROTID = ROOT.parent / "shared" / "data" / "carotid" / "images"
#: (spatial sigma factor, cells per sigma) variants of the agreement table; the first is shipped.
VARIANTS = [(None, None), (0.85, None), (0.95, None), (1.0, None), (None, 1.0), (None, 1.5)]


def _frames(count: int):
    """Real carotid frames (every k-th of the folder), or simulated ones where ../shared is absent."""
    from PIL import Image

    files = sorted(CAROTID.glob("*.png")) if CAROTID.is_dir() else []
    if files:
        picks = files[:: max(1, len(files) // count)][:count]
        return [np.asarray(Image.open(p).convert("L")) for p in picks], f"{len(picks)} carotid frames"
    from Speckle2SelfLib.simulation import simulated_set

    noisy, _clean = simulated_set(count, 384, 0, kinds=("carotid", "thyroid"))
    return [np.round(np.asarray(f) * 255).astype(np.uint8) for f in noisy], f"{count} simulated frames"


def agreement(model, count: int) -> str:
    import torch

    from Speckle2SelfLib.engine import refine
    from Speckle2SelfLib.engine.inference import Despeckler, normalise_frame

    engine = Despeckler.from_file(model, "cpu", backend="fp32")
    frames, source = _frames(count)
    cases = []
    for frame in frames:
        x = np.empty((1, 1) + frame.shape, np.float32)
        normalise_frame(frame, x[0, 0])
        x = torch.from_numpy(x)
        engine.last_working_scale = engine.resolve_working_scale(frame[None])
        engine.last_refine = "none"
        guide = engine._apply_module(x)
        settings = refine.settings_for(engine.last_working_scale, **refine.model_settings(engine.metadata))
        cases.append((x, guide, settings, refine.guided_smoothing(x, guide, settings)))
    lines = [f"Agreement with the direct reference filter ({engine.metadata.get('name')}, its settings; {source}); "
             "grey levels of 255\n", "| grid spatial sigma factor | spatial cells per sigma | mean abs difference | "
             "99th percentile | max |", "|---|---|---|---|---|"]
    shipped = (refine.GRID_SIGMA_FACTOR, refine.GRID_CELLS_PER_SIGMA)
    for factor, cells in VARIANTS:
        refine.GRID_SIGMA_FACTOR, refine.GRID_CELLS_PER_SIGMA = factor or shipped[0], cells or shipped[1]
        means, p99s, maxes = [], [], []
        for x, guide, settings, reference in cases:
            difference = (refine.guided_filter(x, guide, settings) - reference).abs() * 255
            means.append(float(difference.mean()))
            p99s.append(float(torch.quantile(difference.flatten()[::7], 0.99)))
            maxes.append(float(difference.max()))
        label = " (shipped)" if (factor, cells) == (None, None) else ""
        lines.append(f"| {refine.GRID_SIGMA_FACTOR:g}{label} | {refine.GRID_CELLS_PER_SIGMA:g} | "
                     f"{np.mean(means):.3f} | {np.mean(p99s):.2f} | {max(maxes):.1f} |")
    refine.GRID_SIGMA_FACTOR, refine.GRID_CELLS_PER_SIGMA = shipped
    return "\n".join(lines)


def measure(method: str, size: int, repeats: int, threads: int, model, device: str = "cpu") -> dict:
    """One row in this process: time one refinement of a (size x size) frame, then the peak memory
    (CPU: the process's peak resident set; CUDA: torch's peak allocation on the GPU)."""
    import resource

    import torch
    import torch.nn.functional as F

    from Speckle2SelfLib.engine import refine
    from Speckle2SelfLib.engine.models import load_model, resolve_model_path

    torch.set_num_threads(threads)
    settings = refine.settings_for(1.0, **refine.model_settings(load_model(resolve_model_path(model)).metadata))
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, size, size, generator=gen).to(device)
    guide = F.avg_pool2d(image, 9, 1, 4)             # smooth, with the frame's structure
    run = refine.guided_filter if method == "grid" else refine.guided_smoothing
    cuda = device.startswith("cuda")
    if cuda:
        run(image, guide, settings)                  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2 ** 20
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(image, guide, settings)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": 1000 * statistics.median(times), "peak_mb": peak, "baseline_mb": before}


def timing(sizes, repeats: int, threads: int, direct_up_to: int, model, device: str = "cpu") -> str:
    rows = []
    env = dict(os.environ)            # each row sets torch's threads itself
    for size in sizes:
        for method in ("grid", "direct"):
            if method == "direct" and size > direct_up_to:
                continue
            # the direct filter once above 1024 px (seconds to minutes a run); the grid always median of --repeats
            runs = repeats if method == "grid" or size <= 1024 else 1
            cmd = [sys.executable, __file__, "--row", f"{method},{size}", "--repeats", str(runs),
                   "--threads", str(threads), "--device", device] + (["--model", model] if model else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"row {method} {size} failed: {done.stderr.strip()[-300:]}", file=sys.stderr)
                continue
            rows.append((method, size, json.loads(done.stdout.strip().splitlines()[-1])))
    where = device if device.startswith("cuda") else f"{threads} thread(s), {os.cpu_count()} logical cores"
    lines = [f"Refinement alone (the model's settings), {where}\n",
             "| method | frame | ms / frame | ns / pixel | peak memory (MB) | of which before filtering (MB) |",
             "|---|---|---|---|---|---|"]
    for method, size, row in rows:
        lines.append(f"| {method} | {size}x{size} | {row['ms']:.1f} | {1e6 * row['ms'] / size / size:.1f} | "
                     f"{row['peak_mb']:.0f} | {row['baseline_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model file (default: the bundled default)")
    parser.add_argument("--frames", type=int, default=16, help="frames of the agreement table")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--direct-up-to", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="device of the timing rows (cpu, cuda)")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--row", help=argparse.SUPPRESS)      # internal: one timing row, printed as JSON
    args = parser.parse_args(argv)
    if args.row:
        method, size = args.row.split(",")
        print(json.dumps(measure(method, int(size), args.repeats, args.threads, args.model, args.device)))
        return 0
    if not args.skip_agreement:
        import torch
        torch.set_num_threads(args.threads)
        print(agreement(args.model, args.frames) + "\n")
    if not args.skip_timing:
        print(timing(args.sizes, args.repeats, args.threads, args.direct_up_to, args.model, args.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
