"""Carotid benchmark on real images: the paper's downstream test plus no-reference quality.

For every method (raw image, classical baselines, any number of Speckle2Self models):
  * flood fill seeded at the expert mask's centroid (the product's own code path,
    Speckle2SelfLib.segmentation, i.e. Slicer's flood-filling algorithm), tolerance tuned per
    method on the TUNING subjects (best mean IoU) and applied unchanged to the TEST subjects;
    IoU at that tolerance and ROC AUC over a tolerance sweep, on the test subjects;
  * GLCM homogeneity of the whole test image and lumen-to-wall CNR (lumen: mask eroded by 3 px;
    wall: ring 2..8 px outside the mask);
  * time per frame.
One-click lumen segmentation (the product's default "radial" method, no parameter to tune):
  * on the raw images and on the images despeckled by each --model (default: the bundled model),
    IoU against the expert mask (mean, median, 10th percentile) from the mask-centroid seed and
    from seeds displaced by 25% of the lumen's equivalent radius in 8 directions, the share of
    results flagged as implausible and of seeds refused (SeedNotInLumenError, scored IoU 0).
Split (benchlib/carotid_data.py): test subjects are 4 of 11 (135 images); tuning the other 7.

    python benchmarks/carotid.py --model Resources/Models/<model>.pt \
        [--methods raw median lee frost srad nlm bm3d obnlm] [--tuning-limit 60] [--test-limit 0] \
        [--cache .bench_cache] [--figure docs/figures/carotid.png]
    python benchmarks/carotid.py --lumen-only [--model A.pt --model B.pt] [--lumen-split tuning] \
        [--lumen-method radial --lumen-method flood]

Prints markdown tables (the lumen table alone with --lumen-only). Outputs of each method are cached as PNG per image (``--cache``), so
adding a model does not recompute the baselines.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

from benchlib import carotid_data as carotid  # noqa: E402
from benchlib.baselines import BASELINES  # noqa: E402
from benchlib import lumen_evaluation, quality  # noqa: E402
from Speckle2SelfLib import metrics, segmentation  # noqa: E402

WALL_RING_PX = (2, 8)
LUMEN_ERODE_PX = 3


def evenly(items: List, limit: int) -> List:
    """At most ``limit`` items spread evenly over the list (0: all); keeps every subject present."""
    if not limit or limit >= len(items):
        return items
    idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(idx))]


def build_methods(names: List[str], models: List[str], device: str, gammas: List[float],
                  refine: bool = False) -> Dict[str, Callable]:
    from benchlib.baselines import BASELINES

    methods: Dict[str, Callable] = {}
    for name in names:
        if name == "raw":
            methods["raw"] = lambda img: img
        elif name in BASELINES:
            methods[name] = BASELINES[name]
        else:
            raise SystemExit(f"unknown method {name!r}; choose raw or one of {', '.join(BASELINES)}")
    for path in models:
        from Speckle2SelfLib.engine.inference import Despeckler
        engine = Despeckler.from_file(path, device)
        outputs = model_outputs(engine, f"Speckle2Self ({Path(path).stem})", refine)
        methods.update(outputs)
        label = next(iter(outputs))      # the default output
        for gamma in gammas:   # the authors' optional display gamma
            methods[f"{label}, gamma {gamma:g}"] = lambda img, e=engine, g=gamma: e.denoise(img, gamma=g)
    return methods


#: --refine-reference: also score guided outputs refined by the direct reference filter
#: (Speckle2SelfLib.engine.refine.guided_smoothing) instead of the product's bilateral grid.
REFINE_REFERENCE = False


def _refined_by_reference(engine, image, refine: str = "auto"):
    engine.refine_method = "direct"
    try:
        return engine.denoise(image, refine=refine)
    finally:
        engine.refine_method = "grid"


def model_outputs(engine, label: str, both: bool) -> Dict[str, Callable]:
    """The model's default output (labelled ", guided" where its metadata recommends the guided
    refinement), and with ``both`` also the other one (", network output" or ", guided");
    with REFINE_REFERENCE each guided output also refined by the direct reference filter."""
    guided = engine.resolve_refine("auto") == "guided"
    outputs = {label + (", guided" if guided else ""): engine.denoise}
    if REFINE_REFERENCE and (guided or both):
        outputs[label + ", guided by the direct reference filter"] = \
            lambda img, e=engine: _refined_by_reference(e, img, "guided")
    if both:
        other = "none" if guided else "guided"
        outputs[label + (", network output" if guided else ", guided")] = \
            lambda img, e=engine, r=other: e.denoise(img, refine=r)
    return outputs


def _cache_key(method: str, image: Path) -> str:
    return hashlib.sha1(f"{method}|{image.name}".encode()).hexdigest()[:16]


def apply_cached(method: str, fn: Callable, case: carotid.CarotidCase, image: np.ndarray,
                 cache: Path, model_files: Dict[str, Path]) -> Tuple[np.ndarray, float]:
    """The method's output (uint8) and seconds taken (0 when read from the cache)."""
    from PIL import Image

    import inspect

    tag = method
    if method in model_files:   # a retrained model under the same name must not hit old results,
        from Speckle2SelfLib.engine import bilateral_grid, inference, refine   # nor a model run by changed code
        tag += str(model_files[method].stat().st_mtime_ns) + "".join(
            inspect.getsource(module) for module in (inference, refine, bilateral_grid))
    elif method != "raw":       # nor a baseline whose defaults or code changed
        tag += inspect.getsource(inspect.getmodule(fn))
    path = cache / f"{_cache_key(tag, case.image)}.png" if cache else None
    if path is not None and path.is_file():
        try:
            return np.array(Image.open(path)), 0.0
        except OSError:
            path.unlink()   # an interrupted earlier run: recompute

    start = time.perf_counter()
    out = fn(image)
    seconds = time.perf_counter() - start
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8) if out.dtype != np.uint8 else out
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part.png")
        Image.fromarray(out).save(tmp)
        tmp.replace(path)   # a killed run never leaves a half-written cache entry
    return out, seconds


