"""``speckle2self denoise``: despeckle a file, every readable file of a folder, or a folder on Dask.

Every path is checked before any work; a folder run names each bad file and goes on (exit 1 at
the end); ``--uncertainty`` also writes the map of where not to trust the output.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from ..engine.archive import read_checked
from .exitcodes import EXIT_FAILED, EXIT_OK
from .options import float_between, int_at_least, int_between, set_threads


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


def add_denoise(sub) -> None:
    """The ``denoise`` subcommand and its options."""
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
    p.set_defaults(func=run_denoise)


def run_denoise(args) -> int:
    """Run ``speckle2self denoise``: one file, a folder here, or a folder on Dask."""
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
    set_threads(args.threads)
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
        data = read_checked(src, dst)          # a bad input is refused before the model is loaded
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


def _denoise_file(engine, src: Path, out: Path, options: dict, data=None, unc: Optional[Path] = None) -> None:
    """Read, check the output format, despeckle, write atomically; errors name the file.
    ``unc``: also write the uncertainty map there (checked by the caller)."""
    from ..fileio.imageio import write_like

    data = read_checked(src, out) if data is None else data
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


def _despeckle_with_uncertainty(engine, data, options: dict):
    """``despeckle_frames`` with the uncertainty map of each output, laid out like it."""
    from ..engine.uncertainty import MapRecorder
    from ..engine.volume_axes import despeckle_frames

    recorder = MapRecorder(engine)
    result = despeckle_frames(recorder, data, **options)
    return result, despeckle_frames(recorder.replay(), data, report=None, **options)


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
