"""Render the extension's catalogue screenshot from a real run of the library.

    python scripts/make_screenshot.py [--out Resources/Screenshots/speckle2self.png]

A simulated carotid phantom (built-in simulator, no data download) is despeckled with the
bundled default model and its lumen segmented from one seed with the default method; the
picture shows input | despeckled | despeckled with the lumen contour and its measurements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Speckle2Self"))


def main(argv=None) -> int:
    from PIL import Image, ImageDraw
    from scipy import ndimage

    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.segmentation import seed_from_mask, segment
    from Speckle2SelfLib.simulation import simulate_phantom

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="Resources/Screenshots/speckle2self.png")
    args = parser.parse_args(argv)
    phantom, sim = simulate_phantom("carotid", seed=3, size=(384, 384))
    noisy = np.round(np.clip(sim.bmode, 0, 1) * 255).astype(np.uint8)
    clean = Despeckler.from_file(None, "cpu").denoise(noisy)
    result = segment(clean, seed_from_mask(phantom.lumen_mask), spacing_mm=sim.pixel_mm)
    edge = result.mask ^ ndimage.binary_erosion(result.mask, iterations=2)
    overlay = np.stack([clean] * 3, axis=-1)
    overlay[edge] = (255, 200, 0)
    panels = [Image.fromarray(noisy).convert("RGB"), Image.fromarray(clean).convert("RGB"), Image.fromarray(overlay)]
    label_h, gap = 22, 6
    w, h = panels[0].size
    canvas = Image.new("RGB", (3 * w + 2 * gap, h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    m = result.measurement
    titles = ["input (simulated B-mode)", "Speckle2Self", f"lumen: {m.area_mm2:.1f} mm2, "
              f"{m.major_diameter_mm:.1f} x {m.minor_diameter_mm:.1f} mm"]
    for k, (panel, title) in enumerate(zip(panels, titles)):
        canvas.paste(panel, (k * (w + gap), label_h))
        draw.text((k * (w + gap) + 4, 5), title, fill=(0, 0, 0))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
