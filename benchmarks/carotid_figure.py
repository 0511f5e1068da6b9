"""Figure: raw | NLM | Speckle2Self (network output | default, with the guided refinement where
the model recommends it) on three test-subject carotid images, at full resolution.

    python benchmarks/carotid_figure.py --out docs/figures/carotid_comparison.png [--model MODEL.pt]

One row per image (three different test subjects), a 360 x 300 px window centred on the expert
lumen mask, no resampling, so speckle and vessel walls are seen as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))

from benchlib import carotid_data as carotid  # noqa: E402

WINDOW = (300, 360)   # rows, columns


def window(mask: np.ndarray, shape) -> tuple:
    rows, cols = np.nonzero(mask)
    r = int(np.clip(rows.mean() - WINDOW[0] // 2, 0, shape[0] - WINDOW[0]))
    c = int(np.clip(cols.mean() - WINDOW[1] // 2, 0, shape[1] - WINDOW[1]))
    return slice(r, r + WINDOW[0]), slice(c, c + WINDOW[1])


def main(argv=None) -> int:
    from PIL import Image, ImageDraw

    from benchlib.baselines import BASELINES
    from Speckle2SelfLib.engine.inference import Despeckler

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/figures/carotid_comparison.png")
    parser.add_argument("--model", help="model file (default: the bundled default model)")
    args = parser.parse_args(argv)
    if carotid.carotid_dir() is None:
        print("carotid data not found (../shared/data/carotid)", file=sys.stderr)
        return 1
    engine = Despeckler.from_file(args.model, "cpu")
    cases = carotid.cases("test", with_mask=True)
    picks, seen = [], set()
    for case in cases[len(cases) // 3:] + cases[:len(cases) // 3]:   # one image of each of three subjects
        if case.subject not in seen:
            picks.append(case)
            seen.add(case.subject)
        if len(picks) == 3:
            break
    label_h, gap = 18, 6
    name = engine.metadata.get("name")
    guided = engine.resolve_refine("auto") == "guided"
    columns = ["raw", "NLM", f"{name}, network output"] + ([f"{name}, guided (default)"] if guided else [])
    canvas = Image.new("L", (len(columns) * (WINDOW[1] + gap) - gap, len(picks) * (WINDOW[0] + label_h + gap)), 255)
    draw = ImageDraw.Draw(canvas)
    for i, case in enumerate(picks):
        image, mask = case.load()
        panels = [image, BASELINES["nlm"](image), engine.denoise(image, refine="none")]
        if guided:
            panels.append(engine.denoise(image, refine="guided"))
        rs, cs = window(mask, image.shape)
        y = i * (WINDOW[0] + label_h + gap)
        for j, (name, panel) in enumerate(zip(columns, panels)):
            x = j * (WINDOW[1] + gap)
            tile = np.clip(np.rint(np.asarray(panel, np.float64)[rs, cs]), 0, 255).astype(np.uint8)
            canvas.paste(Image.fromarray(tile), (x, y + label_h))
            draw.text((x + 2, y + 3), f"{name} - {case.image.stem}" if j == 0 else name, fill=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
