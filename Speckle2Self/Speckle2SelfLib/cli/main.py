"""Command line: ``speckle2self train | denoise | info | export | simulate | segment | demo | stream``.

Every option is checked when it is parsed and every input and output path before any
computation. A failure is one line on stderr (``error: <file>: <cause>``; ``--debug`` adds
the traceback). Exit codes: 0 done; 1 the run failed, or some files of a folder run failed;
2 bad input, options or output paths (nothing computed or written); 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

from .. import __version__
from .exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED

MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".zip")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------- option types

def _number(text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(low: int, why: str = ""):
    def parse(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}{why}")
        return value
    parse.__name__ = f"whole number >= {low}"
    return parse


def int_between(low: int, high: int):
    def parse(text: str) -> int:
        value = _number(text, int)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in {low}..{high}, got {value}")
        return value
    parse.__name__ = f"whole number in {low}..{high}"
    return parse


def float_between(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        value = _number(text)
        if not ((low < value) if low_open else (low <= value)) or not value <= high:
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(f"must lie in {bracket}{low:g}, {high:g}], got {text}")
        return value
    parse.__name__ = "number"
    return parse


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def scales_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (math.isfinite(v) and 0 < v <= 1) for v in values):
        raise argparse.ArgumentTypeError(f"scales must be numbers in (0, 1], got {text!r}")
    return values


def crop_size(text: str) -> int:
    value = _number(text, int)
    if value < 32 or value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 and at least 32, got {value}")
    if value > 4096:
        raise argparse.ArgumentTypeError(f"{value} is larger than any frame worth cropping (at most 4096)")
    return value


def _working_scale_arg(text: str):
    """--working-scale: 'auto', 'off' (None) or a number (range checked by the engine)."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a number, got {text!r}") from None
    from ..engine.grain import SCALE_LIMITS
    if not (math.isfinite(value) and SCALE_LIMITS[0] <= value <= SCALE_LIMITS[1]):
        raise argparse.ArgumentTypeError(f"expected auto, off or a number in [{SCALE_LIMITS[0]:g}, "
                                         f"{SCALE_LIMITS[1]:g}], got {text!r}")
    return value


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="self-supervised training on unlabeled images, volumes, sequences, DICOM")
    p.add_argument("inputs", nargs="+", help="files and/or folders (every readable file, recursively)")
    p.add_argument("--out", required=True, help="TorchScript model to write (a .ckpt and .preview.png go beside it)")
    stop = p.add_argument_group("stopping (at least one)")
    stop.add_argument("--minutes", type=positive_float, help="wall-clock budget, counting resumed time")
    stop.add_argument("--epochs", type=positive_float, help="passes over the frames (one crop per frame per epoch)")
    stop.add_argument("--steps", type=int_at_least(1, " (0 steps would write an untrained model)"), help="optimiser steps")
    p.add_argument("--crop", type=crop_size, help="crop size, a multiple of 16 (default 128)")
    p.add_argument("--width", type=int_between(1, 256), help="base width of the network (paper: 32)")
    p.add_argument("--batch", type=int_between(1, 4096), help="batch size (default and paper: 16)")
    p.add_argument("--lr", type=float_between(0, 10, low_open=True), help="learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="constant (paper) or warm-up + cosine decay over the budget")
    p.add_argument("--scales", type=scales_list, default=None,
                   help="comma-separated perturbation scales (default 1.0,0.5,0.25; with --init: the model's)")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic", "area", "nearest"],
                   help="resampling of the perturbation views (default bilinear)")
    p.add_argument("--upsample", choices=["transposed", "resize"],
                   help="decoder upsampling: transposed convs (paper) or bilinear resize + conv")
    p.add_argument("--shared-encoder", action="store_true", help="one encoder for all scales (ablation)")
    p.add_argument("--depth", type=int_between(2, 6),
                   help="stride-2 stages; 4 (paper) puts the bottleneck at 1/16 resolution")
    p.add_argument("--head", default=None, choices=["linear", "norm_relu", "norm_leaky"],
                   help="output head: linear (clamped; the default), the authors' InstanceNorm + ReLU, or "
                        "InstanceNorm + LeakyReLU (no flat black patches in dark tissue); with --init: the "
                        "model's unless given (any head may replace any other; the rest comes from the model, and a new head's scale and shift start fitted to the views)")
    p.add_argument("--working-scale", type=float_between(0.05, 4.0),
                   help="resample frames by this factor before training (e.g. 0.5 for coarse B-mode speckle)")
    p.add_argument("--augment-prob", type=float_between(0.0, 1.0),
                   help="share of samples rotated after the views are made (default 0.3, as the authors)")
    p.add_argument("--rotate-degrees", type=float_between(0.0, 180.0), help="largest rotation of augmented samples (default 10)")
    p.add_argument("--reconstruction", choices=["mse", "l1"], help="default mse (the paper's)")
    p.add_argument("--consistency", choices=["l1", "mse", "none"], help="default l1 (the paper's)")
    p.add_argument("--consistency-weight", type=float_between(0, 10, low_open=True),
                   help="weight of the consistency term (default and paper: 1); below 1 each output follows its "
                        "own view more: less smoothing (the network's own output keeps more lumen-wall contrast)")
    p.add_argument("--edge-sigma", type=float_between(0, 10, low_open=True),
                   help="edge-aware consistency (not in the paper): weight it by exp(-(|grad|/SIGMA)^2) of the "
                        "coarsest view, so outputs need not agree across walls; e.g. 0.015 on [0, 1] views")
    from ..engine.refine import REFINE_RANGE_POWER_LIMITS    # no torch: the parser stays light

    p.add_argument("--edge-power", type=float_between(*REFINE_RANGE_POWER_LIMITS),
                   help="with --edge-sigma: take the gradient of the view's grey levels raised to this power "
                        "(default 1); 0.5 keeps faint dark boundaries (a lumen's walls) and smooths bright tissue more")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, mps")
    p.add_argument("--no-amp", action="store_true",
                   help="disable mixed precision (CUDA fp16/bf16; CPU bf16 where the CPU has it natively)")
    p.add_argument("--seed", type=int_at_least(0), help="random seed (default 0)")
    p.add_argument("--resume", help="checkpoint (.ckpt) to continue from")
    p.add_argument("--init", help="fine-tune this model (file, bundled name, or 'default'); its architecture "
                                  "replaces --width/--depth/--interpolation/--upsample; --scales and --head "
                                  "replace the model's when given")
    p.add_argument("--checkpoint-every", type=int_at_least(1), help="steps between checkpoints (default 200)")
    p.add_argument("--preview-every", type=int_at_least(0), help="steps between preview PNGs (0: never; default 500)")
    p.add_argument("--name", default=None, help="model name stored in the metadata (default: file stem)")
    p.add_argument("--threads", type=int_between(1, 1024), help="CPU threads for torch")
    p.add_argument("--nproc", type=int_between(1, 1024), metavar="N",
                   help="train in N processes (one per GPU with --device cuda; gloo on CPU) with "
                        "DistributedDataParallel, started through torchrun; each process draws --batch crops, rank 0 "
                        "writes the checkpoint and the model, and --resume works with another N")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from ..engine.models import resolve_model_path
    from ..fileio.safeio import check_input_path, check_output_path
    from ..engine.perturbation import DEFAULT_SCALES
    from ..engine.training import TrainConfig, config_from_model, load_checkpoint_config, train

    # 1. Everything that can be checked without reading the data: options, inputs, outputs.
    for path in args.inputs:
        check_input_path(path)
    if args.resume:
        check_input_path(args.resume, "--resume checkpoint")
    # the starting model, also a bundled one given by name, is an input: never written over
    start = [str(resolve_model_path(None if args.init == "default" else args.init))] if args.init else []
    out = check_output_path(args.out, args.inputs + start, suffixes=MODEL_SUFFIXES, what="--out")
    for beside in (out.with_suffix(".ckpt"), out.with_suffix(".preview.png")):
        check_output_path(beside, args.inputs + start, what=f"--out (the {beside.name} written beside it)")
    if args.resume and args.init:
        raise ValueError("give --resume or --init, not both")
    _check_preview_outside_inputs(out, args.inputs, args.preview_every)
    from ..engine.distributed import launch, under_torchrun
    if (args.nproc or 1) > 1 and not under_torchrun():     # the processes run this very command
        return launch(getattr(args, "argv", None) or sys.argv[1:], args.nproc)
    _set_threads(args.threads)
    init = None
    if args.resume:
        cfg = _resumed_config(load_checkpoint_config(args.resume), args)
    else:
        if args.minutes is None and args.epochs is None and args.steps is None:
            raise ValueError("give a stopping rule: --minutes, --epochs or --steps")
        _fill_training_defaults(args)
        settings = dict(crop=args.crop, batch=args.batch, lr=args.lr, steps=args.steps, epochs=args.epochs,
                        minutes=args.minutes, reconstruction=args.reconstruction,
                        consistency=args.consistency, consistency_weight=args.consistency_weight,
                        edge_sigma=args.edge_sigma,
                        edge_power=args.edge_power, seed=args.seed, device=args.device,
                        amp=not args.no_amp, checkpoint_every=args.checkpoint_every,
                        preview_every=args.preview_every, name=args.name or Path(args.out).stem,
                        lr_schedule=args.lr_schedule, augment_prob=args.augment_prob, rotate_degrees=args.rotate_degrees)
        if args.init:
            init = resolve_model_path(None if args.init == "default" else args.init)
            changed = {k: v for k, v in (("scales", args.scales), ("head", args.head)) if v is not None}
            cfg = config_from_model(init, **settings, **changed)
        else:
            cfg = TrainConfig(width=args.width, scales=list(args.scales or DEFAULT_SCALES),
                              interpolation=args.interpolation, upsample=args.upsample,
                              shared_encoder=args.shared_encoder, depth=args.depth, head=args.head or "linear",
                              working_scale=args.working_scale, **settings)
    if cfg.crop % 2 ** int(cfg.depth):
        raise ValueError(f"--crop {cfg.crop} is not a multiple of 2^depth = {2 ** int(cfg.depth)}")
    # 2. Read the data (a bad file is named and skipped), then check the memory before training.
    pool = _training_pool(args.inputs)
    _check_training_memory(cfg, pool)
    print(f"training on {pool.summary['frames']} frames from {pool.summary['files']} files", file=sys.stderr)
    _, state = train(cfg, pool, args.out, resume=args.resume, init_model=init)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"wrote {args.out} after {state.step} steps ({state.elapsed_s / 60:.1f} min)")
    return 0


