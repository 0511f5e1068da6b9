#!/usr/bin/env python3
"""Archive throughput on Dask: frames/s of a plain loop and of 1, 2, ... Dask workers.

    python benchmarks/archive.py                   # 24 single-frame 384x384 PNGs, the bundled default model
    python benchmarks/archive.py --files 48 --size 512 --workers 1 2 4

Every row despeckles the same synthetic archive (Rayleigh speckle over bands, written once)
with the same task function (``Speckle2SelfLib.engine.archive.despeckle_file``: read, despeckle,
write atomically), one torch thread per worker:

* ``plain loop``: that function called file after file in this process (what the
  single-process folder run does), one torch thread;
* ``dask N x 1``: a ``LocalCluster`` of N worker processes with one thread each; the cluster is
  started and every worker has loaded the model (a warm-up file each) before the clock starts,
  so the row is the steady-state rate; the start-up is its own column.

Prints a markdown table: seconds, frames/s, speed-up over one worker, and Dask's overhead per
file against the plain loop at the same thread count ((dask 1 x 1 time - plain time) / files).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))


def make_archive(folder: Path, files: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rows = np.linspace(0, 1, size)[:, None]
    for k in range(files):
        bands = 50 + 150 * (((rows * (4 + k % 5)) % 1.0) > 0.5) * np.ones((1, size))
        frame = np.clip(bands * rng.rayleigh(0.8, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(frame).save(folder / f"scan{k:04d}.png")


def tasks_for(src: Path, out: Path, setup: dict):
    from Speckle2SelfLib.engine.archive import Task, fingerprint, options_record

    return [Task(str(p), [str(out / p.name)], {**fingerprint(p), "model_sha256": setup["model_sha256"],
                                                 "options": options_record(setup["options"])})
            for p in sorted(src.glob("*.png"))]


@contextmanager
def _given(client):
    yield client


def run_plain(src: Path, out: Path, setup: dict) -> float:
    import torch
    from Speckle2SelfLib.engine.archive import _worker_engine, despeckle_file

    torch.set_num_threads(1)
    _worker_engine(setup)                       # the model loaded before the clock starts, as on the workers
    tasks = tasks_for(src, out, setup)
    t0 = time.perf_counter()
    for task in tasks:
        result = despeckle_file({"input": task.input, "outputs": task.outputs}, setup)
        assert result["status"] == "done", result
    seconds = time.perf_counter() - t0
    return seconds, seconds / len(tasks)


def run_dask(src: Path, out: Path, setup: dict, workers: int, tmp: Path) -> tuple:
    from Speckle2SelfLib.engine.archive import Manifest, dask_client, despeckle_file, run_tasks

    t0 = time.perf_counter()
    with dask_client(workers) as client:
        client.wait_for_workers(workers)
        # one warm-up file per worker: each loads the model (once per worker process)
        client.run(_load_model, setup)
        startup = time.perf_counter() - t0
        manifest = Manifest(tmp / f"manifest-{workers}.jsonl")
        summary = run_tasks(lambda: _given(client), tasks_for(src, out, setup), despeckle_file, setup, manifest,
                            progress=False)
    assert not summary.failed, summary.failed
    in_task = sum(float(r["seconds"]) for r in summary.results) / max(1, len(summary.results))
    return summary.seconds, startup, in_task


def _load_model(setup):
    from Speckle2SelfLib.engine.archive import _worker_engine
    _worker_engine(setup)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default=None, help="model file or bundled name (default: the bundled default)")
    parser.add_argument("--refine", default="auto", choices=["auto", "guided", "none"])
    args = parser.parse_args(argv)

    from Speckle2SelfLib.engine.archive import denoise_setup

    options = dict(batch_size=None, gamma=None, blend=0.0, working_scale="auto", grey_levels="auto",
                   refine=args.refine)
    setup = denoise_setup(args.model, "cpu", "fp32", options, threads=1)
    tmp = Path(tempfile.mkdtemp(prefix="s2s-archive-bench-"))
    try:
        src = tmp / "archive"
        make_archive(src, args.files, args.size)
        rows = []
        plain, per_file = run_plain(src, tmp / "plain", setup)
        rows.append(("plain loop, 1 thread", plain, None, None, per_file))
        timed = {}
        for n in args.workers:
            seconds, startup, in_task = run_dask(src, tmp / f"out{n}", setup, n, tmp)
            timed[n] = seconds
            rows.append((f"dask {n} worker(s) x 1 thread", seconds, startup, n, in_task))
        frames = args.files
        print(f"\n{frames} files of one {args.size}x{args.size} frame, model {Path(setup['model']).name}, "
              f"refine {args.refine}, {os.cpu_count()} CPU cores\n")
        print("| run | seconds | frames/s | speed-up vs 1 worker | ms per file inside the task | cluster start-up s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, seconds, startup, n, in_task in rows:
            speed = f"{timed[1] / seconds:.2f}x" if n and 1 in timed else ""
            start = f"{startup:.1f}" if startup is not None else ""
            print(f"| {name} | {seconds:.2f} | {frames / seconds:.2f} | {speed} | {1000 * in_task:.0f} | {start} |")
        if 1 in timed:
            overhead = (timed[1] - plain) / frames
            print(f"\nDask overhead per file (1 worker x 1 thread vs the plain loop): {overhead * 1000:+.1f} ms "
                  f"({100 * (timed[1] - plain) / plain:+.1f}% of the plain loop's {1000 * plain / frames:.0f} ms/file)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
