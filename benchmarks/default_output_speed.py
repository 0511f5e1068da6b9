"""Speed of the default output as a user gets it, against the paper-size network, in one run.

    python benchmarks/default_output_speed.py [--size 512] [--frames 8] [--threads 2] [--rounds 3]
        [--device cpu|cuda] [--model M.pt]

Rows (each in a fresh process, the same frames, ``Despeckler.denoise`` with its defaults unless
said: grain-matched working scale, batching, the model's recommended refinement):

* default output, backend auto: what the CLI, the API and the module run after the README's setup;
* default output, backend fp32: torch alone;
* default output, fp32 + direct refinement: the reference filter the bilateral grid replaced;
* network only (``refine="none"``), backend auto;
* paper-size network: width 32, depth 4 (the paper's encoder/decoder), untrained, as an eager
  torch module in fp32 on the same frames (network alone: speed does not depend on weights).

Prints ms per frame (median over rounds), frames/s, how many times faster than the paper-size
network the row is (paper-size ms / row ms, per round, median), and the refinement's share of
the default output's time (1 - network only / default output). Frames: real carotid images
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


def measure(row: str, size: int, count: int, device: str, model) -> dict:
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
    engine = Despeckler.from_file(model, device, backend="auto" if row in ("auto", "network") else "fp32")
    if row == "direct":
        engine.refine_method = "direct"
    refine = "none" if row == "network" else "auto"
    seconds = _time(lambda: engine.denoise(stack, refine=refine))
    return {"s": seconds / count, "backend": engine.backend, "refine": engine.last_refine,
            "working_scale": engine.last_working_scale}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="model file (default: the bundled default)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.row, args.size, args.frames, args.device, args.model)))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    results = {row: [] for row in ROWS}
    info = {}
    for _round in range(args.rounds):
        for row in ROWS:                     # back to back: the ratios compare rows under the same load
            cmd = [sys.executable, __file__, "--row", row, "--size", str(args.size), "--frames", str(args.frames),
                   "--threads", str(args.threads), "--device", args.device] + (["--model", args.model] if args.model else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                print(f"row {row} failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[row].append(result["s"])
            info[row] = result
    import torch
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU, {args.threads} thread(s), {os.cpu_count()} logical cores"
    print(f"{args.frames} frames of {args.size}x{args.size}; {where}; median of {args.rounds} round(s)\n")
    print("| path | backend | ms / frame | frames/s | x faster than the paper-size network |")
    print("|---|---|---|---|---|")
    for row, label in ROWS.items():
        if not results[row]:
            continue
        ms = 1000 * statistics.median(results[row])
        ratio = statistics.median(p / r for p, r in zip(results["paper"], results[row])) if results["paper"] else float("nan")
        print(f"| {label} | {info[row]['backend']} | {ms:.1f} | {1000 / ms:.1f} | {ratio:.2f} |")
    if results["auto"] and results["network"]:
        share = statistics.median(1 - n / d for n, d in zip(results["network"], results["auto"]))
        print(f"\nrefinement share of the default output's time (backend auto): {100 * share:.0f}%; "
              f"working scale {info['auto'].get('working_scale')}, refinement {info['auto'].get('refine')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
