"""Does the uncertainty map predict real errors? (``Despeckler.denoise(..., uncertainty=True)``)

Simulated images (the built-in simulator, its expected speckle-free B-mode as the truth), at
7.5, 3.75, 5.63 and 9.38 MHz: the output's absolute error after its gain/offset fit to the
truth, and for each candidate map its sparsification curve (mean error of the pixels left after
removing the fraction f the map ranks as least reliable), the area between it and the oracle's
(pixels removed by their own error; AUSE, in 8-bit grey levels, mean over images) and its
Spearman correlation with the error (mean over images). The trivial maps are the output's
gradient magnitude (Gaussian derivative) and the input's local standard deviation (uniform
window) at three scales each; ratios are to the best of them in the same table (in their favour).

Carotid subjects (needs ../shared): the one-click lumen on the default output from the expert
mask's centroid and 8 displaced seeds (benchmarks/carotid.py's), its IoU against the mask, and two
boundary measures from the map: its mean along the found contour (``segmentation.boundary_uncertainty``)
and the share of the contour where it exceeds the output's gradient (``uncertain_boundary_share``,
chosen on the tuning subjects); results below IoU 0.8 against the others, the difference with a 95%
interval from a bootstrap over subjects.

    python benchmarks/uncertainty.py --tune                 # choose cues/gains on tuning seeds 1000-1004
    python benchmarks/uncertainty.py                        # the table on test seeds 2000-2007
    python benchmarks/uncertainty.py --carotid              # also the carotid test subjects
    python benchmarks/uncertainty.py --n-images 2 --size 128 --freqs 7.5
    python benchmarks/uncertainty.py --no-simulated --figure docs/figures/uncertainty_simulated.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

from Speckle2SelfLib import metrics  # noqa: E402
from Speckle2SelfLib.simulation import make_phantom, simulate_bmode  # noqa: E402

TEST_KINDS = ("carotid", "thyroid", "layers", "points", "random", "carotid", "thyroid", "random")
TEST_SEED_BASE = 2000          # benchmarks/simulated.py's test seeds
TUNE_KINDS = ("carotid", "thyroid", "layers", "points", "random")
TUNE_SEED_BASE = 1000          # its tuning seeds
FREQS_MHZ = (7.5, 3.75, 5.63, 9.38)
FRACTIONS = np.linspace(0.0, 0.99, 100)
GRADIENT_SIGMAS = (1.0, 2.0, 4.0)
#: Carotid frames on which the map's cost is timed (each despeckled with and without it).
TIMED_FRAMES = 8
STD_WINDOWS = (5, 9, 17)
LOW_IOU = 0.8


# ----------------------------------------------------------------------------- scores

def sparsification(error: np.ndarray, ranking: np.ndarray) -> np.ndarray:
    """Mean error of the pixels left after removing the fraction FRACTIONS of those ``ranking``
    puts first (highest values first; ties broken by position, the same for every map)."""
    order = np.argsort(-ranking.ravel(), kind="stable")
    remaining = error.ravel()[order][::-1]                  # least trusted last
    cumulative = np.cumsum(remaining)
    n = remaining.size
    kept = np.maximum(1, np.round((1.0 - FRACTIONS) * n).astype(int))
    return cumulative[kept - 1] / kept


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats
    return float(stats.spearmanr(a.ravel(), b.ravel())[0])


def ause(curve: np.ndarray, oracle: np.ndarray) -> float:
    return float(np.trapezoid(curve - oracle, FRACTIONS))


def trivial_maps(noisy: np.ndarray, output: np.ndarray) -> Dict[str, np.ndarray]:
    from scipy import ndimage

    maps = {}
    for s in GRADIENT_SIGMAS:
        maps[f"gradient s={s:g}"] = ndimage.gaussian_gradient_magnitude(output.astype(np.float64), s)
    x = noisy.astype(np.float64)
    for w in STD_WINDOWS:
        mean = ndimage.uniform_filter(x, w)
        maps[f"local std {w}px"] = np.sqrt(np.maximum(ndimage.uniform_filter(x * x, w) - mean * mean, 0.0))
    return maps


# ----------------------------------------------------------------------------- simulated

def simulate(kinds: Sequence[str], seed_base: int, size: int, fc_mhz: float):
    images = []
    for i, kind in enumerate(kinds):
        phantom = make_phantom(kind, size=(size, size), seed=seed_base + i)
        sim = simulate_bmode(phantom.clean, fc=fc_mhz * 1e6, seed=seed_base + i)
        images.append((sim.bmode.astype(np.float32), sim.reference.astype(np.float32)))
    return images


def image_maps(engine, noisy: np.ndarray):
    """The default output, the product's map and each of its cues (float64, output grey levels)."""
    import torch

    from Speckle2SelfLib.engine import refine, uncertainty
    from Speckle2SelfLib.engine.inference import normalise_frame

    output, product = engine.denoise(noisy, uncertainty=True)
    refined = engine.last_refine == "guided"
    lo, hi = float(noisy.min()), float(noisy.max())
    x = np.empty((1, 1) + noisy.shape, np.float32)
    normalise_frame(noisy, x[0, 0])
    xt = torch.from_numpy(x)
    engine.last_refine = "none"                     # the network's output alone: the guide
    guide = engine._apply_module(xt)
    settings = refine.settings_for(engine.last_working_scale, **refine.model_settings(engine.metadata))
    parts = uncertainty.uncertainty_components(xt, guide, settings, refined, engine.last_working_scale)
    cues = {name: parts[name][0, 0].double().numpy() * (hi - lo) for name in uncertainty.CUES}
    return output.astype(np.float64), product.astype(np.float64), cues


