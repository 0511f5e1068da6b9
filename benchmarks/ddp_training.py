#!/usr/bin/env python3
"""Training throughput in 1 and N processes (DistributedDataParallel through ``train --nproc``).

    python benchmarks/ddp_training.py                          # CPU, gloo: 1 and 2 processes
    python benchmarks/ddp_training.py --device cuda --nproc 1 2 4 --width 32 --depth 4 --crop 256 --batch 16

Each row runs ``speckle2self train`` on the same synthetic speckle frames for ``--steps`` steps
(per-process batch ``--batch``: N processes train N x batch crops a step) and reads the
exported model's metadata: training minutes (setup and export excluded) and steps. Images/s =
steps x batch x N / seconds; the speed-up is against one process. Each process runs ``--threads``
torch threads (default 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))


def make_frames(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = np.linspace(0, 1, size)[:, None]
    for k in range(n):
        bands = 50 + 150 * (((rows * (4 + k % 5)) % 1.0) > 0.5) * np.ones((1, size))
        Image.fromarray(np.clip(bands * rng.rayleigh(0.8, (size, size)), 0, 255).astype(np.uint8)).save(
            folder / f"f{k}.png")


def run(args, nproc: int, data: Path, out: Path) -> dict:
    from Speckle2SelfLib.engine.models import read_metadata

    threads = args.threads
    cmd = [sys.executable, "-m", "Speckle2SelfLib.cli", "train", str(data), "--out", str(out), "--steps",
           str(args.steps), "--device", args.device, "--crop", str(args.crop), "--batch", str(args.batch),
           "--width", str(args.width), "--depth", str(args.depth), "--checkpoint-every", str(10 ** 6),
           "--preview-every", "0", "--threads", str(threads), "--nproc", str(nproc)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT / "Speckle2Self"))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"nproc {nproc} failed: {done.stderr[-2000:]}")
    training = read_metadata(out)["training"]
    seconds = 60.0 * float(training["minutes_done"])
    images = int(training["steps_done"]) * args.batch * nproc
    return {"seconds": seconds, "images_per_s": images / seconds, "steps": int(training["steps_done"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: on a 2-core "
                        "machine 1 x 1 against 2 x 1; an oversubscribed 2-thread run measures the contention)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="s2s-ddp-bench-"))
    try:
        make_frames(tmp / "data", args.frames, args.size)
        rows = {n: run(args, n, tmp / "data", tmp / f"model{n}.pt") for n in args.nproc}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows.get(1)
    print(f"\n{args.device}, width {args.width} depth {args.depth}, crop {args.crop}, batch {args.batch} per process, "
          f"{args.steps} steps, {args.threads} torch thread(s) per process, {os.cpu_count()} CPU cores\n")
    print("| processes | training s | images/s | speed-up |")
    print("|---:|---:|---:|---:|")
    for n, row in rows.items():
        speed = f"{row['images_per_s'] / base['images_per_s']:.2f}x" if base else ""
        print(f"| {n} | {row['seconds']:.1f} | {row['images_per_s']:.1f} | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
