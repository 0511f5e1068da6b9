"""``speckle2self segment IN_DIR --seeds seeds.csv --table out.csv``: lumen measurements of a whole archive.

The seeds file names one seed per input file (CSV with a header: ``file,x,y`` and an optional
``frame``; ``file`` relative to IN_DIR or absolute, x = column, y = row as image viewers show
them). Each file is one task (on Dask with ``--workers N`` / ``--scheduler ADDRESS``, else in
this process): read, despeckle the frames to segment (the model loaded once per worker),
segment every frame (or ``frame`` alone) from the seed, and measure. The table has one row per
frame: area, equivalent and ellipse diameters, their units, and whether the frame is flagged
as implausible, with the reason. Resumable as ``denoise`` on Dask is: the manifest beside the
table (``<table>.manifest.jsonl``) holds every finished file's rows; a rerun redoes only files
that are new, changed, or segmented with other seeds or settings, and the table is rewritten
whole (temporary name, then renamed) from the manifest at the end. Bad files are listed with
their reason and never stop the run.

Exit codes: 0 done; 1 some files failed; 3 every file done but some frames flagged.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from pathlib import Path
from typing import Dict, List

TABLE_COLUMNS = ("file", "frame", "area", "equivalent_diameter", "major_diameter", "minor_diameter",
                 "area_unit", "length_unit", "flagged", "reason")


def read_seeds(path, in_dir) -> List[Dict]:
    """The seeds file as [{"file", "x", "y", "frame"}]; a one-line ValueError naming the line."""
    path, in_dir = Path(path), Path(in_dir)
    if not path.is_file():
        raise FileNotFoundError(f"--seeds {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        if not {"file", "x", "y"} <= set(columns):
            raise ValueError(f"--seeds {path}: the first line must name the columns file,x,y (and optionally frame), "
                             f"got {','.join(reader.fieldnames or []) or 'nothing'}")
        seeds, seen = [], set()
        for line, row in enumerate(reader, start=2):
            row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
            if not any(row.values()):
                continue
            try:
                x, y = float(row["x"]), float(row["y"])
                frame = int(row["frame"]) if row.get("frame") else None
            except ValueError:
                raise ValueError(f"--seeds {path}, line {line}: x and y must be numbers and frame a whole number, "
                                 f"got x={row.get('x')!r} y={row.get('y')!r} frame={row.get('frame')!r}") from None
            if not row["file"]:
                raise ValueError(f"--seeds {path}, line {line}: no file named")
            if not (x == x and y == y) or x in (float("inf"), float("-inf")) or y in (float("inf"), float("-inf")):
                raise ValueError(f"--seeds {path}, line {line}: x and y must be finite numbers")
            if frame is not None and frame < 0:
                raise ValueError(f"--seeds {path}, line {line}: frame must be 0 or more, got {frame}")
            file = Path(row["file"])
            file = str((file if file.is_absolute() else in_dir / file).resolve())
            if file in seen:
                raise ValueError(f"--seeds {path}, line {line}: {row['file']} has a seed already (one seed per file)")
            seen.add(file)
            seeds.append({"file": file, "x": x, "y": y, "frame": frame})
    if not seeds:
        raise ValueError(f"--seeds {path}: no seeds (one line per file: file,x,y[,frame])")
    return seeds


def segment_file(task: Dict, setup: Dict) -> Dict:
    """One file on a worker: read, despeckle, segment, measure; never raises for a bad file."""
    from ..engine.archive import _failure, _worker_engine, engine_lock
    from ..fileio.imageio import read_frames
    from ..segmentation import check_seed, segment_sequence
    from ..fileio.imageio import has_pixel_spacing

    import numpy as np

    t0 = time.perf_counter()
    src = task["input"]
    try:
        data = read_frames(src)
        frames = np.asarray(data.frames)
        frame = task["frame"]
        if frame is not None and not 0 <= frame < len(frames):
            raise ValueError(f"{src}: frame {frame} is outside its {len(frames)} frames (0..{len(frames) - 1})")
        seed_rc = (task["y"], task["x"])
        check_seed(seed_rc, frames.shape)
        start = frame or 0
        wanted = [frame] if frame is not None else list(range(len(frames)))
        tolerance = setup["tolerance"]
        if setup["despeckle"]:
            engine = _worker_engine(setup)
            with engine_lock(engine):
                despeckled = np.array(frames, copy=True)
                despeckled[wanted] = engine.denoise(frames[wanted])
            frames = despeckled
        spacing_rc = (float(data.spacing[1]), float(data.spacing[0]))
        options = {"neighborhood_radius_px": setup["neighborhood"]} if setup["method"] == "flood" else {}
        result = segment_sequence(frames, seed_rc, setup["method"], tolerance, spacing_rc, start_frame=start,
                                  frames_to_segment=wanted, **options)
        area_unit, length_unit = ("mm2", "mm") if has_pixel_spacing(data) else ("px2", "px")
        rows = []
        for k in wanted:
            m = result.measurements[k]
            rows.append({"frame": k, "area": round(float(m.area_mm2), 4),
                         "equivalent_diameter": round(float(m.equivalent_diameter_mm), 4),
                         "major_diameter": round(float(m.major_diameter_mm), 4),
                         "minor_diameter": round(float(m.minor_diameter_mm), 4), "area_unit": area_unit,
                         "length_unit": length_unit, "flagged": bool(result.flagged[k]),
                         "reason": result.flag_reasons[k] if result.flagged[k] else ""})
        return {"status": "done", "frames": len(rows), "flagged": sum(r["flagged"] for r in rows), "rows": rows,
                "seconds": round(time.perf_counter() - t0, 3), "reason": None}
    except (Exception, MemoryError) as err:  # noqa: B014 - one bad file must not end the run
        return _failure(err, src, t0)


def write_table(path, entries: List[Dict], in_dir) -> int:
    """The table from the manifest's finished files, written whole (temporary name, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    count = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, TABLE_COLUMNS)
            writer.writeheader()
            for entry in sorted(entries, key=lambda e: e["input"]):
                name = _relative(entry["input"], in_dir)
                for row in entry.get("rows") or []:
                    writer.writerow({"file": name, **row})
                    count += 1
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count


