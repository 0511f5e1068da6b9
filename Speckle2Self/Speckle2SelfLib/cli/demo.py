"""`speckle2self demo`: the main job on inputs that need no download.

Despeckles (1) a simulated carotid phantom, whose clean image is known, and (2) a real
ultrasound DICOM shipped by the ``pydicom-data`` package, with the bundled default model;
writes the outputs, a side-by-side PNG and the metrics (also printed as a table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

DEMO_DICOM = "US1_UNCR.dcm"   # GE lymph node scan with a power-Doppler overlay


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from .options import int_at_least

    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--model", help="model file or bundled name (default: the bundled default model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="phantom seed")


def run_demo(args: argparse.Namespace) -> int:
    from ..engine.inference import Despeckler

    from ..fileio.safeio import check_output_path

    out = check_output_path(args.out, folder=True, what="--out")
    engine = Despeckler.from_file(args.model, args.device)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_phantom_case(engine, out, args.seed), _dicom_case(engine, out)]
    rows = [r for r in rows if r is not None]
    _side_by_side(out, rows)
    metrics = {r["name"]: r["metrics"] for r in rows}
    metrics["model"] = {"name": engine.metadata.get("name"), "file": str(engine.loaded.path),
                        "device": engine.device}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(_table(rows))
    print()
    print(_conclusions(rows))
    print(f"\nwrote {out}/ (side_by_side.png, metrics.json and the images)")
    return 0


def _timed(engine, image: np.ndarray):
    start = time.perf_counter()
    result = engine.denoise(image)
    return result, time.perf_counter() - start


def _phantom_case(engine, out: Path, seed: int) -> Dict:
    from .. import metrics
    from ..simulation import simulate_phantom

    phantom, sim = simulate_phantom("carotid", seed=seed, size=(512, 512))
    noisy = np.round(sim.bmode * 255).astype(np.uint8)
    # The speckle-free B-mode on the same display scale: what an ideal despeckler would give.
    clean = np.round(np.clip(sim.reference, 0, 1) * 255).astype(np.uint8)
    result, seconds = _timed(engine, noisy)
    _save(out / "phantom_noisy.png", noisy)
    _save(out / "phantom_despeckled.png", result)
    _save(out / "phantom_clean.png", clean)
    region = phantom.homogeneous_mask
    m = {}
    for label, img in (("input", noisy), ("despeckled", result)):
        # The despeckled image's grey levels are not on the clean image's scale (the network
        # estimates the speckle-free signal up to gain and offset, mapped back by min-max), so
        # PSNR/SSIM against the clean image are taken after a least-squares gain/offset fit;
        # the raw values are kept for reference.
        fitted = affine_fit(img, clean)
        m[label] = {"psnr_db": metrics.psnr(clean, fitted, 255), "ssim": metrics.ssim(clean, fitted, 255),
                    "psnr_db_raw": metrics.psnr(clean, img, 255), "ssim_raw": metrics.ssim(clean, img, 255),
                    "glcm_homogeneity": metrics.glcm_homogeneity(img, 255),
                    "speckle_snr": metrics.speckle_snr(img, region)}
    m["seconds"] = seconds
    return {"name": "simulated carotid phantom", "images": [noisy, result, clean],
            "labels": ["input", "despeckled", "clean"], "metrics": m}


def _dicom_case(engine, out: Path):
    from pydicom.data import get_testdata_file

    from .. import metrics
    from ..fileio.imageio import read_frames, write_like

    path = get_testdata_file(DEMO_DICOM)
    if path is None:
        print(f"note: {DEMO_DICOM} not found; install pydicom-data for the real-image demo")
        return None
    data = read_frames(path)
    result, seconds = _timed(engine, data.frames[0])
    write_like(out / "dicom_despeckled.dcm", result, data)
    _save(out / "dicom_input.png", data.frames[0])
    _save(out / "dicom_despeckled.png", result)
    # Half of this frame is the empty black background around the scan sector, plus a colour
    # Doppler box: whole-frame statistics mostly measure those. Speckle is measured in the tissue
    # (the sector, eroded, without the Doppler overlay); the background level is reported apart.
    tissue, background = _dicom_regions(data)
    m = {}
    for label, img in (("input", data.frames[0]), ("despeckled", result)):
        m[label] = {"glcm_homogeneity": tiled_homogeneity(img, tissue),
                    "speckle_snr": metrics.speckle_snr(img, tissue),
                    "glcm_homogeneity_whole_frame": metrics.glcm_homogeneity(img, 255),
                    "background_level": float(np.mean(img[background])) if background.any() else 0.0}
    m["tissue_fraction"] = float(tissue.mean())
    m["seconds"] = seconds
    return {"name": f"real DICOM {DEMO_DICOM}", "images": [data.frames[0], result],
            "labels": ["input", "despeckled"], "metrics": m}


def affine_fit(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``gain * image + offset`` fitted to ``reference`` by least squares, clipped to 0..255."""
    from ..metrics import affine_fit as fit
    return fit(image, reference, (0.0, 255.0))


def tiled_homogeneity(image: np.ndarray, mask: np.ndarray, tile: int = 32) -> float:
    """Mean GLCM homogeneity of the tiles that lie fully inside ``mask``."""
    from .. import metrics

    values = [metrics.glcm_homogeneity(np.ascontiguousarray(image[r:r + tile, c:c + tile]), 255)
              for r in range(0, image.shape[0] - tile + 1, tile)
              for c in range(0, image.shape[1] - tile + 1, tile) if mask[r:r + tile, c:c + tile].all()]
    return float(np.mean(values)) if values else float("nan")


