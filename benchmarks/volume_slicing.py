"""3D volumes: which plane the 2D network despeckles (issue #37), measured.

1. Orientation invariance: stacked B-mode frames (simulated with a truth, and real PLUS frames)
   as a volume with the frames along K, J and I (axes permuted); ``auto`` must pick the frame axis
   and give the same voxels in all three.
2. Quality on simulated 3D volumes (benchlib.volume_phantom: frames through a 3D phantom,
   speckle decorrelated between frames): SSIM against the truth after a gain/offset fit, per
   slice axis, auto and the three-plane median / mean, and seconds; the same for the volume
   turned 20 degrees in the frame-lateral plane (an oblique acquisition): nearest axis, auto,
   three planes (mean, median), and resampling (turn back, despeckle along K, turn again).
3. The shared reconstructed volume (SpinePhantomFreehandReconstructed.mha): what auto picks,
   and a figure of the three central planes, input, K slices (before #37) and auto.

    python benchmarks/volume_slicing.py                      # all, bundled default model (~4 min, 1 thread)
    python benchmarks/volume_slicing.py --figure docs/figures/volume_slicing_recon.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "Speckle2Self"))
sys.path.insert(0, str(HERE))

from benchlib.volume_phantom import simulate_volume, to_uint8  # noqa: E402
from Speckle2SelfLib import metrics  # noqa: E402
from Speckle2SelfLib.engine import volume_axes as va  # noqa: E402

SHARED = HERE.parents[0].parent / "shared" / "data" / "sequences"
PERMUTATIONS = {"K": (0, 1, 2), "J": (1, 0, 2), "I": (1, 2, 0)}   # where the frames go (frames, depth, lateral)


def fitted_ssim(out: np.ndarray, truth: np.ndarray, valid=None) -> float:
    """Mean SSIM over the acquisition frames (axis 0) after one least-squares gain/offset."""
    x = out.astype(np.float64) / 255.0
    sel = np.ones(x.shape, bool) if valid is None else valid
    design = np.stack([x[sel], np.ones(int(sel.sum()))], 1)
    (gain, offset), *_ = np.linalg.lstsq(design, truth[sel].astype(np.float64), rcond=None)
    fit = np.clip(gain * x + offset, 0, 1)
    if valid is not None:
        fit = np.where(valid, fit, truth)
    return float(np.mean([metrics.ssim(t, f, data_range=1.0) for t, f in zip(truth, fit)]))


def invariance(engine, name, stack, rows):
    """Despeckle ``stack`` (frames, depth, lateral) with auto with its frames along K, J, I."""
    outs = {}
    for where, perm in PERMUTATIONS.items():
        volume = np.ascontiguousarray(np.transpose(stack, perm))
        tic = time.perf_counter()
        out, choice = va.despeckle_volume(engine, volume, "auto")
        seconds = time.perf_counter() - tic
        outs[where] = np.transpose(out, np.argsort(perm))
        picked = choice.axis.upper()
        rows.append((name, where, picked, "yes" if picked == where else "**no**", choice.rows.upper() if choice.rows else "-",
                     seconds, int(np.abs(outs[where].astype(int) - outs["K"].astype(int)).max())))
    return outs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the bundled default)")
    parser.add_argument("--figure", default=str(HERE.parent / "docs" / "figures" / "volume_slicing_recon.png"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only-recon", action="store_true", help="only part 3 (the reconstructed volume, figure)")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    from Speckle2SelfLib.engine.inference import Despeckler
    engine = Despeckler.from_file(args.model, "cpu")
    print(f"Model: {engine.metadata.get('name')} (refine {engine.resolve_refine('auto')}); "
          f"{args.threads} torch thread(s)\n")

    if args.only_recon:
        return _recon(engine, args)
    # ------------------------------------------------------------------ 1. invariance
    rows = []
    noisy, _truth = simulate_volume(48, 128, 128, seed=args.seeds[0])
    invariance(engine, "simulated 48x128x128", to_uint8(noisy), rows)
    for fname in ("SpinePhantomFreehand.igs.mha", "BoneUltrasound_L14.igs.mha"):
        path = SHARED / fname
        if not path.is_file():
            print(f"({path} absent: real PLUS frames skipped)")
            continue
        import SimpleITK as sitk
        frames = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))      # (21, 616, 820)
        crop = frames[:, 150:406, 282:538]                               # central 256 x 256 of every frame
        invariance(engine, f"{fname} (21x256x256)", crop, rows)
    print("### Orientation invariance (auto)\n")
    print("| stack | frames along | auto picked | right | rows (depth) | s | max grey difference to K |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.1f} | {r[6]} |")

    # ------------------------------------------------------------------ 2. quality
    from scipy import ndimage as ndi
    results = {}
    for seed in args.seeds:
        noisy, truth = simulate_volume(48, 128, 128, seed=seed)
        volume = to_uint8(noisy)
        cases = {"along the axes": (volume, truth, None)}
        angle = 20.0
        turned = np.clip(ndi.rotate(noisy, angle, axes=(0, 2), reshape=False, order=1, mode="constant"), 0, 1)
        turned_truth = ndi.rotate(truth, angle, axes=(0, 2), reshape=False, order=1, mode="constant")
        inside = ndi.rotate(np.ones_like(truth), angle, axes=(0, 2), reshape=False, order=0, cval=0) > 0.5
        inside = ndi.binary_erosion(inside, iterations=3)
        cases["turned 20 deg (oblique)"] = (to_uint8(turned), turned_truth, inside)
        for case, (vol, tru, valid) in cases.items():
            # score in the acquisition frames: undo the turn for scoring the oblique case
            def score(out):
                if valid is None:
                    return fitted_ssim(out, tru)
                back = ndi.rotate(out.astype(np.float32), -angle, axes=(0, 2), reshape=False, order=1, mode="nearest")
                back_valid = ndi.rotate(valid.astype(np.float32), -angle, axes=(0, 2), reshape=False, order=0) > 0.5
                return fitted_ssim(back, truth, back_valid)
            entries = {"input (noisy)": (score(vol), 0.0, "")}
            for mode in ("k", "j", "i", "auto", "three"):   # three: the mean of the passes
                tic = time.perf_counter()
                out, choice = va.despeckle_volume(engine, vol, mode)
                entries[mode] = (score(out), time.perf_counter() - tic, choice.axis if mode == "auto" else "")
            tic = time.perf_counter()
            out = va.despeckle_volume(engine, vol, "three", combine="median")[0]
            entries["three (median)"] = (score(out), time.perf_counter() - tic, "")
            if valid is not None:      # resample: turn back, despeckle the acquisition frames, turn again
                tic = time.perf_counter()
                back = to_uint8(np.clip(ndi.rotate(turned, -angle, axes=(0, 2), reshape=False, order=1,
                                                   mode="nearest"), 0, 1))
                out = va.despeckle_volume(engine, back, "k")[0]
                out = ndi.rotate(out.astype(np.float32), angle, axes=(0, 2), reshape=False, order=1, mode="nearest")
                entries["resample to the plane"] = (score(np.clip(np.rint(out), 0, 255).astype(np.uint8)),
                                                    time.perf_counter() - tic, "")
            for key, value in entries.items():
                results.setdefault((case, key), []).append(value)
    print(f"\n### Simulated 3D volumes (48 frames x 128 x 128, seeds {args.seeds}): SSIM after gain/offset fit\n")
    print("| volume | slicing | SSIM | s | auto picked |")
    print("|---|---|---|---|---|")
    for (case, key), values in results.items():
        ssim = np.mean([v[0] for v in values])
        secs = np.mean([v[1] for v in values])
        picked = ",".join(sorted({v[2] for v in values if v[2]}))
        print(f"| {case} | {key} | {ssim:.3f} | {secs:.1f} | {picked} |")

    return _recon(engine, args)


def _recon(engine, args) -> int:
    """Part 3: the shared reconstructed volume, its auto choice and the figure."""
    path = SHARED / "SpinePhantomFreehandReconstructed.mha"
    if not path.is_file():
        print(f"\n({path} absent: the reconstructed volume is skipped)")
        return 0
    import SimpleITK as sitk
    recon = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    tic = time.perf_counter()
    choice = va.detect_slice_axis(recon)
    detect_s = time.perf_counter() - tic
    outs = {}
    for mode in ("k", "auto", "three"):
        tic = time.perf_counter()
        outs[mode] = va.despeckle_volume(engine, recon, mode, choice=choice if mode == "auto" else None)[0]
        outs[mode + "_s"] = time.perf_counter() - tic
    print(f"\n### Reconstructed volume {path.name} (147 x 106 x 104)\n")
    print(f"auto: {choice.describe()} (detection {detect_s:.2f} s; tilt per axis plane {va.plane_tilts(recon)})\n")
    print("| slicing | s |")
    print("|---|---|")
    for mode in ("k", "auto", "three"):
        print(f"| {mode} | {outs[mode + '_s']:.1f} |")
    _figure(recon, outs, choice, Path(args.figure))
    print(f"\nfigure: {args.figure}")
    return 0


def _planes(volume):
    k, j, i = (n // 2 for n in volume.shape)
    return [volume[k], volume[:, j, :], volume[:, :, i]]   # K slice (rows J, cols I), J slice (K, I), I slice (K, J)


def _figure(recon, outs, choice, path: Path) -> None:
    from PIL import Image, ImageDraw

    rows = [("input", recon), ("K slices (before #37)", outs["k"]), (f"auto: {choice.axis.upper()} slices", outs["auto"]),
            ("three planes (mean)", outs["three"])]
    tiles = []
    for label, vol in rows:
        planes = _planes(vol)
        height = max(p.shape[0] for p in planes)
        row = np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, 6))) for p in planes], 1)
        img = Image.fromarray(row.astype(np.uint8)).resize((row.shape[1] * 2, height * 2), Image.BILINEAR)
        canvas = Image.new("L", (img.width + 130, img.height), 0)
        canvas.paste(img, (130, 0))
        ImageDraw.Draw(canvas).text((4, img.height // 2 - 6), label, fill=255)
        tiles.append(canvas)
    head = Image.new("L", (tiles[0].width, 16), 0)
    draw = ImageDraw.Draw(head)
    widths = [p.shape[1] for p in _planes(recon)]
    x = 130
    for name, w in zip(("K slice (I-J: constant depth)", "J slice (I-K: B-mode)", "I slice (J-K)"), widths):
        draw.text((x + 2, 2), name, fill=255)
        x += (w + 6) * 2
    out = Image.new("L", (head.width, head.height + sum(t.height for t in tiles)))
    out.paste(head, (0, 0))
    y = head.height
    for t in tiles:
        out.paste(t, (0, y))
        y += t.height
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