def lumen_wall_rois(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    lumen = ndimage.binary_erosion(mask, iterations=LUMEN_ERODE_PX)
    outer = ndimage.binary_dilation(mask, iterations=WALL_RING_PX[1])
    inner = ndimage.binary_dilation(mask, iterations=WALL_RING_PX[0])
    return lumen, outer & ~inner


def evaluate(methods: Dict[str, Callable], tuning, test, cache: Path, model_files, tolerances,
             auc_tolerances) -> Tuple[List[Dict], Dict[str, np.ndarray]]:
    rows, examples = [], {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        tune_imgs, tune_masks, seconds = [], [], []
        for case in tuning:
            img, mask = case.load()
            out, s = apply_cached(name, fn, case, img, cache, model_files)
            tune_imgs.append(out)
            tune_masks.append(mask)
            seconds.append(s)
        tol = lumen_evaluation.tune_tolerance(tune_imgs, tune_masks, tolerances)
        ious, aucs, homs, cnrs = [], [], [], []
        for i, case in enumerate(test):
            img, mask = case.load()
            out, s = apply_cached(name, fn, case, img, cache, model_files)
            seconds.append(s)
            iou, auc = lumen_evaluation.evaluate_flood_fill(out, mask, tol, tolerances=auc_tolerances)
            lumen, wall = lumen_wall_rois(mask)
            ious.append(iou)
            aucs.append(auc)
            homs.append(metrics.glcm_homogeneity(out, 255))
            cnrs.append(quality.cnr(out, lumen, wall))
            if i == len(test) // 2:
                examples[name] = out
        timed = [s for s in seconds if s > 0]
        rows.append({"method": name, "tolerance": tol, "iou": np.mean(ious), "iou_sd": np.std(ious),
                     "auc": np.mean(aucs), "homogeneity": np.mean(homs), "cnr": np.mean(cnrs),
                     "ms": 1000 * np.mean(timed) if timed else float("nan")})
        print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows, examples


def table(rows: List[Dict], n_tuning: int, n_test: int) -> str:
    raw = next((r for r in rows if r["method"] == "raw"), None)
    lines = [f"Tolerance tuned on {n_tuning} tuning-subject images; metrics on {n_test} test-subject images.",
             "", "| method | tolerance | flood-fill IoU | IoU / raw | AUC | GLCM homogeneity | lumen-wall CNR | ms/frame |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['iou'] / raw['iou']:.2f}x" if raw and raw["iou"] > 0 else "-"
        ms = "-" if np.isnan(r["ms"]) else f"{r['ms']:.0f}"
        lines.append(f"| {r['method']} | {r['tolerance']:.0f} | {r['iou']:.3f} ± {r['iou_sd']:.3f} | {ratio} | "
                     f"{r['auc']:.3f} | {r['homogeneity']:.3f} | {r['cnr']:.3f} | {ms} |")
    return "\n".join(lines)


LUMEN_DISPLACEMENT = 0.25      # seed displacement, fraction of the lumen's equivalent radius
LUMEN_DIRECTIONS = 8


def lumen_seeds(mask: np.ndarray) -> List[Tuple[int, int]]:
    """The mask-centroid seed, then seeds displaced by LUMEN_DISPLACEMENT of the equivalent
    radius in LUMEN_DIRECTIONS directions."""
    centre = np.array(segmentation.seed_from_mask(mask), float)
    radius = np.sqrt(np.count_nonzero(mask) / np.pi)
    seeds = [tuple(int(v) for v in centre)]
    for angle in 2 * np.pi * np.arange(LUMEN_DIRECTIONS) / LUMEN_DIRECTIONS:
        offset = LUMEN_DISPLACEMENT * radius * np.array([np.sin(angle), np.cos(angle)])
        seeds.append(tuple(int(round(v)) for v in centre + offset))
    return seeds


def lumen_scores(image: np.ndarray, mask: np.ndarray, method: str,
                 tolerance: float = segmentation.DEFAULT_TOLERANCE) -> List[Tuple[float, bool, bool, float]]:
    """(IoU, flagged, refused, seconds) of the one-click segmentation from every lumen seed
    (``tolerance``: flood fill / growcut only)."""
    out = []
    for seed in lumen_seeds(mask):
        start = time.perf_counter()
        try:
            frame = segmentation.segment(image, seed, method, tolerance=tolerance)
            out.append((lumen_evaluation.iou(frame.mask, mask), frame.flagged, False, time.perf_counter() - start))
        except segmentation.SeedNotInLumenError:
            out.append((0.0, True, True, time.perf_counter() - start))
    return out


def evaluate_lumen(inputs: Dict[str, Callable], cases, cache, model_files, methods: List[str]) -> List[Dict]:
    rows = []
    for name, fn in inputs.items():
        t0 = time.perf_counter()
        scores = {m: [] for m in methods}
        for case in cases:
            img, mask = case.load()
            out, _ = apply_cached(name, fn, case, img, cache, model_files)
            # flood fill / growcut at the CLI's default tolerances for raw and despeckled input
            tolerance = segmentation.DEFAULT_TOLERANCE if name == "raw" else segmentation.DESPECKLED_TOLERANCE
            for method in methods:
                scores[method].append(lumen_scores(out, mask, method, tolerance))
        for method in methods:
            table_ = np.array(scores[method], dtype=float)          # (images, seeds, 4)
            centroid, displaced = table_[:, 0, 0], table_[:, 1:, 0].ravel()
            rows.append({"input": name, "method": method, "n": len(cases), "subjects": [c.subject for c in cases],
                         "centroid": centroid, "displaced": displaced,
                         "flagged": table_[:, :, 1].mean(), "refused": table_[:, :, 2].mean(),
                         "ms": 1000 * table_[:, :, 3].mean()})
        print(f"  lumen, {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def lumen_table(rows: List[Dict], split: str) -> str:
    def stats(v):
        return f"{np.mean(v):.3f} | {np.median(v):.3f} | {np.percentile(v, 10):.3f}"
    n = rows[0]["n"] if rows else 0
    lines = [f"One-click lumen segmentation on {n} {split}-subject images: IoU vs expert masks from the mask-centroid "
             f"seed and from seeds displaced by {LUMEN_DISPLACEMENT:.0%} of the lumen radius ({LUMEN_DIRECTIONS} "
             "directions); flagged: results marked implausible; refused: seeds judged not in a lumen (IoU 0).",
             "vs raw: centroid IoU minus the raw image's, same images, with a 95% interval from a bootstrap over "
             "subjects.",
             "", "| input | method | centroid mean | median | p10 | vs raw (95% CI) | displaced mean | median | p10 | "
             "mean shift | flagged | refused | ms/seed |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    raw = {r["method"]: r for r in rows if r["input"] == "raw"}
    for r in rows:
        shift = np.mean(r["displaced"]) - np.mean(r["centroid"])
        lines.append(f"| {r['input']} | {r['method']} | {stats(r['centroid'])} | {versus_raw(r, raw.get(r['method']))} | "
                     f"{stats(r['displaced'])} | {shift:+.3f} | {r['flagged']:.1%} | {r['refused']:.1%} | {r['ms']:.0f} |")
    return "\n".join(lines)


def versus_raw(row: Dict, raw: Optional[Dict]) -> str:
    """Centroid-seed IoU minus the raw image's on the same images, with a subject-bootstrap 95% CI."""
    if raw is None or row is raw:
        return ""
    mean, lo, hi = quality.paired_difference_ci(row["centroid"], raw["centroid"], row["subjects"])
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def lumen_inputs(models: List[str], device: str, refine: bool = False,
                 baselines: Sequence[str] = ()) -> Tuple[Dict[str, Callable], Dict[str, Path]]:
    """Raw images, the named baselines' outputs and each model's output (no model given: the
    bundled default model), with ``refine`` also its guided refinement."""
    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.engine.models import resolve_model_path

    inputs: Dict[str, Callable] = {"raw": lambda img: img}
    inputs.update({name: BASELINES[name] for name in baselines})
    files: Dict[str, Path] = {}
    for model in models or [None]:
        path = resolve_model_path(model)
        label = f"Speckle2Self ({path.stem})"
        engine = Despeckler.from_file(str(path), device)
        outputs = model_outputs(engine, label, refine)
        inputs.update(outputs)
        files.update({name: path for name in outputs})
    return inputs, files


def figure(examples: Dict[str, np.ndarray], path: Path) -> None:
    from PIL import Image, ImageDraw

    panels = []
    for name, img in examples.items():
        pil = Image.fromarray(img).resize((img.shape[1] // 2, img.shape[0] // 2), Image.BILINEAR)
        ImageDraw.Draw(pil).text((4, 4), name, fill=255)
        panels.append(pil)
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    w, h = panels[0].size
    canvas = Image.new("L", (cols * (w + 4), rows * (h + 4)), 255)
    for k, p in enumerate(panels):
        canvas.paste(p, ((k % cols) * (w + 4), (k // cols) * (h + 4)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def start_run(args):
    """The output cache folder (None: no cache) once the data is found and torch's threads set;
    False, with the reason on stderr, when ../shared/data/carotid is absent."""
    if carotid.carotid_dir() is None:
        print("carotid data not found (../shared/data/carotid); nothing to benchmark", file=sys.stderr)
        return False
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    return Path(args.cache) if args.cache else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=["raw", "median", "lee", "frost", "srad", "nlm", "bm3d", "obnlm"])
    parser.add_argument("--model", action="append", default=[], help="Speckle2Self model file (repeatable)")
    parser.add_argument("--tuning-limit", type=int, default=0, help="tuning images used (0: all 260 with masks)")
    parser.add_argument("--test-limit", type=int, default=0, help="test images used (0: all 135)")
    parser.add_argument("--auc-steps", type=int, default=0,
                        help="tolerances in the AUC sweep over 0..255 (0: every grey level)")
    parser.add_argument("--cache", default=".bench_cache/carotid", help="folder for cached outputs ('' : none)")
    parser.add_argument("--figure", help="write a side-by-side PNG of one test image")
    parser.add_argument("--gamma", type=float, action="append", default=[],
                        help="also score each model with this display gamma (the authors use 1.5)")
    parser.add_argument("--refine-reference", action="store_true",
                        help="also score guided outputs refined by the direct reference filter (the product runs "
                             "the bilateral grid)")
    parser.add_argument("--refine", action="store_true",
                        help="also score each model with refine='guided' (its output steering a smoothing of the input)")
    parser.add_argument("--lumen-only", action="store_true",
                        help="only the one-click lumen table (raw and each --model, default the bundled model)")
    parser.add_argument("--lumen-split", choices=("test", "tuning"), default="test",
                        help="subjects of the lumen table (default test; tuning is for development)")
    parser.add_argument("--lumen-limit", type=int, default=0, help="images in the lumen table (0: all)")
    parser.add_argument("--lumen-baseline", action="append", default=[], choices=sorted(BASELINES),
                        help="also segment this baseline's output in the lumen table (repeatable)")
    parser.add_argument("--lumen-method", action="append", default=[], choices=segmentation.METHODS,
                        help=f"segmentation method(s) of the lumen table (default {segmentation.DEFAULT_METHOD})")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    global REFINE_REFERENCE
    REFINE_REFERENCE = args.refine_reference
    cache = start_run(args)
    if cache is False:
        return 1
    lumen_cases = evenly(carotid.cases(args.lumen_split, with_mask=True), args.lumen_limit)
    inputs, input_files = lumen_inputs(args.model, args.device, args.refine, args.lumen_baseline)
    lumen_methods = args.lumen_method or [segmentation.DEFAULT_METHOD]
    if args.lumen_only:
        print(lumen_table(evaluate_lumen(inputs, lumen_cases, cache, input_files, lumen_methods), args.lumen_split))
        return 0
    tuning = evenly(carotid.cases("tuning", with_mask=True), args.tuning_limit)
    test = evenly(carotid.cases("test", with_mask=True), args.test_limit)
    methods = build_methods(args.methods, args.model, args.device, args.gamma, args.refine)
    model_files = {label: Path(p) for p in args.model for label in methods
                   if label.startswith(f"Speckle2Self ({Path(p).stem})")}
    tolerances = np.arange(0, 81, 1.0)
    auc_tolerances = np.linspace(0, 255, args.auc_steps) if args.auc_steps else None
    rows, examples = evaluate(methods, tuning, test, cache, model_files, tolerances, auc_tolerances)
    print(table(rows, len(tuning), len(test)))
    print()
    print(lumen_table(evaluate_lumen(inputs, lumen_cases, cache, input_files, lumen_methods), args.lumen_split))
    if args.figure:
        figure(examples, Path(args.figure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