#: Gains (window disagreement, standard error, gradient) tried by --tune.
CANDIDATE_GAINS = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 2, 1), (1, 2, 0), (1, 0, 1), (1, 1, 1), (1, 2, 1), (1, 4, 1),
                   (0.5, 2, 1), (2, 2, 1), (1, 2, 0.5), (1, 2, 2)]


def candidate_maps(cues: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    from Speckle2SelfLib.engine import uncertainty

    return {"cues " + " / ".join(f"{g:g}" for g in gains): sum(g * cues[c] for g, c in zip(gains, uncertainty.CUES))
            for gains in CANDIDATE_GAINS}


def run_simulated(engine, kinds, seed_base: int, size: int, freqs: Sequence[float], tune: bool) -> str:
    rows: Dict[str, Dict[str, List[float]]] = {}
    seconds = {"plain": [], "uncertainty": []}

    def add(name, key, value):
        rows.setdefault(name, {"ause": [], "rho": [], "calib": []})[key].append(value)

    for fc in freqs:
        for noisy, reference in simulate(kinds, seed_base, size, fc):
            start = time.perf_counter()
            engine.denoise(noisy)
            seconds["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.denoise(noisy, uncertainty=True)
            seconds["uncertainty"].append(time.perf_counter() - start)
            output, product, cues = image_maps(engine, noisy)
            fitted = metrics.affine_fit(output, reference.astype(np.float64))
            gain = float(np.polyfit(output.ravel(), reference.ravel().astype(np.float64), 1)[0])
            error = np.abs(fitted - reference) * 255.0
            oracle = sparsification(error, error)
            maps = {"product map": product, **trivial_maps(noisy, output)}
            if tune:
                maps.update(candidate_maps(cues))
            for name, m in maps.items():
                add(name, "ause", ause(sparsification(error, m), oracle))
                add(name, "rho", spearman(m, error))
            # the map's scale: its mean (after the same gain) over the mean absolute error
            add("product map", "calib", float(np.mean(product * abs(gain)) * 255.0 / error.mean()))
    lines = [f"Simulated images ({'tuning' if tune else 'test'} seeds {seed_base}-{seed_base + len(kinds) - 1}, "
             f"{size} px, {', '.join(f'{f:g}' for f in freqs)} MHz; {len(rows['product map']['ause'])} images), "
             f"model {engine.metadata.get('name')}: sparsification of the default output's absolute error after "
             "its gain/offset fit to the truth. AUSE in 8-bit grey levels (lower is better), Spearman rho with the "
             "error (higher is better); means over images.", "",
             "| map | AUSE | AUSE / best trivial | Spearman rho |", "|---|---:|---:|---:|"]
    trivial = {k: v for k, v in rows.items() if k.startswith(("gradient", "local std"))}
    best_trivial = min(float(np.mean(v["ause"])) for v in trivial.values())
    for name, v in sorted(rows.items(), key=lambda kv: np.mean(kv[1]["ause"])):
        a = float(np.mean(v["ause"]))
        lines.append(f"| {name} | {a:.3f} | {a / best_trivial:.2f} | {np.mean(v['rho']):.3f} |")
    lines += ["", f"Map mean / mean absolute error (the map's scale, 1 = calibrated): "
                  f"{np.mean(rows['product map']['calib']):.2f}; time with the map / without: "
                  f"{np.median(seconds['uncertainty']) / np.median(seconds['plain']):.2f}x "
                  f"(median s/image {np.median(seconds['plain']):.3f} vs {np.median(seconds['uncertainty']):.3f})."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- carotid

def run_carotid(engine, split: str, limit: int) -> str:
    """One-click lumen on the default output from every seed of benchmarks/carotid.py (the mask's
    centroid and 8 displaced seeds): each result's IoU and its boundary measures."""
    import carotid
    from benchlib import carotid_data, lumen_evaluation
    from Speckle2SelfLib import segmentation

    if carotid_data.carotid_dir() is None:
        return "Carotid: data not found (../shared/data/carotid or $SPECKLE2SELF_SHARED); skipped."
    chosen = carotid_data.cases(split, with_mask=True)
    chosen = carotid.evenly(chosen, limit) if limit else chosen
    rows, plain_s, with_map_s, timed_shape = [], [], [], None
    for number, case in enumerate(chosen):
        image, mask = case.load()
        if number == 0:                         # warm-up of both calls (and the map's calibration)
            engine.denoise(image)
            engine.denoise(image, uncertainty=True)
        if number < TIMED_FRAMES:               # the map's cost on real frames, which call goes first alternating
            timed_shape = image.shape
            _time_both(engine, image, plain_s, with_map_s, map_first=bool(number % 2))
        output, unc = engine.denoise(image, uncertainty=True)
        for seed in carotid.lumen_seeds(mask):
            try:
                found = segmentation.segment(output, seed, "radial").mask
            except segmentation.SeedNotInLumenError:
                continue                # refused: no contour to judge
            if found.any():
                rows.append((case.subject, lumen_evaluation.iou(found, mask), segmentation.boundary_uncertainty(found, unc),
                             segmentation.uncertain_boundary_share(found, unc, output)))
    subjects = np.array([r[0] for r in rows])
    ious = np.array([r[1] for r in rows])
    low = ious < LOW_IOU
    from scipy import stats
    lines = [f"Carotid {split} subjects ({len(chosen)} images, {len(rows)} one-click radial lumens on the default output "
             f"of {engine.metadata.get('name')} from the mask centroid and 8 displaced seeds, refused seeds left out): "
             f"{low.sum()} results below IoU {LOW_IOU}. Boundary measures of those and of the others, the difference "
             "(low - others) with a 95% interval from a bootstrap over subjects, and Spearman rho with the IoU.", "",
             f"| boundary measure | IoU < {LOW_IOU} | IoU >= {LOW_IOU} | difference (95% CI) | rho with IoU |",
             "|---|---:|---:|---|---:|"]
    if plain_s:
        plain, with_map = float(np.median(plain_s)), float(np.median(with_map_s))
        lines.insert(1, f"Time with the map / without on the first {len(plain_s)} of these frames (the first "
                        f"{timed_shape[1]} x {timed_shape[0]} px): {with_map / plain:.2f}x (median s/image "
                        f"{with_map:.3f} vs {plain:.3f}).")
    for k, name in ((2, "mean of the map along the contour (grey levels)"),
                    (3, "uncertain share of the contour (map > gradient)")):
        values = np.array([r[k] for r in rows], float)
        diff, lo, hi = _bootstrap_difference(values, low, subjects)
        lines.append(f"| {name} | {values[low].mean():.3f} | {values[~low].mean():.3f} | "
                     f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}] | {stats.spearmanr(values, ious)[0]:+.3f} |")
    return "\n".join(lines)


def _time_both(engine, image, plain_s: list, with_map_s: list, map_first: bool) -> None:
    """Seconds of the default output without and with the map on one frame, appended to the lists."""
    calls = [(with_map_s, True), (plain_s, False)] if map_first else [(plain_s, False), (with_map_s, True)]
    for seconds, with_map in calls:
        start = time.perf_counter()
        engine.denoise(image, uncertainty=with_map)
        seconds.append(time.perf_counter() - start)


def _bootstrap_difference(values, low, subjects, resamples: int = 4000, seed: int = 0):
    """Mean of ``values`` over ``low`` frames minus over the others, and its 95% interval from a
    bootstrap resampling whole subjects (frames of one subject are correlated)."""
    if not low.any() or low.all():              # one group is empty (e.g. a --limit run): no difference
        return float("nan"), float("nan"), float("nan")
    groups = [np.nonzero(subjects == s)[0] for s in np.unique(subjects)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        sel_low = low[idx]
        if sel_low.any() and (~sel_low).any():
            diffs.append(values[idx][sel_low].mean() - values[idx][~sel_low].mean())
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(values[low].mean() - values[~low].mean()), float(lo), float(hi)


def write_figure(engine, path: str, seed: int = TEST_SEED_BASE, size: int = 512, crop: int = 224) -> None:
    """Input | default output | uncertainty map | absolute error (after the gain/offset fit), on a
    crop of a simulated test image (7.5 MHz; a vessel phantom); map and error share one colour scale."""
    from PIL import Image

    noisy, reference = simulate(("carotid",), seed, size, 7.5)[0]
    output, unc = engine.denoise(noisy, uncertainty=True)
    gain = float(np.polyfit(output.ravel(), reference.ravel().astype(np.float64), 1)[0])
    error = np.abs(metrics.affine_fit(output.astype(np.float64), reference.astype(np.float64)) - reference)
    r0, c0 = (size - crop) // 2, (size - crop) // 2
    window = np.s_[r0:r0 + crop, c0:c0 + crop]
    top = float(np.percentile(error[window], 99))

    def grey(a):
        a = np.clip(a[window], 0.0, 1.0)
        return np.repeat((a * 255).round().astype(np.uint8)[..., None], 3, axis=-1)

    def heat(a):                       # black - red - yellow - white
        t = np.clip(a[window] / top, 0.0, 1.0)
        rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)
        return (rgb * 255).round().astype(np.uint8)

    panels = [grey(noisy), grey(output), heat(unc * abs(gain)), heat(error)]
    gap = np.full((crop, 4, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)).save(path, optimize=True)
    print(f"figure: {path} (input, default output, uncertainty map, |error|; map and error 0..{top * 255:.1f} "
          "grey levels of 255)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model file or bundled name (default: the bundled default model)")
    parser.add_argument("--tune", action="store_true", help="tuning seeds (1000-1004) and every candidate map")
    parser.add_argument("--n-images", type=int, default=None, help="images per frequency (default: all 8 / 5)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--freqs", type=float, nargs="+", default=list(FREQS_MHZ), help="MHz")
    parser.add_argument("--carotid", action="store_true", help="also the carotid subjects (needs ../shared)")
    parser.add_argument("--split", default="test", choices=["test", "tuning"], help="carotid subjects")
    parser.add_argument("--limit", type=int, default=0, help="carotid images (0: all)")
    parser.add_argument("--no-simulated", action="store_true")
    parser.add_argument("--figure", help="write input | output | map | error of a simulated test image (PNG)")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    from Speckle2SelfLib.engine.inference import Despeckler

    engine = Despeckler.from_file(args.model, "cpu")
    kinds = TUNE_KINDS if args.tune else TEST_KINDS
    kinds = kinds[:args.n_images] if args.n_images else kinds
    if not args.no_simulated:
        print(run_simulated(engine, kinds, TUNE_SEED_BASE if args.tune else TEST_SEED_BASE, args.size,
                            args.freqs, args.tune))
        print()
    if args.carotid:
        print(run_carotid(engine, args.split, args.limit))
    if args.figure:
        write_figure(engine, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
