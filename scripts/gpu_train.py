#!/usr/bin/env python3
"""Train three Speckle2Self models at once on one GPU and time them.

On the GPU machine (through ``bash scripts/gpu_session.sh``, which also logs)::

    python3 scripts/gpu_train.py --data .gpu_data --out results/ --minutes 7

First, on a machine with the data, fill ``.gpu_data`` with the carotid tuning images::

    python scripts/gpu_train.py --prepare [--source DIR]        (= bash scripts/gpu_session.sh --prepare)

Runs, each in its own process on the one GPU, for ``--minutes`` of wall-clock training
(warm-up + cosine learning rate over that budget, bf16 autocast on CUDA through the library):

* ``a``: the paper-size net: width 32, depth 4, transposed-conv decoder, InstanceNorm + ReLU
  head, scales 1, 0.5, 0.25; batch 16, 256x256 crops, lr 1e-3;
* ``b``: the bundled default model's network (v4: v3's width 16, depth 2, resize decoder,
  norm_leaky head, factors 1, 0.25, 0.125) fine-tuned as ``speckle2self train --init`` does,
  with v3's edge-aware consistency (0.0075); batch 32, 256x256 crops, lr 5e-4;
* ``c``: the v2 architecture from scratch; batch 32, 256x256 crops, lr 1e-3.

The training loop, loss, checkpoint, export and, on the GPU, the crop sampler are the library's
(``Speckle2SelfLib.engine.training.train`` and ``DeviceFramePool``: the same frames, views, crop
positions, rotations, flips, per-view stretching and contrast rule as ``FramePool.sample``,
without a CPU round trip per sample; ``speckle2self train --device cuda`` uses it too).
``--sampler library`` draws the crops on the CPU with ``FramePool.sample``.

Writes to ``--out`` (at most 8 files): one TorchScript model per
run with the library's metadata (as ``speckle2self train`` writes it, plus the command in
``training.command``), ``summary.json`` and ``summary.md`` (steps, training images/s, final
loss, GPU inference ms per 512x512 frame in fp32 and bf16 at batch 1 and 16, also for the
bundled default), and ``preview.png`` (one training frame: input, then each model's output).
Every model recommends the bundled default's guided refinement (run b inherits it, a and c get it
written into their metadata), so back on the CPU ``benchmarks/model_selection.py --refine`` scores
each network both ways: as the guide of the default's smoothing, and alone.
Needs python3 with torch, numpy and pillow only (no SimpleITK, pydicom, vtk or slicer).
``--toy --device cpu`` runs the same code at toy size on a CPU (the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))

from Speckle2SelfLib.engine.models import MODELS_DIR, bundled_models  # noqa: E402
from Speckle2SelfLib.engine.training import DeviceFramePool, FramePool  # noqa: E402,F401 (the engine's GPU sampler)


def _bundled_default() -> Path:
    """The default model's file as models.json lists it (checked by run b before it starts)."""
    entry = next((e for e in bundled_models() if e.get("default")), None)
    return MODELS_DIR / (entry["file"] if entry else "models.json lists no default model")


BUNDLED_DEFAULT = _bundled_default()
DEFAULT_SOURCE = Path("/work/train_data/tuning")
IMAGE_SUFFIXES = (".png",)
#: The results folder is kept small and few-filed, so it copies quickly off a GPU machine.
MAX_OUT_FILES = 8
#: Largest output file written in one piece (16 MiB, less a margin). The paper-size
#: model (4.2 M fp32 weights) is 16.2 MiB as written: it travels deflate-compressed (the library
#: and torch.jit.load read that as is), or split into parts as a last resort.
RETURN_LIMIT = 16 * 2**20 - 2**16