#: Options a resumed run may change: how it trains, not what it trains.
RESUMABLE_OPTIONS = ("crop", "batch", "lr", "lr_schedule", "augment_prob", "rotate_degrees", "checkpoint_every",
                     "preview_every", "device", "name")
#: Options the checkpoint fixes (network, views, loss, random stream).
FIXED_ON_RESUME = ("width", "depth", "scales", "head", "interpolation", "upsample", "working_scale",
                   "reconstruction", "consistency", "consistency_weight", "edge_sigma", "edge_power", "shared_encoder",
                   "seed")
STOPPING_OPTIONS = ("minutes", "epochs", "steps")


def _check_preview_outside_inputs(out: Path, inputs: List[str], preview_every) -> None:
    """The preview PNG written beside --out is an image: inside an input folder it would become
    training data of the next run, and a rerun would refuse to overwrite an input."""
    if preview_every == 0:
        return
    preview = out.with_suffix(".preview.png").resolve()
    for folder in (Path(p).resolve() for p in inputs if Path(p).is_dir()):
        if folder in preview.parents:
            raise ValueError(f"--out {out}: its preview {preview.name} would be written inside the input folder "
                             f"{folder} and read as training data; put --out elsewhere or give --preview-every 0")


def _fill_training_defaults(args) -> None:
    """Options left out of a new run take TrainConfig's defaults (they are None in argparse so
    that a resumed run can tell an option given from one left out)."""
    import dataclasses
    from ..engine.training import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in RESUMABLE_OPTIONS + FIXED_ON_RESUME:
        if getattr(args, key, None) is None and key not in ("scales", "head", "name"):
            setattr(args, key, defaults[key])


