"""What a training run needs before its first step: its options checked and turned into a
:class:`~.training.TrainConfig` (a new run, a resumed one, a fine-tuned model), its frames read
into a :class:`~.training.FramePool`, its memory checked.

``options`` are the train command's options (``speckle2self train``, :mod:`Speckle2SelfLib.cli.train`):
an argparse namespace, or any object with those attributes (``None``: left out). Errors name the
command line's options (``--crop``), the way a user gave them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from .models import resolve_model_path
from .perturbation import DEFAULT_SCALES
from .training import FramePool, TrainConfig, config_from_model, load_checkpoint_config


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr)


#: Options a resumed run may change: how it trains, not what it trains.
RESUMABLE_OPTIONS = ("crop", "batch", "lr", "lr_schedule", "augment_prob", "rotate_degrees", "checkpoint_every",
                     "preview_every", "device", "name")
#: Options the checkpoint fixes (network, views, loss, random stream).
FIXED_ON_RESUME = ("width", "depth", "scales", "head", "interpolation", "upsample", "working_scale",
                   "reconstruction", "consistency", "consistency_weight", "edge_sigma", "edge_power", "shared_encoder",
                   "seed")
STOPPING_OPTIONS = ("minutes", "epochs", "steps")


def check_preview_outside_inputs(out: Path, inputs: List[str], preview_every) -> None:
    """The preview PNG written beside --out is an image: inside an input folder it would become
    training data of the next run, and a rerun would refuse to overwrite an input."""
    if preview_every == 0:
        return
    preview = out.with_suffix(".preview.png").resolve()
    for folder in (Path(p).resolve() for p in inputs if Path(p).is_dir()):
        if folder in preview.parents:
            raise ValueError(f"--out {out}: its preview {preview.name} would be written inside the input folder "
                             f"{folder} and read as training data; put --out elsewhere or give --preview-every 0")


def fill_training_defaults(options) -> None:
    """Options left out of a new run take TrainConfig's defaults (they are None in argparse so
    that a resumed run can tell an option given from one left out)."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in RESUMABLE_OPTIONS + FIXED_ON_RESUME:
        if getattr(options, key, None) is None and key not in ("scales", "head", "name"):
            setattr(options, key, defaults[key])


def resumed_config(cfg, options):
    """The checkpoint's configuration with the options given now: a training setting given is
    applied, a stopping rule given replaces the checkpoint's, a network or loss option is refused
    (ignoring it silently would train something other than what was asked)."""
    # given = not None (--seed 0 is given); the one flag, --shared-encoder, is given when True
    fixed = [f"--{key.replace('_', '-')}" for key in FIXED_ON_RESUME
             if getattr(options, key) is not None and getattr(options, key) is not False]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change when resuming (the checkpoint fixes the network, "
                         "views and loss); leave them out, or start a new run from the model with --init")
    for key in RESUMABLE_OPTIONS:
        if getattr(options, key) is not None:          # --device defaults to auto: a new machine may lack the old one's
            setattr(cfg, key, getattr(options, key))
    if options.no_amp:
        cfg.amp = False
    if any(getattr(options, key) is not None for key in STOPPING_OPTIONS):
        for key in STOPPING_OPTIONS:
            setattr(cfg, key, getattr(options, key))
    return cfg


def training_config(options) -> Tuple[TrainConfig, Optional[Path]]:
    """The run's :class:`~.training.TrainConfig` and the model it fine-tunes (``--init``'s file, else
    None): the checkpoint's configuration with ``--resume``, else a new one from the options (left
    out: TrainConfig's defaults; with ``--init``: the model's architecture). Refuses a run without a
    stopping rule and a crop the network's depth does not divide."""
    init = None
    if options.resume:
        cfg = resumed_config(load_checkpoint_config(options.resume), options)
    else:
        if options.minutes is None and options.epochs is None and options.steps is None:
            raise ValueError("give a stopping rule: --minutes, --epochs or --steps")
        fill_training_defaults(options)
        settings = dict(crop=options.crop, batch=options.batch, lr=options.lr, steps=options.steps,
                        epochs=options.epochs, minutes=options.minutes, reconstruction=options.reconstruction,
                        consistency=options.consistency, consistency_weight=options.consistency_weight,
                        edge_sigma=options.edge_sigma,
                        edge_power=options.edge_power, seed=options.seed, device=options.device,
                        amp=not options.no_amp, checkpoint_every=options.checkpoint_every,
                        preview_every=options.preview_every, name=options.name or Path(options.out).stem,
                        lr_schedule=options.lr_schedule, augment_prob=options.augment_prob,
                        rotate_degrees=options.rotate_degrees)
        if options.init:
            init = resolve_model_path(None if options.init == "default" else options.init)
            changed = {k: v for k, v in (("scales", options.scales), ("head", options.head)) if v is not None}
            cfg = config_from_model(init, **settings, **changed)
        else:
            cfg = TrainConfig(width=options.width, scales=list(options.scales or DEFAULT_SCALES),
                              interpolation=options.interpolation, upsample=options.upsample,
                              shared_encoder=options.shared_encoder, depth=options.depth,
                              head=options.head or "linear", working_scale=options.working_scale, **settings)
    if cfg.crop % 2 ** int(cfg.depth):
        raise ValueError(f"--crop {cfg.crop} is not a multiple of 2^depth = {2 ** int(cfg.depth)}")
    return cfg, init


def training_pool(inputs: List[str], warn: Callable[[str], None] = _warn_stderr) -> FramePool:
    """Frames of every readable input file; unreadable files are named (``warn``: on stderr) and skipped."""
    from ..fileio.imageio import iter_inputs
    from ..fileio.safeio import name_file, one_line

    frames, files, skipped, failed = [], [], [], []
    for path in iter_inputs(list(inputs)):
        try:
            part = FramePool.from_paths([str(path)])
        except (ValueError, OSError, MemoryError) as err:
            message = one_line(err)
            if "no training frames" in message:
                skipped.append(path.name)
                warn(f"warning: {path}: no usable frame (all smaller than 32 px or flat); skipped")
            else:
                failed.append(path.name)
                warn(f"warning: {name_file(path, message)}; skipped")
            continue
        frames += part.frames
        files.append(path.name)
    if not frames:
        raise ValueError(f"no training frames in {', '.join(inputs)}"
                         + (f" ({len(failed)} unreadable file(s), {len(skipped)} without usable frames)"
                            if failed or skipped else "") + "; give image, volume, sequence or DICOM files")
    summary = {"files": len(files), "frames": len(frames), "examples": files[:10], "skipped": (skipped + failed)[:10]}
    return FramePool(frames, summary)


def check_training_memory(cfg, pool) -> None:
    """Refuse, before the first step, a run whose estimated peak memory does not fit."""
    from .inference import pick_device
    from .resources import (USABLE_SHARE, InsufficientMemory, available_memory, estimate_training,
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