#: The runs: model file, architecture (None: the init model's), batch and learning rate.
RUNS = {
    "a": dict(file="gpu-a-w32-d4-paper.pt", batch=16, lr=1e-3, init=None,
              arch=dict(width=32, depth=4, upsample="transposed", head="norm_relu"),
              what="paper-size net (width 32, depth 4, transposed decoder, norm_relu head) from scratch"),
    "b": dict(file="gpu-b-w16-d2-default-finetune.pt", batch=32, lr=5e-4, init=BUNDLED_DEFAULT, arch=None,
              edge_sigma=0.0075, what=f"bundled default ({BUNDLED_DEFAULT.stem}) fine-tuned"),
    "c": dict(file="gpu-c-w16-d2-scratch.pt", batch=32, lr=1e-3, init=None,
              arch=dict(width=16, depth=2, upsample="resize", head="norm_relu"),
              what="v2 architecture (width 16, depth 2, resize decoder, norm_relu head) from scratch"),
}


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ----------------------------------------------------------------------------- data

def list_images(folder) -> list:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []


def load_frames(folder, max_frames=None, min_side: int = 32):
    """(frames as float32 [0, 1], summary) of every PNG in ``folder``, read by the engine
    (FramePool.from_paths: the library's readers, small and flat frames left out)."""
    paths = list_images(folder)
    if max_frames and len(paths) > max_frames:
        paths = [paths[k] for k in np.unique(np.linspace(0, len(paths) - 1, max_frames).round().astype(int))]
    pool = FramePool.from_paths([str(p) for p in paths], min_side=min_side)
    summary = dict(pool.summary)
    kept = [p.name for p in paths if p.name not in set(summary.get("skipped", []))]
    summary["subjects"] = len({name.rsplit("_", 1)[0] for name in kept})    # carotid names: <subject>_<frame>.png
    source = Path(folder) / "SOURCE.json"
    if source.is_file():
        summary["source"] = json.loads(source.read_text()).get("description")
    summary["masks_used"] = False
    return pool.frames, summary


# ----------------------------------------------------------------------------- one run (a process)

def run_config(key: str, args):
    """(TrainConfig, init model path or None) for run ``key``."""
    from Speckle2SelfLib.engine.training import TrainConfig, config_from_model

    spec = RUNS[key]
    batch, crop = spec["batch"], args.crop
    if args.toy:
        batch, crop = min(batch, 4), 64
    cuda = args.device_resolved.startswith("cuda")
    settings = dict(crop=crop, batch=batch, lr=spec["lr"], lr_schedule="cosine", minutes=args.minutes,
                    steps=args.steps, seed=args.seed, device=args.device_resolved, amp=cuda and not args.no_amp,
                    checkpoint_every=1000, preview_every=0, name=Path(spec["file"]).stem,
                    warmup_steps=args.warmup_steps)
    if "edge_sigma" in spec:
        settings["edge_sigma"] = spec["edge_sigma"]
    if spec["init"] is not None:
        return config_from_model(spec["init"], **settings), str(spec["init"])
    return TrainConfig(scales=[1.0, 0.5, 0.25], **spec["arch"], **settings), None


def add_training_fields(path, fields, top: Optional[dict] = None) -> None:
    """Add ``fields`` to a model's metadata["training"] and ``top`` to the metadata itself
    (the weights and their checksum stay; the library's checked rewrite)."""
    from Speckle2SelfLib.engine.models import rewrite_metadata

    def change(meta):
        meta.setdefault("training", {}).update(fields)
        meta.update(top or {})
        return meta

    rewrite_metadata(path, path, change)


def fit_for_return(model, out_dir, limit: int = RETURN_LIMIT) -> list:
    """Copy a model file into ``out_dir`` so that every file stays within ``limit`` bytes.

    Small models are copied as they are; a larger one is rewritten as a deflate-compressed zip
    (the same archive; load_model reads it and checks its weights); if that is still too
    large, it is split into ``<name>.part0``, ``.part1``, ... (``cat <name>.part* > <name>``).
    Returns the names written.
    """
    import zipfile

    from Speckle2SelfLib.engine.models import load_model

    model, out_dir = Path(model), Path(out_dir)
    target = out_dir / model.name
    if model.stat().st_size <= limit:
        shutil.copyfile(model, target)
        return [target.name]
    packed = Path(str(target) + ".zip.part")
    with zipfile.ZipFile(model) as zin, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    try:
        load_model(packed)                  # torch reads the compressed archive; the weights check out
        readable = True
    except Exception as err:                # noqa: BLE001 -- fall back to the uncompressed file
        log(f"note: the deflated {model.name} does not load ({err}); splitting the original instead")
        readable = False
    source = packed if readable else model
    if source.stat().st_size <= limit:
        packed.replace(target)
        return [target.name]
    names, data = [], source.read_bytes()
    for k in range(0, len(data), limit):
        part = out_dir / f"{model.name}.part{k // limit}"
        part.write_bytes(data[k:k + limit])
        names.append(part.name)
    packed.unlink(missing_ok=True)
    log(f"note: {model.name} is {len(data) / 2**20:.1f} MiB even compressed; written as {len(names)} parts "
        f"(cat {model.name}.part* > {model.name})")
    return names