def _resumed_config(cfg, args):
    """The checkpoint's configuration with the options given now: a training setting given is
    applied, a stopping rule given replaces the checkpoint's, a network or loss option is refused
    (ignoring it silently would train something other than what was asked)."""
    # given = not None (--seed 0 is given); the one flag, --shared-encoder, is given when True
    fixed = [f"--{key.replace('_', '-')}" for key in FIXED_ON_RESUME
             if getattr(args, key) is not None and getattr(args, key) is not False]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change when resuming (the checkpoint fixes the network, "
                         "views and loss); leave them out, or start a new run from the model with --init")
    for key in RESUMABLE_OPTIONS:
        if getattr(args, key) is not None:          # --device defaults to auto: a new machine may lack the old one's
            setattr(cfg, key, getattr(args, key))
    if args.no_amp:
        cfg.amp = False
    if any(getattr(args, key) is not None for key in STOPPING_OPTIONS):
        for key in STOPPING_OPTIONS:
            setattr(cfg, key, getattr(args, key))
    return cfg


def _training_pool(inputs: List[str]):
    """Frames of every readable input file; unreadable files are named on stderr and skipped."""
    from ..fileio.imageio import iter_inputs
    from ..fileio.safeio import name_file, one_line
    from ..engine.training import FramePool

    frames, files, skipped, failed = [], [], [], []
    for path in iter_inputs(list(inputs)):
        try:
            part = FramePool.from_paths([str(path)])
        except (ValueError, OSError, MemoryError) as err:
            message = one_line(err)
            if "no training frames" in message:
                skipped.append(path.name)
                print(f"warning: {path}: no usable frame (all smaller than 32 px or flat); skipped",
                      file=sys.stderr)
            else:
                failed.append(path.name)
                print(f"warning: {name_file(path, message)}; skipped", file=sys.stderr)
            continue
        frames += part.frames
        files.append(path.name)
    if not frames:
        raise ValueError(f"no training frames in {', '.join(inputs)}"
                         + (f" ({len(failed)} unreadable file(s), {len(skipped)} without usable frames)"
                            if failed or skipped else "") + "; give image, volume, sequence or DICOM files")
    summary = {"files": len(files), "frames": len(frames), "examples": files[:10], "skipped": (skipped + failed)[:10]}
    return FramePool(frames, summary)