def _relative(path: str, folder) -> str:
    try:
        return str(Path(path).relative_to(Path(folder).resolve()))
    except ValueError:
        return path


def run_segment_batch(args) -> int:
    """``segment IN_DIR --seeds --table [--workers N | --scheduler ADDRESS]``."""
    from ..engine.archive import (Manifest, Task, check_archive_options, dask_client, fingerprint, options_record,
                                  run_tasks)
    from ..fileio.safeio import check_input_path, check_output_path
    from ..segmentation import DEFAULT_TOLERANCE, DESPECKLED_TOLERANCE
    from .exitcodes import EXIT_FAILED, EXIT_FLAGGED, EXIT_OK

    # 1. options, inputs and outputs, before any work
    in_dir = check_input_path(args.input)
    if not in_dir.is_dir():
        raise ValueError(f"--seeds / --table measure a folder; {args.input} is a file (for one file give --seed X,Y "
                         "--out MASK)")
    if not args.seeds or not args.table:
        raise ValueError("a folder run needs both --seeds seeds.csv and --table out.csv")
    clashing = [o for o, v in (("--seed", args.seed), ("--seed-ras", args.seed_ras), ("--out", args.out),
                               ("--frame", args.frame)) if v is not None]
    if clashing:
        raise ValueError(f"{', '.join(clashing)} belong to a one-file run; in a folder run the seeds file gives each "
                         "file's seed (and frame)")
    if args.no_despeckle and args.model is not None:
        raise ValueError("--model despeckles the input first and --no-despeckle segments it as it is: give one of them")
    if args.method == "radial" and (args.tolerance is not None or args.neighborhood):
        raise ValueError("--tolerance and --neighborhood set the flood fill; the radial method needs none "
                         "(add --method flood to use them)")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    on_dask = bool(args.workers or args.scheduler)
    if on_dask:
        args.skip_existing = False
        check_archive_options(args, True)
    seeds = read_seeds(args.seeds, in_dir)
    table = check_output_path(args.table, [in_dir, args.seeds], suffixes=[".csv"], what="--table")
    manifest = Manifest(table.with_name(table.name + ".manifest.jsonl"))
    tolerance = args.tolerance if args.tolerance is not None else (
        DEFAULT_TOLERANCE if args.no_despeckle else DESPECKLED_TOLERANCE)
    setup = {"method": args.method, "tolerance": tolerance, "neighborhood": args.neighborhood,
             "despeckle": not args.no_despeckle, "model_sha256": None}
    if not args.no_despeckle:
        from ..engine.archive import denoise_setup
        threads = max(1, (os.cpu_count() or 1) // int(args.workers)) if args.workers else None
        setup.update(denoise_setup(args.model, "auto", "auto", {}, threads))
    settings = options_record({k: setup[k] for k in ("method", "tolerance", "neighborhood", "despeckle")})
    tasks = []
    for seed in seeds:
        try:
            stamp = fingerprint(seed["file"])
        except OSError:
            stamp = {"size": None, "mtime_ns": None}       # the worker names the problem
        tasks.append(Task(seed["file"], [],
                          {**stamp, "model_sha256": setup["model_sha256"], "options": settings,
                           "seed": [seed["x"], seed["y"], seed["frame"]]},
                          {"x": seed["x"], "y": seed["y"], "frame": seed["frame"]}))
    # 2. the work: on Dask, or here, file after file
    factory = (lambda: dask_client(args.workers, args.scheduler)) if on_dask else None
    summary = run_tasks(factory, tasks, segment_file, setup, manifest, progress=True)
    # 3. the table, whole, from every finished file of this seeds list
    keys = {t.input for t in tasks}
    done = [e for k, e in manifest.entries.items() if k in keys and e.get("status") == "done"]
    rows = write_table(table, done, in_dir)
    flagged = sum(int(e.get("flagged") or 0) for e in done)
    for reason in summary.failed:
        print(f"error: {reason}", file=sys.stderr)
    print(f"{summary.line()}; {rows} row(s) in {table}, {flagged} frame(s) flagged",
          file=sys.stderr if summary.failed else sys.stdout)
    if summary.failed:
        return EXIT_FAILED
    return EXIT_FLAGGED if flagged else EXIT_OK

