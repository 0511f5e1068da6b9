"""Choose between candidate models on the TUNING subjects only (the test subjects stay unseen).

One line per candidate (raw, a baseline such as nlm, any number of Speckle2Self models), on
``--limit`` images spread evenly over the 7 tuning subjects:
  * flood IoU: mean flood-fill IoU from the mask centroid at the candidate's best tolerance
    (the paper's protocol, tuned and scored on the same images: an upper bound, for ranking);
  * homogeneity: whole-image GLCM homogeneity (as benchmarks/carotid.py);
  * CNR: lumen (mask eroded 3 px) versus wall ring (2..8 px outside the mask);
  * radial: the one-click lumen segmentation (the product's default method) from the mask
    centroid, at the CLI's tolerance for raw or despeckled input;
  * black: share of tissue pixels (raw 9x9 local mean >= 20 grey levels, outside the lumen mask;
    most of these frames is near-black background) that the candidate sets to 0 (a head that
    clips dark tissue to black shows here).
The figures a release is judged on come from benchmarks/carotid.py on the test subjects.

    python benchmarks/model_selection.py --model A.pt --model B.pt [--methods raw nlm] [--limit 80] [--refine]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import carotid as bench  # noqa: E402  (benchmarks/carotid.py: methods, cache, ROIs)
from benchlib import carotid_data as carotid  # noqa: E402
from benchlib import lumen_evaluation, quality  # noqa: E402
from Speckle2SelfLib import metrics, segmentation  # noqa: E402

TOLERANCES = np.arange(0, 81, 1.0)
TISSUE_LEVEL = 20.0


def score(name: str, fn, cases, cache, model_files) -> Dict:
    outputs, masks, tissue = [], [], []
    for case in cases:
        image, mask = case.load()
        outputs.append(bench.apply_cached(name, fn, case, image, cache, model_files)[0])
        masks.append(mask)
        tissue.append((ndimage.uniform_filter(image.astype(np.float32), 9) >= TISSUE_LEVEL) & ~mask)
    flood = lumen_evaluation.iou_table(outputs, masks, TOLERANCES).mean(axis=0)
    best = int(np.argmax(flood))
    tolerance = segmentation.DEFAULT_TOLERANCE if name == "raw" else segmentation.DESPECKLED_TOLERANCE
    radial, black, homs, cnrs = [], [], [], []
    for out, mask, region in zip(outputs, masks, tissue):
        radial.append(bench.lumen_scores(out, mask, segmentation.DEFAULT_METHOD, tolerance)[0][0])
        black.append(np.count_nonzero((out == 0) & region) / max(np.count_nonzero(region), 1))
        homs.append(metrics.glcm_homogeneity(out, 255))
        cnrs.append(quality.cnr(out, *bench.lumen_wall_rois(mask)))
    return {"method": name, "tolerance": TOLERANCES[best], "flood": flood[best], "homogeneity": np.mean(homs),
            "cnr": np.mean(cnrs), "radial": np.mean(radial), "black": np.mean(black)}


def table(rows: List[Dict], n: int) -> str:
    lines = [f"{n} tuning-subject images (model selection only; reported figures: benchmarks/carotid.py).", "",
             "| candidate | tolerance | flood IoU (best tol.) | GLCM homogeneity | lumen-wall CNR | radial lumen | black |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['tolerance']:g} | {r['flood']:.3f} | {r['homogeneity']:.3f} | "
                     f"{r['cnr']:.3f} | {r['radial']:.3f} | {r['black']:.2%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=["raw", "nlm"])
    parser.add_argument("--model", action="append", default=[], help="Speckle2Self model file (repeatable)")
    parser.add_argument("--limit", type=int, default=80, help="tuning images used (0: all 260 with masks)")
    parser.add_argument("--cache", default=".bench_cache/carotid", help="folder for cached outputs ('' : none)")
    parser.add_argument("--refine", action="store_true", help="also score each model with refine='guided'")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    cache = bench.start_run(args)
    if cache is False:
        return 1
    cases = bench.evenly(carotid.cases("tuning", with_mask=True), args.limit)
    methods = bench.build_methods(args.methods, args.model, args.device, [], args.refine)
    model_files = {label: Path(p) for p in args.model for label in methods
                   if label.startswith(f"Speckle2Self ({Path(p).stem})")}
    rows = []
    for name, fn in methods.items():
        rows.append(score(name, fn, cases, cache, model_files))
        print(f"  {name}: done", file=sys.stderr)
    print(table(rows, len(cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