def _check_training_memory(cfg, pool) -> None:
    """Refuse, before the first step, a run whose estimated peak memory does not fit."""
    from ..engine.inference import pick_device
    from ..engine.resources import (USABLE_SHARE, InsufficientMemory, available_memory, estimate_training,
                            fitting_settings, gib)

    device = pick_device(cfg.device)
    available = available_memory(device)
    if available is None:
        return
    estimate = estimate_training(cfg, sum(int(f.size) for f in pool.frames))
    if estimate.total <= available * USABLE_SHARE:
        return
    crop, batch = fitting_settings(estimate, available, cfg.crop, cfg.batch)
    hint = (f"try --crop {crop} --batch {batch}" if crop else
            "even one crop of 32 px does not fit; close other programs or use fewer/smaller input frames")
    raise InsufficientMemory(f"training would need about {gib(estimate.total)} ({gib(estimate.per_sample)} per crop of "
                      f"{cfg.crop} px, batch {cfg.batch}) but only {gib(available)} is free on {device}; {hint}")


def _add_denoise(sub) -> None:
    p = sub.add_parser("denoise", help="despeckle a file or every readable file of a folder")
    p.add_argument("input", help="image, volume, sequence, DICOM, or a folder of them")
    p.add_argument("output", help="output file (same format) or folder (names kept)")
    p.add_argument("--model", help="model file or bundled model name (default: the bundled default model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch", type=int_between(1, 4096), help="frames per batch (default: automatic)")
    p.add_argument("--gamma", type=float_between(0, 100, low_open=True), help="display gamma applied to the output (the authors use 1.5 on their head's own, contrast-stretched output)")
    p.add_argument("--blend", type=float_between(0.0, 1.0), default=0.0, help="0..1 share of the input mixed back in")
    p.add_argument("--grey-levels", default="auto", choices=["auto", "input", "network"],
                   help="input: the output keeps each input frame's brightness and contrast; network: the "
                        "network's own (contrast-stretched by the authors' output head; needs --refine none, "
                        "since a guided refinement keeps the input's levels); auto (default): input for models "
                        "with that head")
    p.add_argument("--working-scale", default="auto", type=_working_scale_arg,
                   help="auto (default): shrink frames whose speckle is coarser than the model's training data "
                        "until the grain matches (finer speckle: own resolution); off: the input's own resolution; "
                        "or a factor in [0.25, 2]")
    p.add_argument("--refine", default="auto", choices=["auto", "guided", "none"],
                   help="guided: the network's output steers an edge-keeping smoothing of the input (smooth "
                        "tissue, the input's own boundaries); none: the network's output itself; auto (default): "
                        "what the model recommends (guided for the bundled default)")
    p.add_argument("--slice-axis", default="auto", choices=["auto", "i", "j", "k", "three"],
                   help="3D volumes: the plane the 2D network runs in. auto (default): the acquisition plane, from "
                        "the file's metadata (PLUS sequences: their frames) or the data (depth trend, speckle grain), "
                        "reported and recorded in the output header; i/j/k: slices normal to that axis; three: the "
                        "median of the i, j and k passes (3x the time)")
    p.add_argument("--threads", type=int_between(1, 1024), help="CPU threads for torch")
    p.add_argument("--backend", default="auto", choices=["auto", "fp32", "bf16", "openvino", "onnxruntime"],
                   help="CPU inference path: auto (bf16 where native, else fp32); openvino/onnxruntime: faster, optional")
    p.add_argument("--uncertainty", metavar="UNC_FILE",
                   help="also write a map of where not to trust OUT (the expected absolute error of each pixel in "
                        "OUT's grey levels, float32, OUT's geometry; .mha, .nrrd or .nii.gz); one input file, "
                        "not with --slice-axis three")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave outputs that already exist (complete files: outputs are written under a "
                        "temporary name and renamed) and do the rest, e.g. after an interrupted folder run")
    archive = p.add_argument_group("archive runs on Dask (a folder input; pip install \"speckle2self[archive]\")")
    archive.add_argument("--workers", type=int_between(1, 4096), metavar="N",
                         help="despeckle the folder on a local Dask cluster of N worker processes (torch threads "
                              "per worker: --threads, default cores / N); resumable through the manifest "
                              "written in the output folder")
    archive.add_argument("--scheduler", metavar="ADDRESS",
                         help="run on a running Dask cluster: its scheduler's address (tcp://host:8786) or "
                              "scheduler file; the workers must see the input and output folders")
    archive.add_argument("--frames-per-task", type=int_at_least(0), default=None, metavar="N",
                         help="split sequences and multi-frame DICOM longer than N frames into tasks of N frames "
                              "(default 200; 0: one task per file)")
    p.set_defaults(func=_run_denoise)