def train_one(key: str, args, scratch: str, stop_at: float) -> None:
    """One run in its own process: train, export to scratch, add the command, copy to --out,
    write scratch/<key>.json with what happened."""
    result = {"run": key, "what": RUNS[key]["what"], "ok": False}
    result_path = Path(scratch) / f"{key}.json"
    try:
        import torch

        from Speckle2SelfLib.engine.training import train

        torch.set_num_threads(args.threads)
        if args.device_resolved.startswith("cuda"):
            torch.backends.cudnn.benchmark = True
        cfg, init = run_config(key, args)
        frames, summary = load_frames(args.data, args.max_frames)
        if args.sampler == "device":
            pool = DeviceFramePool(frames, summary, args.device_resolved, cfg.crop, cfg.rotate_degrees)
        else:
            pool = FramePool(frames, summary)
        log(f"[{key}] {RUNS[key]['what']}: {len(frames)} frames, width {cfg.width} depth {cfg.depth} "
            f"{cfg.upsample} {cfg.head}, batch {cfg.batch}, crop {cfg.crop}, lr {cfg.lr} {cfg.lr_schedule}, "
            f"amp {cfg.amp}, device {cfg.device}, sampler {args.sampler}" + (f", init {Path(init).name}" if init else ""))
        marks = {"last_log": time.monotonic(), "warm": None}
        warm_step = 10 if args.steps is None or args.steps > 20 else 1

        def on_step(state):
            now = time.monotonic()
            if state.step == warm_step:
                marks["warm"] = (state.step, now)
            if state.step == 1 or now - marks["last_log"] >= args.log_every:
                marks["last_log"] = now
                loss = state.last_loss
                log(f"[{key}] step {state.step} {state.elapsed_s / 60:.2f} min loss {loss['total']:.4f} "
                    f"(rec {loss['reconstruction']:.4f} cons {loss['consistency']:.4f}) "
                    f"{state.step * cfg.batch / max(state.elapsed_s, 1e-9):.0f} img/s")
            marks["end"] = (state.step, now)

        out_scratch = Path(scratch) / RUNS[key]["file"]
        started = time.monotonic()
        net, state = train(cfg, pool, out_scratch, progress=False, on_step=on_step, init_model=init,
                           should_stop=lambda: time.time() >= stop_at,
                           sampler="auto" if args.sampler == "device" else "host")
        train_s = time.monotonic() - started
        command = (f"python3 scripts/gpu_train.py --data {args.data} --minutes {args.minutes} --runs {key}"
                   + (" --toy" if args.toy else "") + (f" --steps {args.steps}" if args.steps else ""))
        add_training_fields(out_scratch, {"command": command, "sampler": args.sampler,
                                          "run": f"{key}: {RUNS[key]['what']}"},
                            top=None if init else default_recommendation())
        written = fit_for_return(out_scratch, args.out)
        steady = None
        if marks["warm"] and marks.get("end") and marks["end"][0] > marks["warm"][0]:
            (s0, t0), (s1, t1) = marks["warm"], marks["end"]
            steady = (s1 - s0) * cfg.batch / max(t1 - t0, 1e-9)
        result.update(
            ok=True, file=RUNS[key]["file"], files_written=written,
            file_mib=round(out_scratch.stat().st_size / 2**20, 2), steps=state.step, minutes=round(state.elapsed_s / 60, 3),
            images_per_s=round(state.step * cfg.batch / max(state.elapsed_s, 1e-9), 1),
            images_per_s_after_warmup=round(steady, 1) if steady else None,
            steps_per_s=round(state.step / max(state.elapsed_s, 1e-9), 2),
            final_loss={k: round(v, 5) for k, v in state.last_loss.items()},
            view_difference=pool.summary.get("view_difference"),
            stopped_by_deadline=time.time() >= stop_at, setup_and_export_s=round(train_s - state.elapsed_s, 1),
            config=dict(width=cfg.width, depth=cfg.depth, upsample=cfg.upsample, head=cfg.head,
                        scales=list(cfg.scales), batch=cfg.batch, crop=cfg.crop, lr=cfg.lr,
                        lr_schedule=cfg.lr_schedule, amp=cfg.amp, init=Path(init).name if init else None),
            frames=len(frames),
            peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if args.device_resolved.startswith("cuda") else None)
        log(f"[{key}] done: {state.step} steps in {state.elapsed_s / 60:.2f} min, "
            f"{result['images_per_s']} img/s, final loss {state.last_loss.get('total', float('nan')):.4f}")
    except BaseException as err:      # noqa: BLE001 -- recorded for the summary, the other runs go on
        result["error"] = "".join(traceback.format_exception_only(type(err), err)).strip()
        result["traceback"] = traceback.format_exc()[-3000:]
        log(f"[{key}] FAILED: {result['error']}\n{result['traceback']}")
    result_path.write_text(json.dumps(result, indent=2))


