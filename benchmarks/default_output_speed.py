"""Speed of the default output as a user gets it, against the paper-size network, in one run.

    python benchmarks/default_output_speed.py [--size 512] [--frames 8] [--threads 2] [--rounds 3]
        [--device cpu|cuda] [--model M.pt] [--no-grain]

Rows (each in a fresh process, the same frames, ``Despeckler.denoise`` with its defaults unless
said: grain-matched working scale, batching, the model's recommended refinement):

* default output, backend auto: what the CLI, the API and the module run after the README's setup;
* default output, backend fp32: torch alone;
* default output, fp32 + direct refinement: the reference filter the bilateral grid replaced;
* network only (``refine="none"``), backend auto;
* paper-size network: width 32, depth 4 (the paper's encoder/decoder), untrained, as an eager
  torch module in fp32 on the same frames (network alone: speed does not depend on weights).

Prints ms per frame (median over rounds), frames/s, how many times faster than the paper-size
network the row is (paper-size ms / row ms, per round, median), and the guided refinement's
share of the default output's time (the refinement timed inside the same calls). Frames: real carotid images
cropped to the size (../shared), else simulated speckle.
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
CAROTID = ROOT.parent / "shared" / "data" / "carotid" / "images"
ROWS = {
    "auto": "default output, backend auto",
    "fp32": "default output, backend fp32",
    "direct": "default output, fp32 + direct refinement",
    "network": "network only (refine none), backend auto",
    "paper": "paper-size network (width 32, depth 4), fp32 eager",
}


def frames(size: int, count: int) -> np.ndarray:
    from PIL import Image

    files = sorted(CAROTID.glob("*.png")) if CAROTID.is_dir() else []
    if files:
        picked = []
        for path in files[:: max(1, len(files) // count)][:count]:
            image = Image.open(path).convert("L")
            side = min(image.size)
            image = image.crop((0, 0, side, side)).resize((size, size), Image.BILINEAR)
            picked.append(np.asarray(image))
        return np.stack(picked)
    from Speckle2SelfLib.simulation import simulated_set

    noisy, _clean = simulated_set(count, size, 0, kinds=("carotid", "thyroid"))
    return np.round(np.stack(noisy) * 255).astype(np.uint8)


def _time(run, repeats: int = 3) -> float:
    run()                                     # warm-up: allocations, graph optimisation, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(row: str, size: int, count: int, device: str, model, grain: bool = True) -> dict:
    """One row in this process: seconds per frame, and the backend that ran."""
    import torch

    from Speckle2SelfLib.engine.inference import Despeckler

    stack = frames(size, count)
    if row == "paper":
        from Speckle2SelfLib.engine.device import pick_device
        from Speckle2SelfLib.engine.network import Speckle2SelfNet

        dev = pick_device(device)
        net = Speckle2SelfNet(32, depth=4).inference_module().eval().to(dev)
        x = torch.from_numpy(stack.astype(np.float32)[:, None] / 255.0)

        def run():
            with torch.inference_mode():
                for start in range(0, len(x), 4):
                    net(x[start:start + 4].to(dev)).cpu()
        return {"s": _time(run) / count, "backend": "eager fp32"}
    from Speckle2SelfLib.engine import inference

    spent = [0.0]                       # seconds inside the guided refinement (the grid or the direct filter)
    for name in ("guided_filter", "guided_smoothing"):
        def timed(*args, _run=getattr(inference, name), **kwargs):
            start = time.perf_counter()
            result = _run(*args, **kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            spent[0] += time.perf_counter() - start
            return result
        setattr(inference, name, timed)
    engine = Despeckler.from_file(model, device, backend="auto" if row in ("auto", "network") else "fp32")
    if row == "direct":
        engine.refine_method = "direct"
    refine = "none" if row == "network" else "auto"
    scale = "auto" if grain else None        # None: the frames' own resolution, no grain estimate
    engine.denoise(stack, refine=refine, working_scale=scale)       # warm-up
    totals, refinements = [], []
    for _ in range(3):
        spent[0] = 0.0
        start = time.perf_counter()
        engine.denoise(stack, refine=refine, working_scale=scale)
        totals.append(time.perf_counter() - start)
        refinements.append(spent[0])
    best = totals.index(statistics.median(totals))
    return {"s": totals[best] / count, "refine_s": refinements[best] / count, "backend": engine.backend,
            "refine": engine.last_refine, "working_scale": engine.last_working_scale}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="model file (default: the bundled default)")
    parser.add_argument("--no-grain", action="store_true",
                        help="run at the frames' own resolution (no grain estimate: what a stream or a long cine "
                             "loop pays per frame, the estimate being made once)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.row, args.size, args.frames, args.device, args.model, not args.no_grain)))
        return 0
    # torch.set_num_threads in each row, as an application does; OMP_NUM_THREADS in the environment
    # made the OpenVINO rows 10-30% slower here (OpenMP's and OpenVINO's threads then compete)
    env = dict(os.environ)
    results = {row: [] for row in ROWS}
    shares = {row: [] for row in ROWS}
    refine_ms = {row: [] for row in ROWS}
    info = {}
    for _round in range(args.rounds):
        for row in ROWS:                     # back to back: the ratios compare rows under the same load
            cmd = [sys.executable, __file__, "--row", row, "--size", str(args.size), "--frames", str(args.frames),
                   "--threads", str(args.threads), "--device", args.device] + (["--model", args.model] if args.model else []) \
                + (["--no-grain"] if args.no_grain else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"row {row} failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[row].append(result["s"])
            if result.get("refine_s"):
                shares[row].append(result["refine_s"] / result["s"])
                refine_ms[row].append(1000 * result["refine_s"])
            info[row] = result
    import torch
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU, {args.threads} thread(s), {os.cpu_count()} logical cores"
    grain = "frames' own resolution (--no-grain)" if args.no_grain else "grain-matched working scale (estimated per call)"
    print(f"{args.frames} frames of {args.size}x{args.size}; {where}; {grain}; median of {args.rounds} round(s)\n")
    print("| path | backend | ms / frame | frames/s | x faster than the paper-size network |")
    print("|---|---|---|---|---|")
    for row, label in ROWS.items():
        if not results[row]:
            continue
        ms = 1000 * statistics.median(results[row])
        ratio = statistics.median(p / r for p, r in zip(results["paper"], results[row])) if results["paper"] else float("nan")
        print(f"| {label} | {info[row]['backend']} | {ms:.1f} | {1000 / ms:.1f} | {ratio:.2f} |")
    if shares["auto"]:
        print(f"\nthe guided refinement's share of the default output's time (backend auto, timed inside the "
              f"run): {100 * statistics.median(shares['auto']):.0f}% ({1000 * statistics.median(refine_ms['auto']) / 1000:.1f} "
              f"ms of a frame); working scale {info['auto'].get('working_scale')}, refinement {info['auto'].get('refine')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