def _run_denoise(args) -> int:
    from ..fileio.imageio import WRITABLE_SUFFIXES, iter_inputs
    from ..engine.inference import Despeckler
    from ..fileio.safeio import check_input_path, check_output_path, remove_stale_partials

    src, dst = check_input_path(args.input), Path(args.output)
    folder_run = src.is_dir()
    on_dask = bool(getattr(args, "workers", None) or getattr(args, "scheduler", None))
    if on_dask:
        from ..engine.archive import check_archive_options
        check_archive_options(args, folder_run)      # dask installed, a folder, no --skip-existing
    if folder_run:
        check_output_path(dst, [src], folder=True)
        pairs = [(f, _folder_output(dst, src, f)) for f in iter_inputs([str(src)])]
        if not pairs:
            raise ValueError(f"{src}: no image, volume, sequence or DICOM file in this folder "
                             f"(readable extensions: {', '.join(WRITABLE_SUFFIXES)}, or DICOM files of any name)")
    else:
        check_output_path(dst, [src], suffixes=WRITABLE_SUFFIXES)
        pairs = [(src, dst)]
    unc = _check_uncertainty_path(args, src, dst, folder_run or on_dask)
    _set_threads(args.threads)
    options = dict(batch_size=args.batch, gamma=args.gamma, blend=args.blend, working_scale=args.working_scale,
                   grey_levels=args.grey_levels, refine=args.refine,
                   slice_axis=args.slice_axis)
    if on_dask:
        from ..engine.archive import print_summary, run_denoise_archive
        summary = run_denoise_archive(pairs, dst, args.model, args.device, args.backend, options,
                                      args.workers, args.scheduler, args.threads,
                                      frames_per_task=200 if args.frames_per_task is None else args.frames_per_task)
        print_summary(summary)
        return EXIT_FAILED if summary.failed else EXIT_OK
    if not folder_run:
        if args.skip_existing and dst.exists():
            remove_stale_partials(dst)
            print(f"{src} -> {dst} skipped (exists)")
            return EXIT_OK
        data = _read_checked(src, dst)          # a bad input is refused before the model is loaded
        if unc is not None:
            from ..fileio.imageio import check_output_format
            check_output_format(unc, data)
        engine = Despeckler.from_file(args.model, args.device, args.backend)
        engine.check_output_options(args.grey_levels, args.refine)
        _denoise_file(engine, src, dst, options, data, unc)
        return EXIT_OK
    engine = Despeckler.from_file(args.model, args.device, args.backend)
    engine.check_output_options(args.grey_levels, args.refine)      # once, not as each file's error
    return _denoise_folder(engine, pairs, options, args.skip_existing)


#: Formats that hold the uncertainty map's fractional grey levels as float32.
UNCERTAINTY_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")


def _check_uncertainty_path(args, src: Path, dst: Path, many: bool):
    """The ``--uncertainty`` path, checked before any work (None when not asked)."""
    from ..fileio.formats import suffix_of
    from ..fileio.safeio import check_output_path, same_file

    if args.uncertainty is None:
        return None
    unc = Path(args.uncertainty)
    if many:
        raise ValueError("--uncertainty writes the map of one input file; run despeckle per file for maps "
                         "(a folder or archive run has no single map)")
    if args.slice_axis == "three":
        raise ValueError("--uncertainty maps one plane's despeckling; with it use --slice-axis auto, i, j or k")
    if suffix_of(unc) not in UNCERTAINTY_SUFFIXES:
        raise ValueError(f"{unc}: the uncertainty map holds fractional grey levels (float32); write it as "
                         ".mha, .nrrd or .nii.gz")
    if unc.resolve() == dst.resolve() or (dst.exists() and same_file(unc, dst)):
        raise ValueError(f"{unc}: the uncertainty map would overwrite the output; give it another path")
    return check_output_path(unc, [src], suffixes=UNCERTAINTY_SUFFIXES, what="uncertainty map")


