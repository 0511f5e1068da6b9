"""``speckle2self segment``: the carotid lumen of an image, volume or sequence from a seed point.

Reads the input (:func:`~Speckle2SelfLib.fileio.imageio.read_frames`), despeckles the frames to
segment with the bundled model unless ``--no-despeckle``, runs
:func:`~Speckle2SelfLib.segmentation.segment_sequence` and writes the mask in the input's format
and geometry. Exit code :data:`EXIT_FLAGGED` when a result is flagged as implausible (the mask
is then not written), unless ``--keep-flagged``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Sequence, Tuple

import numpy as np

from ..segmentation import (DEFAULT_METHOD, DEFAULT_TOLERANCE, DESPECKLED_TOLERANCE, METHODS, RowCol, SequenceResult,
                            check_seed, segment_sequence)
from .exitcodes import EXIT_FLAGGED


def add_segment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``speckle2self segment IN --seed X,Y --out MASK [...]``."""
    parser.add_argument("input", help="image (PNG/JPEG/TIFF), volume or sequence (.mha/.nrrd/.nii.gz) or DICOM")
    seed = parser.add_mutually_exclusive_group()       # required for one file; a folder takes --seeds
    seed.add_argument("--seed", metavar="X,Y", type=_parse_floats(2),
                      help="a pixel inside the lumen: X = column, Y = row, as image viewers show them")
    seed.add_argument("--seed-ras", metavar="R,A,S", type=_parse_floats(3),
                      help="a point inside the lumen in RAS mm, as Slicer shows it (its frame is the seed's frame)")
    parser.add_argument("--frame", type=int, default=None, metavar="K",
                        help="segment only frame K of a multi-frame input (default: every frame, the seed "
                             "following the lumen from frame 0 or the --seed-ras frame; with --seed-ras, K "
                             "must be the point's frame)")
    parser.add_argument("--out", metavar="MASK",
                        help="mask file in the input's format and geometry: .png/.dcm (0/255), "
                             ".mha/.nrrd/.nii.gz (0/1 labels)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help="radial (default): a smooth closed boundary around the seed that does not leak "
                             "through gaps in the wall; flood: Slicer's flood filling; growcut: Slicer's grow from seeds")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"flood / growcut intensity tolerance in the input's grey levels (default "
                             f"{DESPECKLED_TOLERANCE:g} on despeckled data, {DEFAULT_TOLERANCE:g} with --no-despeckle)")
    parser.add_argument("--keep-flagged", action="store_true",
                        help=f"write the mask even when a frame is flagged as implausible (leak, weak boundary, "
                             f"...); without it such a result is not written and the exit code is {EXIT_FLAGGED}")
    parser.add_argument("--neighborhood", type=float, default=0.0, metavar="PX",
                        help="flood-fill neighbourhood radius in pixels, Slicer's 'Neighborhood size' (default 0)")
    parser.add_argument("--no-despeckle", action="store_true", help="segment the input as it is")
    parser.add_argument("--model", default=None, help="despeckling model file (default: the bundled model)")
    batch = parser.add_argument_group("a folder (speckle2self segment IN_DIR --seeds seeds.csv --table out.csv)")
    batch.add_argument("--seeds", metavar="CSV",
                       help="one seed per file: a CSV with the header file,x,y[,frame] (file relative to IN_DIR)")
    batch.add_argument("--table", metavar="CSV",
                       help="per-frame area and diameters of every file, flagged frames marked; resumable (the "
                            "manifest <table>.manifest.jsonl beside it says what is done)")
    batch.add_argument("--workers", type=int, default=None, metavar="N",
                       help="on a local Dask cluster of N worker processes (pip install \"speckle2self[archive]\")")
    batch.add_argument("--scheduler", metavar="ADDRESS", help="on a running Dask cluster (address or scheduler file)")
    return parser