def _dicom_regions(data):
    """(tissue, background) masks of a sector scan: tissue = non-black pixels away from the
    sector's edge and from colour (Doppler) pixels; background = black pixels away from it."""
    from scipy import ndimage

    frame = data.frames[0]
    inside = frame > 0
    colour = np.zeros_like(inside)
    source = getattr(data.source, "pixel_array", None) if data.was_rgb else None
    if source is not None and source.ndim == 3 and source.shape[-1] == 3:
        colour = (source.max(axis=-1).astype(np.int32) - source.min(axis=-1)) > 20
    tissue = ndimage.binary_erosion(inside & ~ndimage.binary_dilation(colour, iterations=8), iterations=12)
    background = ndimage.binary_erosion(~inside, iterations=10)
    return tissue, background


def _conclusions(rows: List[Dict]) -> str:
    """What the table says, in words."""
    lines = ["How to read it: higher is better in every column. PSNR and SSIM compare with the speckle-free "
             "phantom after a least-squares gain/offset fit (the despeckled grey levels are on another scale; "
             "raw values in metrics.json). Homogeneity and speckle SNR are measured in tissue only (phantom: "
             "homogeneity over the whole image, which is all tissue, speckle SNR in its homogeneous regions; "
             "DICOM: the scan sector without its Doppler box)."]
    for row in rows:
        before, after = row["metrics"]["input"], row["metrics"]["despeckled"]
        if "psnr_db" in before:
            better = after["psnr_db"] > before["psnr_db"] and after["ssim"] > before["ssim"]
            lines.append(f"- {row['name']}: PSNR {before['psnr_db']:.1f} -> {after['psnr_db']:.1f} dB, SSIM "
                         f"{before['ssim']:.2f} -> {after['ssim']:.2f}: the despeckled image is "
                         f"{'closer to' if better else 'NOT closer to'} the speckle-free image.")
        else:
            smoother = after["speckle_snr"] > before["speckle_snr"]
            lines.append(f"- {row['name']}: in the tissue, homogeneity {before['glcm_homogeneity']:.2f} -> "
                         f"{after['glcm_homogeneity']:.2f} and speckle SNR {before['speckle_snr']:.2f} -> "
                         f"{after['speckle_snr']:.2f}: speckle is {'reduced' if smoother else 'NOT reduced'}."
                         + _background_note(before, after))
    return "\n".join(lines)


#: Grey levels by which the despeckled background around a scan sector may differ from the
#: input's before the demo calls it an artefact (8-bit display levels).
BACKGROUND_LIFT_LEVELS = 2.0


def _background_note(before: Dict, after: Dict) -> str:
    """What happened to the black background around the scan sector, from the measurements."""
    lift = after["background_level"] - before["background_level"]
    whole = (f"whole-frame homogeneity {before['glcm_homogeneity_whole_frame']:.2f} -> "
             f"{after['glcm_homogeneity_whole_frame']:.2f}")
    if abs(lift) < BACKGROUND_LIFT_LEVELS:
        return (f" The black background around the sector stays black ({before['background_level']:.1f} -> "
                f"{after['background_level']:.1f} grey levels; {whole}).")
    return (f" The black background around the sector is {'lifted' if lift > 0 else 'darkened'} from "
            f"{before['background_level']:.1f} to {after['background_level']:.1f} grey levels (a model artefact; "
            f"{whole} mostly measures that background).")


def _save(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    from ..fileio.imageio import to_uint8
    Image.fromarray(to_uint8(img)).save(path)


def _side_by_side(out: Path, rows: List[Dict], height: int = 384) -> None:
    """One row per case, its panels scaled to a common height."""
    from PIL import Image, ImageDraw

    from ..fileio.imageio import to_uint8

    lines = []
    for row in rows:
        panels = []
        for img, label in zip(row["images"], row["labels"]):
            pil = Image.fromarray(to_uint8(img))
            pil = pil.resize((round(pil.width * height / pil.height), height), Image.BILINEAR)
            ImageDraw.Draw(pil).text((6, 6), label, fill=255)
            panels.append(pil)
        line = Image.new("L", (sum(p.width for p in panels) + 4 * (len(panels) - 1), height), 255)
        x = 0
        for p in panels:
            line.paste(p, (x, 0))
            x += p.width + 4
        lines.append(line)
    canvas = Image.new("L", (max(line.width for line in lines), sum(line.height + 4 for line in lines)), 255)
    y = 0
    for line in lines:
        canvas.paste(line, (0, y))
        y += line.height + 4
    canvas.save(out / "side_by_side.png")


def _table(rows: List[Dict]) -> str:
    lines = ["| case | image | PSNR dB (fitted) | SSIM (fitted) | GLCM homogeneity (tissue) | speckle SNR (tissue) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for label in ("input", "despeckled"):
            m = row["metrics"][label]
            cells = [f"{m[k]:.3f}" if k in m else "-" for k in ("psnr_db", "ssim", "glcm_homogeneity", "speckle_snr")]
            lines.append(f"| {row['name']} | {label} | " + " | ".join(cells) + " |")
        lines.append(f"| {row['name']} | time | {row['metrics']['seconds'] * 1000:.0f} ms per frame | | | |")
    return "\n".join(lines)