def _folder_output(dst: Path, src: Path, f: Path) -> Path:
    """Where a folder run writes input ``f``: the same relative path, with .dcm added to a DICOM
    file named without it (IM0001 -> IM0001.dcm), so the output's format is plain."""
    from ..fileio.imageio import is_unnamed_dicom

    out = dst / f.relative_to(src)
    return out.with_name(out.name + ".dcm") if is_unnamed_dicom(f) else out


def _read_checked(src: Path, out: Path):
    """Check the output path, read the input and check that it can be written there."""
    from ..fileio.imageio import WRITABLE_SUFFIXES, check_output_format, read_frames
    from ..engine.inference import check_frames
    from ..fileio.safeio import check_output_path

    check_output_path(out, [src], suffixes=WRITABLE_SUFFIXES)
    data = read_frames(src)
    check_output_format(out, data)
    try:
        check_frames(data.frames)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{src}: {err}") from err
    return data


def _denoise_file(engine, src: Path, out: Path, options: dict, data=None, unc: Optional[Path] = None) -> None:
    """Read, check the output format, despeckle, write atomically; errors name the file.
    ``unc``: also write the uncertainty map there (checked by the caller)."""
    from ..fileio.imageio import write_like

    data = _read_checked(src, out) if data is None else data
    from ..engine.volume_axes import despeckle_frames

    if unc is None:
        result = despeckle_frames(engine, data, **options)   # 3D volumes: in their acquisition plane
    else:
        result, maps = _despeckle_with_uncertainty(engine, data, options)
    from ..engine.archive import dicom_derivation    # the outputs of one series share one new series UID
    write_like(out, result, data, derivation=dicom_derivation(engine, options, out))
    print(f"{src} -> {out} ({len(result)} frame{'s' if len(result) != 1 else ''})")
    if unc is not None:
        write_like(unc, maps, data)
        print(f"uncertainty map -> {unc}")


class _MapsOf:
    """Stands for a Despeckler in ``despeckle_frames``: despeckles with ``uncertainty=True`` and
    keeps the maps; with ``replay`` it hands back those maps in the same order, so that the maps
    are laid out in the volume exactly as the outputs are."""

    def __init__(self, engine, maps=None):
        self.engine, self.maps = engine, [] if maps is None else list(maps)
        self.replay = maps is not None

    def denoise(self, frames, **options):
        if self.replay:
            return self.maps.pop(0)
        out, unc = self.engine.denoise(frames, uncertainty=True, **options)
        self.maps.append(unc)
        return out


def _despeckle_with_uncertainty(engine, data, options: dict):
    from ..engine.volume_axes import despeckle_frames

    recorder = _MapsOf(engine)
    result = despeckle_frames(recorder, data, **options)
    maps = despeckle_frames(_MapsOf(engine, recorder.maps), data, report=None, **options)
    return result, maps


def _denoise_folder(engine, pairs, options: dict, skip_existing: bool) -> int:
    """Every file of a folder run: a bad file is named with its reason and the run goes on."""
    from ..fileio.safeio import name_file, one_line, remove_stale_partials

    written, skipped, failed = 0, 0, []
    for src, out in pairs:
        if skip_existing and out.exists():
            # A run killed between moving its output into place and removing its temporary
            # folder leaves both; the output is complete, only the temporary must go.
            remove_stale_partials(out)
            skipped += 1
            continue
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _denoise_file(engine, src, out, options)
            written += 1
        except (Exception, MemoryError) as err:   # noqa: B014 - one bad file must not end the run
            reason = name_file(src, one_line(err))
            failed.append(reason)
            print(f"error: {reason}", file=sys.stderr)
    summary = f"{len(pairs)} file(s): {written} written, {skipped} skipped (already there), {len(failed)} failed"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return EXIT_FAILED if failed else EXIT_OK


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a model's metadata")
    p.add_argument("model", nargs="?", help="model file or bundled name (default: the bundled default model)")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from ..engine.models import load_model, resolve_model_path
    from ..engine.network import count_parameters

    loaded = load_model(resolve_model_path(args.model))
    info = dict(loaded.metadata)
    info["file"] = str(loaded.path)
    info["parameters"] = count_parameters(loaded.module)
    print(json.dumps(info, indent=2))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a training checkpoint (.ckpt) as a TorchScript model, or copy a "
                                      "model (.pt) with another recommended output (--refine ...) or --name")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.add_argument("--refine", choices=["guided", "none"],
                   help="the output the model recommends (what refine 'auto' applies): its network output "
                        "steering a smoothing of the input (guided) or the network output alone (none)")
    p.add_argument("--refine-sigma-px", type=positive_float, metavar="PX",
                   help="guided smoothing's spatial sigma in pixels at the working scale (default: the value the run's "
                        "starting model recommended, if it was guided, else 7)")
    p.add_argument("--refine-range", type=positive_float, metavar="R",
                   help="guided smoothing's range sigma, a fraction of the frame's grey range (of its levels raised to "
                        "--refine-range-power where that is below 1; default: the starting model's value if it "
                        "recommended guided smoothing, else 0.04)")
    p.add_argument("--refine-range-power", type=positive_float, metavar="P",
                   help="compare the guide's grey levels raised to this power (0.2..1; default: the starting "
                        "model's value if it recommended guided smoothing, else 1: plain levels; below 1 keeps dark "
                        "boundaries such as a vessel lumen's and smooths bright tissue more)")
    p.set_defaults(func=_run_export)


