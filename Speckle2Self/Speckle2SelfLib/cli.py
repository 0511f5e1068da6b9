"""Command line: ``speckle2self train | denoise | info | export | simulate | segment``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from . import __version__


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="self-supervised training on unlabeled images, volumes, sequences, DICOM")
    p.add_argument("inputs", nargs="+", help="files and/or folders (every readable file, recursively)")
    p.add_argument("--out", required=True, help="TorchScript model to write (a .ckpt and .preview.png go beside it)")
    stop = p.add_argument_group("stopping (at least one)")
    stop.add_argument("--minutes", type=float, help="wall-clock budget, counting resumed time")
    stop.add_argument("--epochs", type=float, help="passes over the frames (one crop per frame per epoch)")
    stop.add_argument("--steps", type=int, help="optimiser steps")
    p.add_argument("--crop", type=int, default=128, help="crop size, a multiple of 16 (default 128)")
    p.add_argument("--width", type=int, default=32, help="base width of the network (paper: 32)")
    p.add_argument("--batch", type=int, default=16, help="batch size (paper: 16)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--scales", default="1.0,0.5,0.25", help="comma-separated perturbation scales")
    p.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic", "area", "nearest"])
    p.add_argument("--upsample", default="transposed", choices=["transposed", "resize"],
                   help="decoder upsampling: transposed convs (paper) or bilinear resize + conv")
    p.add_argument("--shared-encoder", action="store_true", help="one encoder for all scales (ablation)")
    p.add_argument("--depth", type=int, default=4,
                   help="stride-2 stages; 4 (paper) puts the bottleneck at 1/16 resolution")
    p.add_argument("--reconstruction", default="mse", choices=["mse", "l1"])
    p.add_argument("--consistency", default="l1", choices=["l1", "mse", "none"])
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, mps")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="checkpoint (.ckpt) to continue from")
    p.add_argument("--init", help="fine-tune this model (file, bundled name, or 'default'); its architecture "
                                  "replaces --width/--scales/--interpolation/--upsample")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--preview-every", type=int, default=500, help="steps between preview PNGs (0: never)")
    p.add_argument("--name", default=None, help="model name stored in the metadata (default: file stem)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .models import resolve_model_path
    from .training import FramePool, TrainConfig, config_from_model, load_checkpoint_config, train

    _set_threads(args.threads)
    init = None
    if args.resume:
        cfg = load_checkpoint_config(args.resume)
        # Stopping rules and device may change on resume; the architecture may not.
        for key in ("minutes", "epochs", "steps", "device"):
            if getattr(args, key) is not None:
                setattr(cfg, key, getattr(args, key))
    else:
        if args.minutes is None and args.epochs is None and args.steps is None:
            print("error: give --minutes, --epochs or --steps", file=sys.stderr)
            return 2
        settings = dict(crop=args.crop, batch=args.batch, lr=args.lr, steps=args.steps, epochs=args.epochs,
                        minutes=args.minutes, reconstruction=args.reconstruction,
                        consistency=args.consistency, seed=args.seed, device=args.device,
                        amp=not args.no_amp, checkpoint_every=args.checkpoint_every,
                        preview_every=args.preview_every, name=args.name or Path(args.out).stem)
        if args.init:
            init = resolve_model_path(None if args.init == "default" else args.init)
            cfg = config_from_model(init, **settings)
        else:
            cfg = TrainConfig(width=args.width, scales=[float(s) for s in args.scales.split(",")],
                              interpolation=args.interpolation, upsample=args.upsample,
                              shared_encoder=args.shared_encoder, depth=args.depth, **settings)
    pool = FramePool.from_paths(args.inputs)
    print(f"training on {pool.summary['frames']} frames from {pool.summary['files']} files", file=sys.stderr)
    _, state = train(cfg, pool, args.out, resume=args.resume, init_model=init)
    print(f"wrote {args.out} after {state.step} steps ({state.elapsed_s / 60:.1f} min)")
    return 0


def _add_denoise(sub) -> None:
    p = sub.add_parser("denoise", help="despeckle a file or every readable file of a folder")
    p.add_argument("input", help="image, volume, sequence, DICOM, or a folder of them")
    p.add_argument("output", help="output file (same format) or folder (names kept)")
    p.add_argument("--model", help="model file or bundled model name (default: the bundled default model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--batch", type=int, help="frames per batch (default: automatic)")
    p.add_argument("--gamma", type=float, help="display gamma applied to the output (the authors use 1.5)")
    p.add_argument("--blend", type=float, default=0.0, help="0..1 share of the input mixed back in")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.set_defaults(func=_run_denoise)


def _run_denoise(args) -> int:
    from .imageio import iter_inputs, read_frames, write_like
    from .inference import Despeckler

    _set_threads(args.threads)
    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        pairs = [(f, dst / f.relative_to(src)) for f in iter_inputs([str(src)])]
        if not pairs:
            print(f"error: no readable image, volume, sequence or DICOM file in {src}", file=sys.stderr)
            return 2
    else:
        pairs = [(src, dst)]
    for f, out in pairs:
        if out.resolve() == f.resolve():
            print(f"error: output {out} would overwrite the input; choose another path", file=sys.stderr)
            return 2
    engine = Despeckler.from_file(args.model, args.device)
    for f, out in pairs:
        data = read_frames(f)
        result = engine.denoise(data.frames, batch_size=args.batch, gamma=args.gamma, blend=args.blend)
        write_like(out, result, data)
        print(f"{f} -> {out} ({len(result)} frame{'s' if len(result) != 1 else ''})")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print a model's metadata")
    p.add_argument("model", nargs="?", help="model file or bundled name (default: the bundled default model)")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from .models import load_model, resolve_model_path
    from .network import count_parameters

    loaded = load_model(resolve_model_path(args.model))
    info = dict(loaded.metadata)
    info["file"] = str(loaded.path)
    info["parameters"] = count_parameters(loaded.module)
    print(json.dumps(info, indent=2))
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a training checkpoint (.ckpt) as a TorchScript model")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--name")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .training import export_checkpoint
    meta = export_checkpoint(args.checkpoint, args.out, args.name)
    print(f"wrote {args.out} ({meta['training'].get('steps_done')} steps)")
    return 0


def _add_optional(sub, module: str, name: str, help_text: str) -> None:
    """Subcommands that live in other Lib modules register themselves through add_*/run_*."""
    import importlib

    p = sub.add_parser(name, help=help_text)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speckle2self", description="Self-supervised ultrasound despeckling",
                                     fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"speckle2self {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_denoise(sub)
    _add_info(sub)
    _add_export(sub)
    _add_optional(sub, "simulation", "simulate", "simulate a B-mode phantom with its clean target")
    _add_optional(sub, "segmentation", "segment", "segment the carotid lumen from a seed point")
    _add_optional(sub, "demo", "demo", "despeckle a simulated phantom and a real DICOM with the bundled model")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