def run_segment(args: argparse.Namespace) -> int:
    """Run ``speckle2self segment``: 0 on success, 2 with a message on stderr for bad input
    (including a seed that is not in a lumen), :data:`EXIT_FLAGGED` (3) when a segmented frame
    is flagged as implausible and ``--keep-flagged`` is not given (the mask is then not written)."""
    try:
        if getattr(args, "seeds", None) or getattr(args, "table", None) or os.path.isdir(args.input):
            from .segment_batch import run_segment_batch
            return run_segment_batch(args)
        if args.seed is None and args.seed_ras is None:
            raise ValueError("give --seed X,Y or --seed-ras R,A,S (a folder: --seeds seeds.csv --table out.csv)")
        if args.out is None:
            raise ValueError("give --out MASK, the mask file to write")
        if getattr(args, "workers", None) or getattr(args, "scheduler", None):
            raise ValueError("--workers / --scheduler measure a folder (--seeds, --table); leave them out for one file")
        from ..fileio.safeio import check_mask_output; check_mask_output(args.out, args.input)  # noqa: E702 (issue #16)
        return _run_segment(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:     # vtk is declared, but an environment may still lack it
        missing = (err.name or "").split(".")[0]
        if missing not in ("vtk", "slicer", "vtkmodules"):
            raise
        package = "slicer-core" if missing == "slicer" else "vtk"
        print(f"error: segmenting with --method {args.method} needs the '{package}' Python package, which is not "
              f"installed; install it with: pip install {package}", file=sys.stderr)
        return 2


def _run_segment(args: argparse.Namespace) -> int:
    if args.no_despeckle and args.model is not None:
        raise ValueError("--model despeckles the input first and --no-despeckle segments it as it is: "
                         "give one of them")
    if args.method == "radial" and (args.tolerance is not None or args.neighborhood):
        raise ValueError("--tolerance and --neighborhood set the flood fill; the radial method needs none "
                         "(add --method flood to use them)")
    data = _read_input(args.input)
    frames = np.asarray(data.frames)
    if args.seed is not None:
        start, seed_rc = 0, (args.seed[1], args.seed[0])      # X, Y -> (row, col)
    else:
        start, seed_rc = _ras_to_frame_row_col(data, args.seed_ras)
    if args.frame is not None:
        if not 0 <= args.frame < len(frames):
            raise ValueError(f"--frame {args.frame} is outside the input's {len(frames)} frames (0..{len(frames) - 1})")
        if args.seed_ras is not None and args.frame != start:
            raise ValueError(f"the --seed-ras point lies in frame {start}, not in --frame {args.frame}: leave out "
                             "--frame (the seed's frame is segmented) or give the point in that frame")
        start = args.frame
    check_seed(seed_rc, frames.shape)
    if not 0 <= start < len(frames):
        raise ValueError(f"the seed's frame {start} is outside the input's {len(frames)} frames; check --seed-ras")
    wanted = [start] if args.frame is not None else list(range(len(frames)))
    written = _frames_to_write(args.out, data, wanted if args.frame is not None else None)   # refused before any work
    tolerance = args.tolerance
    if not args.no_despeckle:
        frames = _despeckled(frames, wanted, args.model)
        tolerance = DESPECKLED_TOLERANCE if tolerance is None else tolerance
    elif tolerance is None:
        tolerance = DEFAULT_TOLERANCE
    spacing_rc = (float(data.spacing[1]), float(data.spacing[0]))
    options = {"neighborhood_radius_px": args.neighborhood} if args.method == "flood" else {}
    result = segment_sequence(frames, seed_rc, args.method, tolerance, spacing_rc, start_frame=start,
                              frames_to_segment=wanted, **options)
    _print_measurements(result, wanted, data)
    flagged = [k for k in wanted if result.flagged[k]]
    if flagged and not args.keep_flagged:
        print(f"error: {len(flagged)} of {len(wanted)} frame(s) flagged as implausible, first frame {flagged[0]}: "
              f"{result.flag_reasons[flagged[0]]}. The mask was NOT written to {args.out}; move the seed to the "
              "lumen centre, try another --method, or pass --keep-flagged to write it anyway", file=sys.stderr)
        return EXIT_FLAGGED
    _write_mask(args.out, result.masks[written], data)
    return 0


def _parse_floats(count: int):
    def parse(text: str) -> Tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.replace(" ", "").split(","))
        except ValueError:
            values = ()
        if len(values) != count or not all(np.isfinite(values)):
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}")
        return values
    return parse


def _read_input(path):
    from ..fileio.imageio import read_frames

    return read_frames(path)


def _ras_to_frame_row_col(data, ras: Sequence[float]) -> Tuple[int, RowCol]:
    """RAS mm -> (frame, (row, col)) through the input's geometry. ITK/SimpleITK images are in
    LPS; pictures and DICOM without one get Slicer's default: origin 0, identity LPS axes."""
    lps = (-float(ras[0]), -float(ras[1]), float(ras[2]))
    source = data.source
    if source is not None and hasattr(source, "TransformPhysicalPointToContinuousIndex"):
        index = source.TransformPhysicalPointToContinuousIndex(lps[:source.GetDimension()])
        col, row = index[0], index[1]
        frame = index[2] if len(index) > 2 else 0.0
    else:
        col, row, frame = (v / s for v, s in zip(lps, data.spacing))
    return int(round(frame)), (row, col)


def _despeckled(frames: np.ndarray, wanted: List[int], model) -> np.ndarray:
    """Despeckle the frames that will be segmented (the others are not looked at)."""
    from ..engine.inference import Despeckler

    despeckler = Despeckler.from_file(model)
    out = np.array(frames, copy=True)
    out[wanted] = despeckler.denoise(frames[wanted])
    return out


def _frames_to_write(out_path, data, only) -> slice | List[int]:
    """Which mask frames go to ``out_path``: a picture (.png) holds one frame, so a single
    --frame of a multi-frame input is written alone; volumes keep every frame (the input's
    geometry). Raises the format error before anything is computed."""
    from ..fileio.imageio import IMAGE_SUFFIXES, check_output_format

    if only is not None and str(out_path).lower().endswith(IMAGE_SUFFIXES):
        check_output_format(out_path, data, len(only))
        return only
    check_output_format(out_path, data)
    return slice(None)


def _write_mask(out_path, masks: np.ndarray, data) -> None:
    """Mask in the input's format and geometry: volumes (.mha, .nrrd, .nii...) as 0/1 labels,
    pictures and DICOM as 0/255 so that viewers show them."""
    from ..fileio.imageio import SITK_SUFFIXES, write_like

    label_volume = str(out_path).lower().endswith(SITK_SUFFIXES)
    labels = masks.astype(np.uint8) * (1 if label_volume else 255)
    write_like(out_path, labels, data)


def _print_measurements(result: SequenceResult, frames: List[int], data) -> None:
    from ..fileio.imageio import has_pixel_spacing

    area_unit, length_unit = ("mm2", "mm") if has_pixel_spacing(data) else ("px2", "px")
    for k in frames:
        m = result.measurements[k]
        flag = f"  FLAGGED: {result.flag_reasons[k]}" if result.flagged[k] else ""
        print(f"frame {k}: area {m.area_mm2:.2f} {area_unit}, "
              f"equivalent diameter {m.equivalent_diameter_mm:.2f} {length_unit}, ellipse diameters "
              f"{m.major_diameter_mm:.2f} x {m.minor_diameter_mm:.2f} {length_unit}{flag}")
    flagged = [k for k in frames if result.flagged[k]]
    if flagged:
        print(f"warning: {len(flagged)} frame(s) flagged as implausible: {flagged}", file=sys.stderr)