def _refine_metadata(args) -> dict:
    """Metadata for ``export --refine ...``; a ValueError naming the fix where the options clash."""
    from ..engine.refine import REFINE_RANGE_LIMITS, REFINE_RANGE_POWER_LIMITS, REFINE_SIGMA_LIMITS

    tuned = {"refine_sigma_px": args.refine_sigma_px, "refine_range": args.refine_range,
             "refine_range_power": args.refine_range_power}
    tuned = {key: value for key, value in tuned.items() if value is not None}
    if tuned and args.refine != "guided":
        raise ValueError("--refine-sigma-px / --refine-range / --refine-range-power set the guided smoothing: "
                         "add --refine guided")
    for key, (lo, hi) in (("refine_sigma_px", REFINE_SIGMA_LIMITS), ("refine_range", REFINE_RANGE_LIMITS),
                          ("refine_range_power", REFINE_RANGE_POWER_LIMITS)):
        if key in tuned and not lo <= tuned[key] <= hi:
            option = "--" + key.replace("_", "-")
            raise ValueError(f"{option} must lie in [{lo}, {hi}], got {tuned[key]}")
    return {"refine": args.refine, **tuned} if args.refine else {}


def _is_model_file(path) -> bool:
    """A TorchScript model with Speckle2Self metadata (not a training checkpoint)."""
    from ..engine.models import ModelFormatError, read_metadata

    try:
        read_metadata(path)
        return True
    except ModelFormatError:
        return False


def _run_export(args) -> int:
    from ..fileio.safeio import check_input_path, check_output_path, one_line
    from ..engine.training import export_checkpoint

    check_input_path(args.checkpoint, "checkpoint")
    check_output_path(args.out, [args.checkpoint], suffixes=MODEL_SUFFIXES, what="--out")
    refine = _refine_metadata(args)
    if _is_model_file(args.checkpoint):
        from ..engine.models import rewrite_recommendation
        if not refine and not args.name:
            raise ValueError(f"{args.checkpoint} is already a model: give --refine ... or --name to write a "
                             "copy with another recommendation or name")
        meta = rewrite_recommendation(args.checkpoint, args.out, refine, args.name)
        print(f"wrote {args.out} ({meta['name']}, the weights of {args.checkpoint})")
        return 0
    try:
        import torch
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not {"config", "model", "step"} <= set(ckpt):
            raise ValueError("no config/model/step entries")
        steps = int(ckpt["step"])
        del ckpt
    except Exception as err:  # pickle.UnpicklingError, zip errors, EOFError, ... from a foreign or damaged file
        raise ValueError(f"{args.checkpoint}: neither a Speckle2Self model (.pt) nor a training checkpoint "
                         f"(.ckpt) written by `speckle2self train`; export takes one of those (reading it as a "
                         f"checkpoint failed: {one_line(err, 120)})") from err
    if steps < 1:
        raise ValueError(f"{args.checkpoint}: the checkpoint has {steps} training steps; an untrained network "
                         "is not exported (train with --steps N, N >= 1)")
    meta = export_checkpoint(args.checkpoint, args.out, args.name, extra=refine)
    print(f"wrote {args.out} ({meta['training'].get('steps_done')} steps)")
    return 0


def _add_optional(sub, module: str, name: str, help_text: str, load: bool = True) -> None:
    """Subcommands that live in their own modules of this package register through add_*/run_*.

    ``load=False`` (another subcommand was asked for) registers the name only: importing the
    module (scipy, slicer, ...) would add seconds to every start of the command line.
    """
    import importlib

    p = sub.add_parser(name, help=help_text)
    if not load:
        return
    try:
        mod = importlib.import_module(f".{module}", __package__)
        getattr(mod, f"add_{name}_arguments")(p)
        p.set_defaults(func=getattr(mod, f"run_{name}"))
    except (ImportError, AttributeError) as err:
        # A missing optional dependency must not take down train/denoise with it.
        reason = f"'{name}' is unavailable: {err}"
        p.set_defaults(func=lambda _args: _unavailable(reason))


