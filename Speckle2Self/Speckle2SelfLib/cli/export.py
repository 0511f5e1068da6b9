"""``speckle2self export``: a training checkpoint (.ckpt) as a TorchScript model, or a copy of a model
(.pt) with another recommended output (``--refine ...``) or name."""

from __future__ import annotations

from .options import MODEL_SUFFIXES, positive_float


def add_export(sub) -> None:
    """The ``export`` subcommand and its options."""
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
    p.set_defaults(func=run_export)


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


def run_export(args) -> int:
    """A checkpoint -> a TorchScript model; a model -> a copy with another recommendation or name."""
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
