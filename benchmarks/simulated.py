"""Despeckling benchmark on simulated B-mode images with a speckle-free ground truth.

A fixed, seeded test set (mixed phantoms, 45 x 50 mm field of view) is simulated at 7.5 MHz
(the training configuration of the paper) and at 3.75, 5.63 and 9.38 MHz (cross-configuration).
For the noisy input, every classical baseline and every Speckle2Self model given with --model,
it prints one markdown table per frequency: PSNR and SSIM against the expected speckle-free
B-mode (``SimulationResult.reference``: PSF-blurred echogenicity on the same log-compressed
display scale, i.e. what an ideal despeckler can reach), GLCM homogeneity of the output, lumen
IoU against the phantom's lumen on the images with a vessel (flood fill at the best tolerance,
one-click radial), and seconds per image.

    python benchmarks/simulated.py                          # 8 images, 512 x 512, all baselines
    python benchmarks/simulated.py --n-images 2 --size 128 --methods median lee
    python benchmarks/simulated.py --model runs/model.pt --figure sim.png
    python benchmarks/simulated.py --tune                   # grid search of the baselines' defaults
    python benchmarks/simulated.py --methods gaussian_guided --set gaussian_guided:sigma_px=14
    python benchmarks/simulated.py --speckle-stats          # simulator grain size and statistics

--tune uses its own seeds (1000-1004), never the test seeds (2000+).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

from benchlib import baselines as filters  # noqa: E402
from benchlib import lumen_evaluation  # noqa: E402
from benchlib.speckle_statistics import autocorrelation_fwhm_mm, envelope_snr  # noqa: E402
from Speckle2SelfLib import metrics  # noqa: E402
from Speckle2SelfLib.simulation import (PAPER_FREQUENCIES_HZ, grain_fwhm_mm, make_phantom,  # noqa: E402
                                        simulate_bmode)

TEST_KINDS = ("carotid", "thyroid", "layers", "points", "random", "carotid", "thyroid", "random")
TEST_SEED_BASE = 2000
TUNE_KINDS = ("carotid", "thyroid", "layers", "points", "random")
TUNE_SEED_BASE = 1000
TRAIN_FC = 7.5e6
CROSS_FCS = (3.75e6, 5.63e6, 9.38e6)

TUNING_GRIDS: Dict[str, Dict[str, Sequence]] = {
    "median": {"size": (5, 7, 9, 11, 13, 15, 19)},
    "lee": {"size": (7, 9, 11, 13, 15, 19), "noise_scale": (1.0, 1.5, 2.0, 3.0)},
    "frost": {"size": (9, 11, 13, 15, 19), "damping": (0.05, 0.1, 0.25, 0.5)},
    "srad": {"iterations": (50, 100, 200, 400), "offset": (0.01, 0.1, 0.3, 1.0)},
    "nlm": {"h_factor": (1.0, 1.5, 2.0, 2.5, 3.0), "template_size": (7, 11)},
    "bm3d": {"noise_scale": (0.5, 1.0, 2.0, 4.0)},
    "obnlm": {"h": (3.0, 4.0, 6.0, 8.0), "block_radius": (3, 4, 5)},
    "gaussian_guided": {"guide_sigma_px": (2.0, 4.0, 8.0), "sigma_px": (7.0, 14.0), "range_sigma": (0.04, 0.08, 0.12)},
}
# Settings within this SSIM of the best count as equally good; of those the highest PSNR wins.
# (SSIM alone keeps rewarding ever larger windows on piecewise-constant phantoms.)
SSIM_TOLERANCE = 0.01

Method = Callable[[np.ndarray], np.ndarray]


def simulate_set(kinds: Sequence[str], seed_base: int, size: int, fc: float):
    """(noisy bmode, reference, clean, lumen mask or None) per image; the phantom depends on the
    seed only, so the same anatomy is imaged at every frequency."""
    images = []
    for i, kind in enumerate(kinds):
        phantom = make_phantom(kind, size=(size, size), seed=seed_base + i)
        sim = simulate_bmode(phantom.clean, fc=fc, seed=seed_base + i)
        images.append((sim.bmode, sim.reference, sim.clean, phantom.lumen_mask))
    return images


#: Flood-fill tolerances (8-bit grey levels) searched for each method's best on the lumen images.
LUMEN_TOLERANCES = np.arange(0, 81, 1.0)


def lumen_scores(outputs: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> Dict[str, float]:
    """Lumen segmentation on the outputs of the images with a vessel (carotid, thyroid phantoms),
    seeded at the lumen's centroid, on the output as 8-bit: flood fill at the tolerance best for
    this method over these images (an upper bound for every method alike), and the product's
    one-click radial segmentation."""
    from Speckle2SelfLib import segmentation

    images = [np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8) for out in outputs]
    flood = lumen_evaluation.iou_table(images, masks, LUMEN_TOLERANCES).mean(axis=0)
    radial = []
    for image, mask in zip(images, masks):
        try:
            found = segmentation.segment(image, segmentation.seed_from_mask(mask), "radial").mask
            radial.append(lumen_evaluation.iou(found, mask))
        except segmentation.SeedNotInLumenError:
            radial.append(0.0)
    return {"lumen_flood": float(flood.max()), "lumen_radial": float(np.mean(radial))}


def load_models(paths: Sequence[str], refine: bool = False, refine_reference: bool = False) -> Dict[str, Method]:
    """Each model's default output, and with ``refine`` also the other one (guided or not);
    with ``refine_reference`` guided outputs also refined by the direct reference filter."""
    if not paths:
        return {}
    from Speckle2SelfLib.engine.inference import Despeckler

    import carotid   # benchmarks/carotid.py: the default and the other output
    from carotid import model_outputs

    carotid.REFINE_REFERENCE = refine_reference

    models = {}
    for path in paths:
        models.update(model_outputs(Despeckler.from_file(path), f"Speckle2Self ({Path(path).stem})", refine))
    return models


def evaluate(method: Method, images, lumen: bool = True) -> Tuple[Dict[str, float], List[np.ndarray]]:
    """Mean scores of ``method`` over ``images`` (``lumen``: also the lumen IoU) and its outputs."""
    scores = {"psnr": [], "ssim": [], "psnr_fit": [], "ssim_fit": [], "glcm": [], "seconds": []}
    outputs = []
    for noisy, reference, _clean, _lumen in images:
        start = time.perf_counter()
        out = method(noisy)
        scores["seconds"].append(time.perf_counter() - start)
        out = np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)
        scores["psnr"].append(metrics.psnr(reference, out, data_range=1.0))
        scores["ssim"].append(metrics.ssim(reference, out, data_range=1.0))
        fitted = metrics.affine_fit(out, reference, (0.0, 1.0))
        scores["psnr_fit"].append(metrics.psnr(reference, fitted, data_range=1.0))
        scores["ssim_fit"].append(metrics.ssim(reference, fitted, data_range=1.0))
        scores["glcm"].append(metrics.glcm_homogeneity(out, data_range=1.0))
        outputs.append(out)
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    with_lumen = [(out, image[3]) for out, image in zip(outputs, images) if image[3] is not None]
    if lumen and with_lumen:
        means.update(lumen_scores(*zip(*with_lumen)))
    return means, outputs


def markdown_table(title: str, rows: Dict[str, Dict[str, float]]) -> str:
    lines = [f"### {title}", "", "PSNR/SSIM 'fit': after a least-squares gain and offset of the output onto the "
             "reference (scores structure, not the grey-scale mapping).", "",
             "Lumen IoU on the images with a vessel, seeded at its centroid: flood fill at the method's best "
             "tolerance over these images, and the one-click radial segmentation.", "",
             "| method | PSNR (dB) | SSIM | PSNR fit | SSIM fit | GLCM homogeneity | lumen flood IoU | "
             "one-click lumen IoU | s / image |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows.items():
        lumen = " | ".join(f"{s[k]:.3f}" if k in s else "" for k in ("lumen_flood", "lumen_radial"))
        lines.append(f"| {name} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_fit']:.2f} | {s['ssim_fit']:.4f} | "
                     f"{s['glcm']:.4f} | {lumen} | {s['seconds']:.3f} |")
    return "\n".join(lines)


def write_figure(path: str, panels: List[Tuple[str, np.ndarray]]) -> None:
    """One row of labelled panels (input | methods | reference | clean) as a PNG."""
    from PIL import Image, ImageDraw

    height, width = panels[0][1].shape
    label_h, gap = 16, 4
    canvas = Image.new("L", (len(panels) * (width + gap) - gap, height + label_h), color=255)
    draw = ImageDraw.Draw(canvas)
    for i, (name, img) in enumerate(panels):
        x = i * (width + gap)
        canvas.paste(Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)), (x, label_h))
        draw.text((x + 2, 2), name[: max(4, width // 7)], fill=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def run_benchmark(args: argparse.Namespace) -> int:
    unused = sorted({name for name, _key, _value in args.set} - set(args.methods))
    if unused:
        print(f"error: --set for {', '.join(unused)}, which --methods does not run", file=sys.stderr)
        return 2
    methods: Dict[str, Method] = {"noisy input": lambda img: img}
    methods.update({name: with_settings(name, args.set) for name in args.methods})
    methods.update(load_models(args.model, args.refine, args.refine_reference))
    kinds = [TEST_KINDS[i % len(TEST_KINDS)] for i in range(args.n_images)]
    fcs = [TRAIN_FC] + ([] if args.no_cross else list(CROSS_FCS))
    print(f"Simulated test set: {args.n_images} images ({', '.join(kinds)}), {args.size} x {args.size} px, "
          f"seeds {TEST_SEED_BASE}..{TEST_SEED_BASE + args.n_images - 1}; scores against the "
          "speckle-free reference B-mode, mean over images.\n")
    for fc in fcs:
        images = simulate_set(kinds, TEST_SEED_BASE, args.size, fc)
        rows, outputs = {}, {}
        for name, method in methods.items():
            rows[name], outputs[name] = evaluate(method, images)
        setting = "training configuration" if fc == TRAIN_FC else "cross-configuration"
        print(markdown_table(f"{fc / 1e6:.2f} MHz ({setting})", rows) + "\n")
        if args.figure and fc == TRAIN_FC:
            noisy, reference, clean, _lumen = images[0]
            panels = [("input", noisy)] + [(n, o[0]) for n, o in outputs.items() if n != "noisy input"]
            write_figure(args.figure, panels + [("reference", reference), ("clean", clean)])
            print(f"figure: {args.figure}\n")
    return 0


def parse_setting(text: str) -> Tuple[str, str, float]:
    """``NAME:KEY=VALUE`` (e.g. ``gaussian_guided:sigma_px=14``) -> (name, key, value); KEY must
    be a parameter of that baseline, and VALUE a whole number where its default is one."""
    import inspect

    try:
        name, assignment = text.split(":", 1)
        key, value = assignment.split("=", 1)
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=NUMBER, got {text!r}") from None
    if name not in filters.BASELINES:
        raise argparse.ArgumentTypeError(f"unknown baseline {name!r} (one of {', '.join(filters.BASELINES)})")
    parameters = {k: p.default for k, p in inspect.signature(filters.BASELINES[name]).parameters.items()
                  if p.default is not inspect.Parameter.empty}
    if key not in parameters:
        raise argparse.ArgumentTypeError(f"{name} has no parameter {key!r} (it has {', '.join(parameters)})")
    if isinstance(parameters[key], int) and not isinstance(parameters[key], bool):
        if not number.is_integer():
            raise argparse.ArgumentTypeError(f"{name}:{key} takes a whole number, got {value}")
        number = int(number)
    return name, key, number


def with_settings(name: str, settings: Sequence[Tuple[str, str, float]]) -> Method:
    """The baseline ``name`` with the ``--set`` values given for it (its defaults otherwise)."""
    params = {key: value for target, key, value in settings if target == name}
    if not params:
        return filters.BASELINES[name]
    return lambda img: filters.BASELINES[name](img, **params)


def run_tuning(args: argparse.Namespace) -> int:
    if args.set:
        print("error: --set has no effect with --tune (it searches TUNING_GRIDS)", file=sys.stderr)
        return 2
    images = simulate_set(TUNE_KINDS, TUNE_SEED_BASE, args.size, TRAIN_FC)
    print(f"Tuning set: {', '.join(TUNE_KINDS)}, seeds {TUNE_SEED_BASE}..{TUNE_SEED_BASE + len(TUNE_KINDS) - 1}, "
          f"{args.size} x {args.size} px, 7.5 MHz; criterion: highest mean PSNR among the settings "
          f"within {SSIM_TOLERANCE} of the best mean SSIM (both vs the reference B-mode).\n")
    for name in args.methods:
        grid = TUNING_GRIDS[name]
        results = []
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid.keys(), values))
            scores, _ = evaluate(lambda img, p=params: filters.BASELINES[name](img, **p), images, lumen=False)
            results.append((scores["ssim"], scores["psnr"], params))
            print(f"{name} {params}: SSIM {scores['ssim']:.4f} PSNR {scores['psnr']:.2f} "
                  f"({scores['seconds']:.2f} s/img)", flush=True)
        best_ssim = max(r[0] for r in results)
        best = max((r for r in results if r[0] >= best_ssim - SSIM_TOLERANCE), key=lambda r: r[1])
        print(f"**{name}: chosen {best[2]} SSIM {best[0]:.4f} PSNR {best[1]:.2f} "
              f"(best SSIM {best_ssim:.4f})**\n", flush=True)
    return 0


def run_speckle_stats(args: argparse.Namespace) -> int:
    """Grain size and envelope statistics of the simulator in a homogeneous medium."""
    print(f"Homogeneous medium, {args.size} x {args.size} px over 45 x 50 mm, 3 seeds, inner region "
          "(10 % margin); FWHM of the envelope autocovariance.\n")
    print("| fc (MHz) | axial FWHM (mm) | target | lateral FWHM (mm) | target | envelope mean/std | s / image |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    flat = np.full((args.size, args.size), 0.7, np.float32)
    margin = args.size // 10
    box = (margin, args.size - margin, margin, args.size - margin)
    mask = np.zeros(flat.shape, bool)
    mask[margin:-margin, margin:-margin] = True
    for fc in PAPER_FREQUENCIES_HZ:
        fwhms, snrs, seconds = [], [], []
        for seed in range(3):
            start = time.perf_counter()
            result = simulate_bmode(flat, fc=fc, seed=seed)
            seconds.append(time.perf_counter() - start)
            fwhms.append(autocorrelation_fwhm_mm(result.envelope, box, result.pixel_mm))
            snrs.append(envelope_snr(result.envelope, mask))
        axial, lateral = np.mean(fwhms, axis=0)
        target = grain_fwhm_mm(fc)
        print(f"| {fc / 1e6:.2f} | {axial:.3f} | {target[0]:.3f} | {lateral:.3f} | {target[1]:.3f} | "
              f"{np.mean(snrs):.3f} | {np.median(seconds):.3f} |")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-images", type=int, default=8, help="test images per frequency (default 8)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--model", action="append", default=[], metavar="PATH",
                        help="Speckle2Self model file to evaluate (repeatable)")
    parser.add_argument("--methods", nargs="*", default=list(filters.BASELINES), choices=list(filters.BASELINES),
                        metavar="NAME", help=f"baselines to run (default all: {', '.join(filters.BASELINES)})")
    parser.add_argument("--refine", action="store_true", help="also score each model with refine='guided'")
    parser.add_argument("--refine-reference", action="store_true",
                        help="also score guided outputs refined by the direct reference filter (the product runs "
                             "the bilateral grid)")
    parser.add_argument("--set", action="append", default=[], type=parse_setting, metavar="NAME:KEY=VALUE",
                        help="run a baseline with another parameter value, e.g. gaussian_guided:sigma_px=14 (repeatable)")
    parser.add_argument("--no-cross", action="store_true", help="only 7.5 MHz, skip the cross-configuration")
    parser.add_argument("--figure", help="write a side-by-side PNG of the first 7.5 MHz test image")
    parser.add_argument("--tune", action="store_true", help="grid-search the baselines' parameters instead")
    parser.add_argument("--speckle-stats", action="store_true",
                        help="print the simulator's grain size and envelope statistics instead")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: more threads than free cores, e.g. beside a "
                             "training run, made the tuning 25x slower)")
    args = parser.parse_args(argv)
    if args.n_images < 1 or args.size < 64 or args.threads < 1:
        parser.error("--n-images and --threads must be >= 1 and --size >= 64")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.speckle_stats:
        return run_speckle_stats(args)
    return run_tuning(args) if args.tune else run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
