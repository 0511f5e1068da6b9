"""Inference speed and peak memory of the engine per backend, frame size and batch size.

    python benchmarks/inference_speed.py [--model M.pt | --width 16 --depth 3 --upsample resize]
        [--device cpu|cuda] [--backends fp32 bf16 openvino onnxruntime] [--sizes 256 512 1024]
        [--batches 1 2 4 8] [--threads N] [--repeats 3] [--rounds 1]

Prints markdown tables: ms/frame, peak memory and the ratio to fp32 (same frame size and batch)
for every row, then per backend and frame size batch 1 and the best batch. Each row runs in a
fresh subprocess (CPU peak memory: its peak resident set; CUDA: torch.cuda.max_memory_allocated);
the rows of one frame size and batch run back to back, backend after backend, so the ratios
compare paths under the same load. ``--rounds R`` repeats the whole sweep R times and reports
medians (ms: median of the rows' medians; ratio: median of the per-round ratios).
Runs the real engine path (Despeckler.denoise: normalisation, padding, batching, mapping back)
on random uint8 frames at their own size (working scale 1). Backends not installed are skipped.
CUDA: backends fp32 (channels_last, no autocast), auto (bf16, else fp16 autocast) and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))


def measure(model: str, device: str, backend: str, size: int, batch: int, threads: int, repeats: int,
            refine: str = "none") -> dict:
    """One row, run in this process (the parent starts a fresh process per row)."""
    import resource

    import numpy as np
    import torch

    from Speckle2SelfLib.engine.inference import Despeckler

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = Despeckler.from_file(model, device, backend)
    load_s = time.perf_counter() - start
    frames = np.random.default_rng(0).integers(0, 256, (batch, size, size), dtype=np.uint8)
    engine.denoise(frames, batch_size=batch, working_scale=None, refine=refine)   # warm-up (allocations, kernels)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.denoise(frames, batch_size=batch, working_scale=None, refine=refine)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    per_frame = statistics.median(times) / batch
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"backend": backend, "runs": engine.backend, "size": size, "batch": batch,
            "ms": 1000 * per_frame, "peak_mb": peak_mb, "load_s": load_s}


def _model_path(args, tmp: Path) -> str:
    if args.model:
        return args.model
    from Speckle2SelfLib.engine.models import export_model
    from Speckle2SelfLib.engine.network import Speckle2SelfNet

    # Speed does not depend on the weights: an untrained net of the requested shape will do.
    path = tmp / f"width{args.width}-depth{args.depth}.pt"
    export_model(Speckle2SelfNet(args.width, upsample=args.upsample, depth=args.depth), path,
                 scales=(1.0, 0.5, 0.25), interpolation="bilinear", name=f"speed-test-w{args.width}-d{args.depth}")
    return str(path)


def _usable_backends(requested, device: str):
    from Speckle2SelfLib.engine.backends import available_backends

    usable = available_backends("cuda" if device.startswith("cuda") else device)
    skipped = [b for b in requested if b not in usable]
    if skipped:
        print(f"skipped (not installed or not for {device}): {', '.join(skipped)}", file=sys.stderr)
    return [b for b in requested if b in usable]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model file (default: an untrained net of --width/--depth)")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--upsample", default="resize", choices=["transposed", "resize"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", help="default: CPU fp32 auto bf16 openvino onnxruntime; "
                                                      "CUDA fp32 auto bf16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the runtimes "
                                                               "(0: torch's default, one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--refine", default="none", choices=["none", "guided", "auto"],
                        help="none (default): the network alone; guided: with the guided refinement; auto: as the model recommends")
    parser.add_argument("--row", help=argparse.SUPPRESS)   # internal: run one row, print JSON
    args = parser.parse_args(argv)
    if args.row:
        backend, size, batch = args.row.split(",")
        print(json.dumps(measure(args.model, args.device, backend, int(size), int(batch), args.threads,
                                 args.repeats, args.refine)))
        return 0
    import torch

    cuda = args.device.startswith("cuda")
    backends = _usable_backends(args.backends or (["fp32", "auto", "bf16"] if cuda else
                                                  ["fp32", "auto", "bf16", "openvino", "onnxruntime"]), args.device)
    if "fp32" not in backends:
        backends.insert(0, "fp32")
    env = dict(os.environ)
    tmp_cache = tempfile.TemporaryDirectory()     # runtime networks: converted once per run, then cached
    env.setdefault("SPECKLE2SELF_CACHE_DIR", tmp_cache.name)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = {}                     # (backend, size, batch) -> list of rows, one per round
    order = []                       # every row in the order it ran
    with tempfile.TemporaryDirectory() as tmp:
        model = _model_path(args, Path(tmp))
        for _round in range(args.rounds):
            for size in args.sizes:
                for batch in args.batches:
                    for backend in backends:
                        cmd = [sys.executable, __file__, "--model", model, "--device", args.device,
                               "--threads", str(args.threads), "--repeats", str(args.repeats), "--refine", args.refine,
                               "--row", f"{backend},{size},{batch}"]
                        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                        if done.returncode:
                            print(f"row {backend} {size} {batch} failed: {done.stderr.strip()[-300:]}",
                                  file=sys.stderr)
                            continue
                        row = json.loads(done.stdout.strip().splitlines()[-1])
                        results.setdefault((backend, size, batch), []).append(row)
                        order.append(row)

    def ms(key):
        return statistics.median(r["ms"] for r in results[key])

    def ratio(key):
        base = results.get(("fp32",) + key[1:], [])
        pairs = [r["ms"] / b["ms"] for r, b in zip(results[key], base)]
        return statistics.median(pairs) if pairs else float("nan")

    device = torch.cuda.get_device_name() if cuda else \
        f"CPU, {args.threads or torch.get_num_threads()} thread(s), {os.cpu_count()} logical cores"
    name = Path(model).name if args.model else f"untrained width {args.width} depth {args.depth} ({args.upsample})"
    print(f"model: {name}; refine: {args.refine}; device: {device}; median of {args.repeats} repeats, "
          f"{args.rounds} round(s)\n")
    print("| backend | frame | batch | ms/frame | frames/s | ratio to fp32 | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|")
    for key in sorted(results, key=lambda k: (k[1], k[2], backends.index(k[0]))):
        runs = results[key][0].get("runs", key[0])
        label = f"{key[0]} ({runs})" if runs != key[0] else key[0]
        print(f"| {label} | {key[1]}x{key[1]} | {key[2]} | {ms(key):.1f} | {1000 / ms(key):.1f} | "
              f"{ratio(key):.2f} | {max(r['peak_mb'] for r in results[key]):.0f} |")
    print("\n| backend | frame | batch 1 ms/frame | best batch | best ms/frame | ratio to fp32 (best batch) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for backend in backends:
            keys = [k for k in results if k[0] == backend and k[1] == size]
            if not keys:
                continue
            best = min(keys, key=ms)
            one = f"{ms((backend, size, 1)):.1f}" if (backend, size, 1) in results else "-"
            print(f"| {backend} | {size}x{size} | {one} | {best[2]} | {ms(best):.1f} | {ratio(best):.2f} |")
    print("\nmodel load s (first row: includes converting the network for a runtime; later rows: cached): " +
          "; ".join(f"{b} {loads[0]:.1f} / {statistics.median(loads[1:] or loads):.1f}" for b in backends
                    for loads in [[r["load_s"] for r in order if r["backend"] == b]] if loads))
    tmp_cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
