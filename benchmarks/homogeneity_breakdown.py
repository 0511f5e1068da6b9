"""Where a method's GLCM homogeneity comes from, on real carotid images (needs ../shared).

    python benchmarks/homogeneity_breakdown.py --model Resources/Models/speckle2self-carotid-w16-d2-v2.pt
    python benchmarks/homogeneity_breakdown.py --split test --limit 24 --methods raw nlm

GLCM homogeneity (256 levels, distance 1, weight 1 / (1 + (i - j)^2)) is mostly the share of
neighbouring pixels with equal 8-bit values. Much of every carotid frame is the constant
background outside the imaged sector (a quarter of the pixels at the floor grey level), equal
pairs for every method, so homogeneity differences come from the tissue. For each method this
prints the homogeneity and, over the horizontal neighbour pairs in tissue (neither the lumen
nor the background, both taken from the input and the expert mask), the share whose difference
is 0, 1, 2, 3-5 and more than 5 grey levels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

from benchlib import carotid_data as carotid  # noqa: E402
from carotid import evenly  # noqa: E402  (benchmarks/carotid.py: the same image selection)
from Speckle2SelfLib import metrics  # noqa: E402

#: Upper edges of the difference classes: 0, 1, 2, 3-5, > 5 grey levels.
DIFFERENCE_EDGES = (1, 2, 3, 6)
DIFFERENCE_LABELS = ("0", "1", "2", "3-5", ">5")


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image, np.float64)), 0, 255).astype(np.uint8)


def background_mask(image: np.ndarray) -> np.ndarray:
    """The constant surround of the imaged sector: within one grey level of the frame's floor
    after a 3-px Gaussian (so dark speckle inside the sector does not count)."""
    from scipy import ndimage
    values = np.asarray(image, np.float64)
    return ndimage.gaussian_filter(values, 3.0) <= values.min() + 1.0


def pair_statistics(image: np.ndarray, excluded: np.ndarray) -> Tuple[int, np.ndarray]:
    """(horizontal neighbour pairs, difference-class counts) over pairs touching no excluded pixel."""
    values = image.astype(np.int32)
    tissue = ~(excluded[:, :-1] | excluded[:, 1:])
    classes = np.digitize(np.abs(values[:, 1:] - values[:, :-1])[tissue], DIFFERENCE_EDGES)
    return int(values[:, 1:].size), np.bincount(classes, minlength=len(DIFFERENCE_LABELS))


def breakdown(outputs: List[np.ndarray], excluded: List[np.ndarray]) -> Dict[str, float]:
    total = 0
    counts = np.zeros(len(DIFFERENCE_LABELS), np.int64)
    for image, mask in zip(outputs, excluded):
        n, c = pair_statistics(image, mask)
        total, counts = total + n, counts + c
    row = {"homogeneity": float(np.mean([metrics.glcm_homogeneity(o, 255) for o in outputs])),
           "tissue pairs": 100.0 * counts.sum() / max(total, 1)}
    row.update({f"diff {label}": 100.0 * v / max(counts.sum(), 1) for label, v in zip(DIFFERENCE_LABELS, counts)})
    return row


def method_outputs(name: str, images: List[np.ndarray]) -> List[np.ndarray]:
    if name == "raw":
        return [as_uint8(i) for i in images]
    if name == "nlm":
        from benchlib.baselines import BASELINES
        return [as_uint8(BASELINES["nlm"](i)) for i in images]
    from Speckle2SelfLib.engine.inference import Despeckler
    engine = Despeckler.from_file(name, "cpu", backend="fp32")
    return [as_uint8(engine.denoise(i)) for i in images]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("tuning", "test"), default="tuning")
    parser.add_argument("--limit", type=int, default=12, help="images spread over the split (0: all)")
    parser.add_argument("--methods", nargs="*", default=["raw", "nlm"], choices=["raw", "nlm"])
    parser.add_argument("--model", action="append", default=[], help="Speckle2Self model file (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if carotid.shared_dir() is None:
        print("error: the carotid data (../shared/data/carotid) is not here; set SPECKLE2SELF_SHARED", file=sys.stderr)
        return 2
    for path in args.model:
        if not Path(path).is_file():
            print(f"error: model file {path} does not exist; give a .pt file", file=sys.stderr)
            return 2
    import torch
    torch.set_num_threads(max(args.threads, 1))
    loaded = [c.load() for c in evenly(carotid.cases(args.split, with_mask=True), args.limit)]
    images = [i for i, _ in loaded]
    excluded = [m | background_mask(i) for i, m in loaded]
    header = ["homogeneity", "tissue pairs"] + [f"diff {label}" for label in DIFFERENCE_LABELS]
    print(f"{len(images)} {args.split}-subject images; tissue pairs: share of all horizontal neighbour pairs; differences: share of tissue pairs (%)\n")
    print("| method | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for name in list(args.methods) + list(args.model):
        row = breakdown(method_outputs(name, images), excluded)
        cells = [f"{row['homogeneity']:.3f}"] + [f"{row[k]:.1f}" for k in header[1:]]
        print(f"| {Path(name).stem if name not in ('raw', 'nlm') else name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