def default_recommendation() -> dict:
    """The bundled default's refinement keys (refine, sigma, range, power), {} where it has none."""
    from Speckle2SelfLib.engine.models import read_metadata
    from Speckle2SelfLib.engine.refine import recommendation

    try:
        return recommendation(read_metadata(BUNDLED_DEFAULT)) if BUNDLED_DEFAULT.is_file() else {}
    except ValueError:
        return {}


def _worker(key: str, args_dict: dict, scratch: str, stop_at: float) -> None:
    train_one(key, argparse.Namespace(**args_dict), scratch, stop_at)


# ----------------------------------------------------------------------------- timing and preview

def _time(fn, sync, warmup: int, min_s: float, max_iters: int) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls), synchronised."""
    for _ in range(warmup):
        fn()
    sync()
    iters, start = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        if iters >= max_iters or (iters >= 3 and time.perf_counter() - start >= min_s):
            break
    sync()
    return (time.perf_counter() - start) / iters


def benchmark_model(path, device: str, size: int, batches, toy: bool) -> dict:
    """Network ms per frame (fp32 and bf16 autocast, each batch) and the engine's end to end."""
    import torch

    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.engine.models import load_model

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warmup, min_s, max_iters = (1, 0.0, 1) if toy else (5, 1.0, 200)
    loaded = load_model(path, "cpu")
    module = loaded.module.to(device)
    if cuda:
        module = module.to(memory_format=torch.channels_last)
    out = {"frame": f"{size}x{size}", "parameters": sum(p.numel() for p in loaded.module.parameters())}
    for precision in ("fp32", "bf16"):
        for batch in batches:
            x = torch.rand(batch, 1, size, size, device=device)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)

            def call():
                with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=torch.bfloat16,
                                                            enabled=precision == "bf16"):
                    module(x)
            out[f"net_{precision}_b{batch}_ms_per_frame"] = round(1000 * _time(call, sync, warmup, min_s, max_iters)
                                                                  / batch, 3)
    frames = np.random.default_rng(0).integers(0, 256, (max(batches), size, size), dtype=np.uint8)
    for backend in ("fp32", "auto"):
        engine = Despeckler(loaded, device, backend)
        seconds = _time(lambda: engine.denoise(frames, batch_size=len(frames), working_scale=None), sync,
                        warmup, min_s / 2, max(1, max_iters // 4))
        out[f"engine_{backend}_b{len(frames)}_ms_per_frame"] = round(1000 * seconds / len(frames), 3)
    if cuda:
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def write_preview(models: dict, data: str, device: str, path) -> None:
    """One training frame, then each model's output (working scale 1), side by side with labels."""
    from PIL import Image, ImageDraw

    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.fileio.imageio import read_frames

    frame = read_frames(list_images(data)[0]).frames[0]
    frame = np.clip(np.rint(frame), 0, 255).astype(np.uint8) if frame.dtype != np.uint8 else frame
    panels = [("input", frame)]
    for label, model in models.items():
        panels.append((label, Despeckler.from_file(model, device).denoise(frame, working_scale=None)))
    gap = np.full((frame.shape[0], 6), 255, np.uint8)
    strip = np.concatenate([p for _, panel in panels for p in (panel, gap)][:-1], axis=1)
    image = Image.fromarray(strip)
    draw = ImageDraw.Draw(image)
    for k, (label, _) in enumerate(panels):
        draw.text((k * (frame.shape[1] + 6) + 4, 4), label, fill=255)
    image.save(path)


# ----------------------------------------------------------------------------- summary

def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"# GPU training session ({summary.get('status')})", "",
             f"host: {summary['host'].get('gpu') or summary['host'].get('device')}; torch "
             f"{summary['host'].get('torch')}; data: {summary.get('data', {}).get('frames')} frames; "
             f"minutes per run: {summary['args'].get('minutes')}", ""]
    runs = summary.get("runs", {})
    if runs:
        lines += ["| run | model file | steps | minutes | img/s | img/s after warm-up | final loss | "
                  "view difference | peak GPU GB |", "|---|---|---|---|---|---|---|---|---|"]
        for key, r in runs.items():
            if r.get("ok"):
                lines.append(f"| {key}: {r['what']} | {r['file']} | {r['steps']} | {r['minutes']} | "
                             f"{r['images_per_s']} | {r.get('images_per_s_after_warmup')} | "
                             f"{r['final_loss'].get('total')} | {r.get('view_difference')} | "
                             f"{r.get('peak_gpu_memory_gb')} |")
            else:
                lines.append(f"| {key}: {r.get('what')} | FAILED: {r.get('error', '?')[:200]} | | | | | | | |")
    bench = summary.get("benchmark", {})
    if bench:
        keys = sorted({k for b in bench.values() if isinstance(b, dict) for k in b if k.endswith("ms_per_frame")})
        lines += ["", f"Inference, ms per frame ({next(iter(bench.values())).get('frame', '?')}, "
                      "torch.cuda.synchronize, after warm-up; net = the TorchScript network alone, engine = "
                      "Despeckler.denoise on uint8 frames incl. transfers):", "",
                  "| model | " + " | ".join(k.replace("_ms_per_frame", "") for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for name, b in bench.items():
            if isinstance(b, dict) and "error" not in b:
                lines.append(f"| {name} | " + " | ".join(str(b.get(k, "")) for k in keys) + " |")
            else:
                lines.append(f"| {name} | FAILED: {b.get('error', '?') if isinstance(b, dict) else b} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- prepare (on the CPU machine)

def prepare(dest, source=None) -> int:
    """Copy the tuning-subject PNGs (real copies, links resolved) into ``dest`` with a SOURCE.json.

    Without ``source`` the images are those of ``benchlib.carotid_data.cases("tuning")`` (the
    benchmark's subject split; ../shared or $SPECKLE2SELF_SHARED), else of DEFAULT_SOURCE. A
    source folder holding an image of a test subject is refused.
    """
    sys.path.insert(0, str(ROOT / "benchmarks"))
    test_names, tuning_cases = set(), None
    try:
        from benchlib import carotid_data

        tuning_cases = carotid_data.cases("tuning")
        test_names = {c.image.name for c in carotid_data.cases("test")}
    except (ImportError, FileNotFoundError) as err:
        print(f"note: the carotid split is not available here ({err}); test-subject check skipped", file=sys.stderr)
    if source is None and tuning_cases:
        files = [c.image for c in tuning_cases]
        subjects = sorted({c.subject for c in tuning_cases})
        how = "benchlib.carotid_data.cases('tuning')"
        origin = str(carotid_data.carotid_dir())
    else:
        origin = Path(source) if source is not None else DEFAULT_SOURCE
        files = list_images(origin)
        if not files:
            print(f"error: no PNG images in {origin}", file=sys.stderr)
            return 2
        subjects = sorted({p.stem.rsplit("_", 1)[0] for p in files})
        how = f"every PNG of {origin}"
        origin = str(origin)
    leaked = sorted(p.name for p in files if p.name in test_names)
    if leaked:
        print(f"error: {len(leaked)} image(s) of the held-out test subjects in the source "
              f"(e.g. {leaked[0]}); only tuning subjects may train", file=sys.stderr)
        return 2
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    total = 0
    for path in files:
        shutil.copyfile(path, dest / path.name)     # follows links: real copies travel
        total += (dest / path.name).stat().st_size
    info = {"description": "real in-vivo transverse carotid B-mode (Mindray UMT-500Plus, L13-3s), the tuning "
                           "subjects of benchmarks/benchlib/carotid_data.py (test subjects never used)",
            "selection": how, "origin": origin, "files": len(files), "bytes": total, "subjects": subjects,
            "test_images_excluded": len(test_names), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (dest / "SOURCE.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"{dest}: {len(files)} PNGs of {len(subjects)} subjects, {total / 2**20:.1f} MiB ({how})")
    if total > 56 * 2**20:
        print("warning: over 56 MiB; with the repository it may not fit the 64 MiB that travels", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", action="store_true", help="fill --data with the tuning images (on the CPU machine)")
    p.add_argument("--source", help="with --prepare: a folder of PNGs instead of the carotid tuning split")
    p.add_argument("--data", default=str(ROOT / ".gpu_data"), help="folder of training PNGs (default .gpu_data)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock training budget of each run (default 7)")
    p.add_argument("--session-minutes", type=float, default=9.5,
                   help="hard limit for the whole script: training stops in time for export and timing (default 9.5)")
    p.add_argument("--steps", type=int, default=None, help="also stop each run after this many steps")
    p.add_argument("--runs", default="a,b,c", help="comma-separated runs among a, b, c (default all)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--sampler", default="device", choices=["device", "library"],
                   help="draw crops on the training device (default) or with FramePool.sample on the CPU")
    p.add_argument("--no-amp", action="store_true", help="train in fp32 on CUDA too")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--max-frames", type=int, default=None, help="use at most this many images (evenly spaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / runs)")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--bench-size", type=int, default=512)
    p.add_argument("--no-bench", action="store_true", help="skip the inference timing and the preview")
    p.add_argument("--toy", action="store_true",
                   help="toy size for a CPU check: crop 64, batch <= 4, <= 8 frames, 64x64 timing frames")
    args = p.parse_args(argv)
    if args.toy:
        args.max_frames = min(args.max_frames or 8, 8)
        args.bench_size = min(args.bench_size, 64)
        args.log_every = min(args.log_every, 5.0)
        args.warmup_steps = min(args.warmup_steps, 2)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.data, args.source)
    session_start = time.time()
    if not args.out:
        print("error: give --out or set $OUT", file=sys.stderr)
        return 2
    images = list_images(args.data)
    if not images:
        print(f"error: no PNG images in {args.data}; run `bash scripts/gpu_session.sh --prepare` on the CPU "
              "machine first and carry [\".gpu_data\"]", file=sys.stderr)
        return 2
    runs = [k.strip() for k in args.runs.split(",") if k.strip()]
    unknown = [k for k in runs if k not in RUNS]
    if unknown or not runs:
        print(f"error: unknown run(s) {unknown}; choose among {', '.join(RUNS)}", file=sys.stderr)
        return 2
    if "b" in runs and not BUNDLED_DEFAULT.is_file():
        print(f"error: run b needs {BUNDLED_DEFAULT}", file=sys.stderr)
        return 2
    import multiprocessing as mp

    import torch

    from Speckle2SelfLib.engine.inference import pick_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.device_resolved = pick_device(args.device)
    cuda = args.device_resolved.startswith("cuda")
    if args.threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        args.threads = int(env) if env and env.isdigit() else max(1, (os.cpu_count() or 1) // len(runs))
    host = {"python": platform.python_version(), "torch": torch.__version__, "device": args.device_resolved,
            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "threads_per_run": args.threads,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "bf16": torch.cuda.is_bf16_supported() if cuda else None}
    summary = {"status": "training", "host": host, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                             for k, v in vars(args).items()},
               "data": {"folder": str(args.data), "frames": len(images) if not args.max_frames
                        else min(len(images), args.max_frames)}, "runs": {}}
    source = Path(args.data) / "SOURCE.json"
    if source.is_file():
        summary["data"]["source"] = json.loads(source.read_text())
    write_summary(out, summary)
    log(f"host: {host}")
    log(f"runs {', '.join(runs)} for {args.minutes} min each on {args.device_resolved}; "
        f"{summary['data']['frames']} images from {args.data}")

    deadline = session_start + 60 * args.session_minutes
    stop_at = deadline - (15 if args.toy else 100)         # leave time for export, timing, preview
    scratch = tempfile.mkdtemp(prefix="gpu_train_")
    try:
        ctx = mp.get_context("spawn")                        # CUDA in child processes needs spawn
        args_dict = {k: v for k, v in vars(args).items()}
        procs = {}
        for key in runs:
            proc = ctx.Process(target=_worker, args=(key, args_dict, scratch, stop_at), name=f"run-{key}")
            proc.start()
            procs[key] = proc
        kill_at = deadline - (10 if args.toy else 60)
        results = {key: Path(scratch) / f"{key}.json" for key in runs}
        while time.time() < kill_at and any(p.is_alive() and not results[k].is_file() for k, p in procs.items()):
            time.sleep(0.5)
        for key, proc in procs.items():
            proc.join(max(5.0, min(30.0, deadline - time.time())) if results[key].is_file() else 1.0)
            if proc.is_alive():
                if not results[key].is_file():
                    log(f"[{key}] still running at the session limit: terminated")
                proc.terminate()
                proc.join(10)
            result_path = results[key]
            summary["runs"][key] = json.loads(result_path.read_text()) if result_path.is_file() else \
                {"run": key, "what": RUNS[key]["what"], "ok": False,
                 "error": f"the process ended without a result (exit code {proc.exitcode})"}
        summary["status"] = "trained"
        summary["training_wall_s"] = round(time.time() - session_start, 1)
        write_summary(out, summary)

        # Timed from the uncompressed copies in scratch (what was written to --out may be compressed).
        models = {RUNS[k]["file"]: Path(scratch) / RUNS[k]["file"] for k, r in summary["runs"].items() if r.get("ok")}
        if BUNDLED_DEFAULT.is_file():
            models["bundled default (reference)"] = BUNDLED_DEFAULT
        if not args.no_bench:
            summary["benchmark"] = {}
            batches = (1, 2) if args.toy else (1, 16)
            for name, path in models.items():
                if time.time() > deadline - 20:
                    summary["benchmark"][name] = {"error": "skipped: session time limit"}
                    continue
                try:
                    summary["benchmark"][name] = benchmark_model(path, args.device_resolved, args.bench_size,
                                                                 batches, args.toy)
                    log(f"timing {name}: {summary['benchmark'][name]}")
                except Exception as err:          # noqa: BLE001 -- recorded, the others go on
                    summary["benchmark"][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
                    log(f"timing {name} FAILED: {err}")
                write_summary(out, summary)
            if time.time() < deadline - 10:
                try:
                    labels = {Path(n).stem if n.endswith(".pt") else "bundled default": p for n, p in models.items()}
                    write_preview(labels, args.data, args.device_resolved, out / "preview.png")
                except Exception as err:          # noqa: BLE001
                    log(f"preview FAILED: {err}")
        summary["status"] = "done"
        summary["wall_s"] = round(time.time() - session_start, 1)
        summary["files"] = sorted(p.name for p in out.iterdir())
        write_summary(out, summary)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    log(f"wrote {len(files)} file(s) to {out}: {', '.join(files)}")
    if len(files) > MAX_OUT_FILES:
        log(f"warning: more than {MAX_OUT_FILES} files in {out}; copying it off the GPU machine may take long")
    failed = [k for k, r in summary["runs"].items() if not r.get("ok")]
    if failed:
        log(f"runs failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