def _unavailable(reason: str) -> int:
    print(f"error: {reason}", file=sys.stderr)
    return 2


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _with_debug(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug`` after the subcommand as well (``speckle2self denoise ... --debug``)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a failure")
    return parser


def _command_in(argv: Optional[List[str]]) -> Optional[str]:
    """The subcommand named in ``argv`` (None when none is, e.g. ``--help``; "" when unknown)."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for arg in args:
        if arg.startswith("@"):
            return ""                   # arguments from a file: load everything
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="speckle2self", description="Self-supervised ultrasound despeckling",
                     fromfile_prefix_chars="@",
                     epilog="exit codes: 0 done; 1 the run failed (or some files of a folder run); "
                            "2 bad input, options or output paths (nothing computed or written); "
                            "130 interrupted. See docs/reliability.md.")
    parser.add_argument("--version", action="version", version=f"speckle2self {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_denoise(sub)
    _add_info(sub)
    _add_export(sub)
    wanted = _command_in(argv)
    for module, name, help_text in (
            ("simulate", "simulate", "simulate a B-mode phantom with its clean target"),
            ("segment", "segment", "segment the carotid lumen from a seed point"),
            ("demo", "demo", "despeckle a simulated phantom and a real DICOM with the bundled model"),
            ("stream", "stream", "live OpenIGTLink relay: receive IMAGE messages, send them despeckled")):
        _add_optional(sub, module, name, help_text, load=wanted in ("", name))
    for subparser in sub.choices.values():
        _with_debug(subparser)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are cleaned up on the way out."""


def _sigterm_handler(owner: int):
    """SIGTERM handler of the CLI's process ``owner``: raise :class:`_Terminated` there; a forked
    child (e.g. OpenVINO's telemetry) inherits the handler and must just exit, without a traceback."""
    def terminate(signum, _frame):
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise _Terminated()
    return terminate


#: Errors that mean "bad input, options or paths" (exit 2); anything else is a failed run (exit 1).
def _is_bad_input(err: BaseException) -> bool:
    from ..engine.resources import InsufficientMemory
    return isinstance(err, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError,
                            IsADirectoryError, NotADirectoryError, InsufficientMemory)) \
        and not isinstance(err, (FloatingPointError, MemoryError))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, DeprecationWarning):
        return
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


#: Options whose value may start with a minus sign (RAS coordinates are often negative).
_SIGNED_VALUE_OPTIONS = ("--seed", "--seed-ras")


def _attach_signed_values(argv: List[str]) -> List[str]:
    """``--seed-ras -27.2,-52.5,30.5`` as ``--seed-ras=-27.2,-52.5,30.5``: argparse takes a value
    that starts with '-' and is not a plain number for an option, and would refuse it."""
    out: List[str] = []
    for arg in argv:
        if out and out[-1] in _SIGNED_VALUE_OPTIONS and len(arg) > 1 and arg[0] == "-" \
                and (arg[1].isdigit() or arg[1] == "."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _with_option_names(message: str, args: argparse.Namespace) -> str:
    """The library names its arguments (edge_power, max_frames); on the command line the user
    gave the options (--edge-power, --max-frames): say those. Only names with an underscore,
    which prose never uses."""
    import re

    for dest in vars(args):
        if "_" in dest:
            message = re.sub(rf"(?<![-\w]){dest}\b", "--" + dest.replace("_", "-"), message)
    return message


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    import signal
    import threading
    import warnings

    from ..fileio.safeio import one_line

    argv = _attach_signed_values(sys.argv[1:] if argv is None else [str(a) for a in argv])
    try:
        args = build_parser(argv).parse_args(argv)
        args.argv = argv                    # train --nproc starts the same command in its processes
    except SystemExit as done:      # --help, --version, or a one-line option error (exit 2)
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    debug = bool(getattr(args, "debug", False))
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_handler(os.getpid()))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted; outputs already written are complete, none is partial "
              "(rerun denoise with --skip-existing to finish)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("error: terminated (SIGTERM); outputs already written are complete, none is partial", file=sys.stderr)
        return EXIT_TERMINATED
    except (Exception, MemoryError) as err:  # noqa: B014 - every failure becomes one line
        if debug:
            import traceback
            traceback.print_exc()
        hint = "" if debug or _is_bad_input(err) else " (run with --debug for the traceback)"
        print(f"error: {_with_option_names(one_line(err), args)}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT if _is_bad_input(err) else EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
