"""``speckle2self train``: self-supervised training on unlabeled images, volumes, sequences, DICOM.

The options are parsed here; the rules (a resumed run's options, the defaults of a new one, the
frame pool, the memory check) are the engine's (:mod:`Speckle2SelfLib.engine.training_setup`).
"""

from __future__ import annotations

import os
import sys

from .options import (MODEL_SUFFIXES, crop_size, float_between, int_at_least, int_between, positive_float, scales_list,
                      set_threads)


def add_train(sub) -> None:
    """The ``train`` subcommand and its options."""
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
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    """Run ``speckle2self train``: check everything, read the frames, check the memory, train."""
    from ..engine.models import resolve_model_path
    from ..fileio.safeio import check_input_path, check_output_path
    from ..engine.training import train
    from ..engine.training_setup import (check_preview_outside_inputs, check_training_memory, training_config,
                                         training_pool)

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
    check_preview_outside_inputs(out, args.inputs, args.preview_every)
    from ..engine.distributed import launch, under_torchrun
    if (args.nproc or 1) > 1 and not under_torchrun():     # the processes run this very command
        return launch(getattr(args, "argv", None) or sys.argv[1:], args.nproc)
    set_threads(args.threads)
    cfg, init = training_config(args)
    # 2. Read the data (a bad file is named and skipped), then check the memory before training.
    pool = training_pool(args.inputs)
    check_training_memory(cfg, pool)
    print(f"training on {pool.summary['frames']} frames from {pool.summary['files']} files", file=sys.stderr)
    _, state = train(cfg, pool, args.out, resume=args.resume, init_model=init)
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"wrote {args.out} after {state.step} steps ({state.elapsed_s / 60:.1f} min)")
    return 0
