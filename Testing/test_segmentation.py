"""Lumen segmentation from a seed on synthetic carotid-like B-mode frames.

The phantom is a transverse carotid view: a dark lumen disk, a wall ring that is bright at the
near and far wall and faint at the sides (specular reflection), grey tissue; each region's
echo times fully developed speckle (the magnitude of a Gaussian-correlated complex field, so
Rayleigh-distributed with ~2 px grains), log-compressed to 8 bits over 50 dB like a scanner.
A Gaussian-smoothed copy (sigma 3 px) stands in for a despeckled frame.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
from scipy import ndimage

from benchlib import lumen_evaluation as ev
from Speckle2SelfLib import segmentation as seg
from Speckle2SelfLib.cli import segment as segment_cli

SIZE = 128
CENTER = (64.0, 60.0)
SEED = (64, 60)
LUMEN_RADIUS = 18
WALL = 5
TOLERANCES = np.arange(1.0, 121.0, 3.0)
#: lumen echo (dB below the bright wall): -26 dB is a hard, low-contrast lumen, -32 dB an easy one
HARD_LUMEN_DB, EASY_LUMEN_DB = -26.0, -32.0


def distance_from(shape, center):
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    return np.hypot(rr - center[0], cc - center[1])


def carotid_frame(rng, center=CENTER, radius=LUMEN_RADIUS, lumen_db=EASY_LUMEN_DB, shape=(SIZE, SIZE)):
    """(speckled uint8 B-mode frame, true lumen mask)."""
    rr, cc = np.ogrid[:shape[0], :shape[1]]
    distance = np.hypot(rr - center[0], cc - center[1])
    angle = np.arctan2(rr - center[0], cc - center[1])
    echo_db = np.full(shape, -18.0)                                  # tissue
    wall = (distance > radius) & (distance <= radius + WALL)
    echo_db[wall] = (-18.0 * np.cos(angle) ** 2)[wall]               # 0 dB near/far wall, faint sides
    echo_db[distance <= radius] = lumen_db
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) + 1j * ndimage.gaussian_filter(
        rng.normal(size=shape), 1.0)
    speckle = np.abs(field) / np.sqrt(np.mean(np.abs(field) ** 2))
    decibels = 20 * np.log10(np.maximum(10 ** (echo_db / 20) * speckle, 1e-6))
    image = np.clip((decibels + 45.0) / 50.0 * 255, 0, 255).astype(np.uint8)
    return image, distance <= radius


def smoothed(image):
    """Stand-in for a despeckled frame, same grey range and dtype."""
    return np.clip(ndimage.gaussian_filter(image.astype(np.float64), 3.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def phantom():
    return carotid_frame(np.random.default_rng(1))


@pytest.fixture(scope="module")
def smooth_tolerance():
    """Flood-fill tolerance tuned on smoothed easy phantoms (as the benchmark tunes on subjects)."""
    frames = [carotid_frame(np.random.default_rng(s)) for s in (21, 22)]
    return ev.tune_tolerance([smoothed(f) for f, _ in frames], [t for _, t in frames], TOLERANCES)


# ----------------------------------------------------------------------------- flood fill

def test_flood_fill_is_the_four_connected_region_within_tolerance(phantom):
    image = smoothed(phantom[0])
    for tolerance in (5.0, 20.0):
        fill = seg.flood_fill(image, SEED, tolerance, check=False)
        inside = np.abs(image.astype(float) - float(image[SEED])) <= tolerance
        labels, _ = ndimage.label(inside)    # default structure: 4-connectivity in 2D
        np.testing.assert_array_equal(fill, labels == labels[SEED])


def test_neighbourhood_radius_stops_a_leak_through_a_thin_gap():
    image = np.full((40, 60), 200, np.uint8)
    image[10:30, 5:25] = 10         # lumen
    image[10:30, 35:55] = 10        # another dark region
    image[20, 25:35] = 10           # a one-pixel channel between them
    assert seg.flood_fill(image, (20, 10), 5, check=False).sum() == 2 * 400 + 10
    assert seg.flood_fill(image, (20, 10), 5, neighborhood_radius_px=2).sum() < 400
    assert seg.flood_fill(image, (20, 10), 5, neighborhood_radius_mm=1.0, spacing=(0.5, 0.5)).sum() < 400


def test_flood_fill_iou_much_better_on_smoothed_than_on_speckled():
    """Benchmark protocol in miniature: tune one tolerance per kind of image, compare mean IoU."""
    frames = [carotid_frame(np.random.default_rng(s), lumen_db=HARD_LUMEN_DB) for s in (1, 2, 3, 4)]
    truths = [t for _, t in frames]
    raw = ev.iou_table([f for f, _ in frames], truths, TOLERANCES).mean(axis=0)
    smooth = ev.iou_table([smoothed(f) for f, _ in frames], truths, TOLERANCES).mean(axis=0)
    print(f"flood fill mean IoU at the tuned tolerance: speckled {raw.max():.3f} "
          f"(tol {TOLERANCES[raw.argmax()]:g}), smoothed {smooth.max():.3f} (tol {TOLERANCES[smooth.argmax()]:g})")
    assert smooth.max() > 0.7
    assert smooth.max() > raw.max() + 0.2


def test_flood_fill_does_not_modify_input(phantom):
    image, _ = phantom
    before = image.copy()
    seg.flood_fill(image, SEED, 10, check=False)
    np.testing.assert_array_equal(image, before)


def test_seed_outside_image_names_seed_and_size(phantom):
    image, _ = phantom
    with pytest.raises(ValueError, match=r"outside the 128x128 image"):
        seg.flood_fill(image, (64, 500), 10)
    with pytest.raises(ValueError, match=r"col=-1"):
        seg.grow_from_seeds(image, (10, -1))
    with pytest.raises(ValueError, match="outside"):
        seg.segment_sequence(image[None], (200, 3))


def test_seed_on_wall_warns(phantom):
    image = smoothed(phantom[0])
    far_wall = (int(CENTER[0]) + LUMEN_RADIUS + WALL // 2 + 1, int(CENTER[1]))
    with pytest.warns(seg.SegmentationWarning, match="wall"):
        seg.flood_fill(image, far_wall, 10)
    with pytest.warns(seg.SegmentationWarning, match="wall"):
        seg.segment_sequence(image[None], far_wall, "flood")
    # the default (radial) method refuses such a seed outright: a message, no mask
    with pytest.raises(seg.SeedNotInLumenError, match="bright tissue"):
        seg.segment_sequence(image[None], far_wall)


def test_lumen_seed_does_not_warn_but_leak_does(phantom, smooth_tolerance, recwarn):
    image = smoothed(phantom[0])
    seg.flood_fill(image, SEED, smooth_tolerance)
    assert not [w for w in recwarn if issubclass(w.category, seg.SegmentationWarning)]
    with pytest.warns(seg.SegmentationWarning, match="leaked"):
        seg.flood_fill(image, SEED, 110)


def test_flood_and_growcut_results_that_are_no_lumen_are_flagged(phantom, smooth_tolerance):
    image, truth = phantom
    # a sound fill of the smoothed lumen passes; the radial method's plausibility tests, applied
    # to any mask, do not fire on it
    good = seg.segment(smoothed(image), SEED, "flood", tolerance=smooth_tolerance)
    assert ev.iou(good.mask, truth) > 0.7 and not good.flagged
    assert seg.contrast_reason(smoothed(image), truth) == ""
    # a zero tolerance on speckle stops a few pixels from the seed, inside the lumen
    stuck = seg.segment(image, SEED, "flood", tolerance=0)
    assert stuck.mask.sum() < 0.1 * truth.sum()
    assert stuck.flagged and ("weak boundary" in stuck.reason or "not a dark lumen" in stuck.reason)
    # in a frame with nothing to segment (all black) flood filling leaks; grow from seeds stops
    # at its automatic background seeds, with a region no darker than its surroundings
    black = np.zeros((60, 60), np.uint8)
    assert "leaked" in seg.segment(black, (30, 30), "flood", tolerance=3).reason
    assert "no darker than its surroundings" in seg.segment(black, (30, 30), "growcut", tolerance=3).reason
    # and the same masks inside a bright disc: darker surroundings than inside
    disc = np.where(distance_from((60, 60), (30, 30)) <= 8, 200, 20).astype(np.uint8)
    assert "no darker" in seg.contrast_reason(disc, distance_from((60, 60), (30, 30)) <= 8)


def test_segment_refuses_what_is_not_a_finite_grey_frame(phantom):
    image, _truth = phantom
    rgb = np.repeat(image[..., None], 3, axis=2)
    with pytest.raises(ValueError, match=r"2D grey image .*RGB"):
        seg.segment(rgb, SEED)
    holed = image.astype(np.float32)
    holed[SEED] = np.nan
    for call in (lambda: seg.segment(holed, SEED, "flood"), lambda: seg.segment_sequence(holed[None], SEED)):
        with pytest.raises(ValueError, match="1 NaN or infinite pixel"):
            call()


# ----------------------------------------------------------------------------- grow from seeds

def test_growcut_contains_seed_and_has_sane_area(phantom, smooth_tolerance):
    image, truth = phantom
    for name, frame in (("speckled", image), ("smoothed", smoothed(image))):
        mask = seg.grow_from_seeds(frame, SEED, tolerance=smooth_tolerance)
        ratio = mask.sum() / truth.sum()
        print(f"growcut {name}: IoU {ev.iou(mask, truth):.3f}, area ratio {ratio:.2f}")
        assert mask[SEED]
        assert 0.5 < ratio < 2.0


def test_growcut_with_given_background_seeds(phantom):
    image, truth = phantom
    background = [(64, 60 + 40), (64, 60 - 40), (64 - 40, 60), (64 + 40, 60)]
    mask = seg.grow_from_seeds(smoothed(image), SEED, background_seeds_rc=background)
    assert mask[SEED] and not mask[64, 100]
    assert 0.5 < mask.sum() / truth.sum() < 2.0
    with pytest.raises(ValueError, match="overlap the lumen seed"):
        seg.grow_from_seeds(smoothed(image), SEED, background_seeds_rc=[(64, 61)])


def test_automatic_background_ring_lies_outside_the_flood_region():
    flood = distance_from((100, 100), (50, 50)) <= 10
    background = seg.automatic_background_seeds(flood, (50, 50))
    assert not (background & flood).any()
    assert background[0].all() and background[:, -1].all()
    ring = background[2:-2, 2:-2]
    assert ring.any() and (distance_from((100, 100), (50, 50))[2:-2, 2:-2][ring] > 12).all()


# ----------------------------------------------------------------------------- sequences

def moving_sequence(radii, step=(2, 3), seed=11):
    """Smoothed frames of a lumen moving ``step`` px per frame, true masks, true centres."""
    rng = np.random.default_rng(seed)
    frames, truths, centers = [], [], []
    for k, radius in enumerate(radii):
        center = (54.0 + step[0] * k, 50.0 + step[1] * k)
        frame, truth = carotid_frame(rng, center=center, radius=radius)
        frames.append(smoothed(frame))
        truths.append(truth)
        centers.append(center)
    return np.stack(frames), np.stack(truths), np.array(centers)


def test_sequence_seed_follows_a_moving_lumen(smooth_tolerance):
    frames, truths, centers = moving_sequence([LUMEN_RADIUS] * 6)
    result = seg.segment_sequence(frames, tuple(centers[0]), "flood", smooth_tolerance, spacing_mm=(0.1, 0.1))
    ious = [ev.iou(m, t) for m, t in zip(result.masks, truths)]
    print("sequence flood IoUs:", np.round(ious, 3).tolist())
    assert min(ious) > 0.7
    assert not result.flagged.any()
    # the seed of frame k is frame k-1's lumen centroid, i.e. it moves with the lumen
    np.testing.assert_allclose(result.seeds_rc[1:], centers[:-1], atol=2.0)
    expected_area = truths.sum(axis=(1, 2)) * 0.01
    np.testing.assert_allclose(result.areas_mm2, expected_area, rtol=0.3)


def test_sequence_from_a_middle_frame_runs_both_ways(smooth_tolerance):
    frames, truths, centers = moving_sequence([LUMEN_RADIUS] * 5)
    result = seg.segment_sequence(frames, tuple(centers[2]), "growcut", smooth_tolerance, start_frame=2)
    ious = [ev.iou(m, t) for m, t in zip(result.masks, truths)]
    print("sequence growcut IoUs:", np.round(ious, 3).tolist())
    assert min(ious) > 0.7
    assert not result.flagged.any()
    assert result.seeds_rc[2].tolist() == [int(c) for c in centers[2]]


@pytest.mark.parametrize("method", ["flood", "radial"])
def test_sequence_flags_an_implausible_area_jump(smooth_tolerance, method):
    radii = [LUMEN_RADIUS, LUMEN_RADIUS, 9, LUMEN_RADIUS, LUMEN_RADIUS]
    frames, truths, centers = moving_sequence(radii, step=(1, 1))
    result = seg.segment_sequence(frames, tuple(centers[0]), method, tolerance=smooth_tolerance)
    assert result.flagged.tolist() == [False, False, True, False, False]
    assert "area changed" in result.flag_reasons[2]
    assert result.masks[2].any()     # kept for inspection, but flagged
    # frame 3 is compared with, and seeded from, frame 1 (the last accepted frame)
    np.testing.assert_allclose(result.seeds_rc[3], seg.seed_from_mask(result.masks[1]))


def test_sequence_rejects_bad_shapes_and_methods(phantom):
    image, _ = phantom
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        seg.segment_sequence(image, SEED)
    with pytest.raises(ValueError, match="unknown method"):
        seg.segment_sequence(image[None], SEED, method="watershed")


# ----------------------------------------------------------------------------- measurements, evaluation

def test_measure_uses_spacing():
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:25] = True
    m = seg.measure(mask, (0.5, 0.25))
    assert m.area_px == 200
    assert m.area_mm2 == pytest.approx(25.0)
    assert m.equivalent_diameter_mm == pytest.approx(2 * math.sqrt(25.0 / math.pi))
    assert m.centroid_rc == pytest.approx((14.5, 14.5))
    assert seg.measure(np.zeros((4, 4), bool)).area_mm2 == 0.0


def test_seed_from_mask_lies_inside_a_crescent():
    distance = distance_from((60, 60), (30, 30))
    crescent = (distance < 20) & (distance > 12)
    crescent[:, 30:] = False
    r, c = seg.seed_from_mask(crescent)
    assert crescent[r, c]


def test_roc_auc_trapezoid():
    assert ev.roc_auc(np.array([0.0, 0.5]), np.array([0.5, 1.0])) == pytest.approx(0.875)
    assert ev.roc_auc(np.array([0.2]), np.array([0.2])) == pytest.approx(0.5)


def test_evaluate_flood_fill(phantom, smooth_tolerance):
    image, truth = smoothed(phantom[0]), phantom[1]
    iou_value, auc = ev.evaluate_flood_fill(image, truth, smooth_tolerance, tolerances=TOLERANCES)
    expected_iou = ev.iou(seg.flood_fill(image, seg.seed_from_mask(truth), smooth_tolerance, check=False), truth)
    assert iou_value == pytest.approx(expected_iou)
    fpr, tpr, _ = ev.flood_fill_roc(image, truth, TOLERANCES)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)    # fills are nested
    assert auc == pytest.approx(ev.roc_auc(fpr, tpr)) and 0.9 < auc <= 1.0


def test_auc_higher_on_smoothed_than_on_speckled():
    frames = [carotid_frame(np.random.default_rng(s), lumen_db=HARD_LUMEN_DB) for s in (1, 2, 3, 4)]
    raw = [ev.evaluate_flood_fill(f, t, 30.0)[1] for f, t in frames]     # default sweep: 0..255
    smooth = [ev.evaluate_flood_fill(smoothed(f), t, 30.0)[1] for f, t in frames]
    print(f"flood-fill ROC AUC: speckled {np.mean(raw):.3f}, smoothed {np.mean(smooth):.3f}")
    assert np.mean(smooth) > np.mean(raw) + 0.05


def test_tune_tolerance_picks_best_mean_iou(phantom):
    image, truth = phantom
    images = [smoothed(image), smoothed(carotid_frame(np.random.default_rng(3))[0])]
    masks = [truth, truth]
    table = ev.iou_table(images, masks, TOLERANCES)
    best = ev.tune_tolerance(images, masks, TOLERANCES)
    assert table.mean(axis=0)[list(TOLERANCES).index(best)] == pytest.approx(table.mean(axis=0).max())


# ----------------------------------------------------------------------------- command line

def run_cli(argv):
    parser = segment_cli.add_segment_arguments(argparse.ArgumentParser())
    return segment_cli.run_segment(parser.parse_args(argv))


def test_cli_png_in_png_out(tmp_path, phantom, smooth_tolerance, capsys):
    from PIL import Image

    image, truth = phantom
    Image.fromarray(smoothed(image)).save(tmp_path / "frame.png")
    out = tmp_path / "mask.png"
    assert run_cli([str(tmp_path / "frame.png"), "--seed", "60,64", "--out", str(out),
                    "--no-despeckle", "--method", "flood", "--tolerance", str(smooth_tolerance)]) == 0
    mask = np.array(Image.open(out))
    assert set(np.unique(mask)) == {0, 255}
    expected = seg.flood_fill(smoothed(image), SEED, smooth_tolerance, check=False)
    np.testing.assert_array_equal(mask == 255, expected)
    assert "equivalent diameter" in capsys.readouterr().out


def test_cli_volume_keeps_geometry_and_accepts_ras_seed(tmp_path, smooth_tolerance):
    import SimpleITK as sitk

    frames, truths, centers = moving_sequence([LUMEN_RADIUS] * 3)
    volume = sitk.GetImageFromArray(frames)
    volume.SetSpacing((0.2, 0.1, 1.0))
    volume.SetOrigin((15.0, 3.0, 2.0))       # R and A negative, as they often are in Slicer
    volume.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(volume, str(tmp_path / "loop.nrrd"))
    row, col = centers[1]
    lps = volume.TransformContinuousIndexToPhysicalPoint((float(col), float(row), 1.0))
    ras = f"{-lps[0]},{-lps[1]},{lps[2]}"
    assert ras.startswith("-")
    out = tmp_path / "lumen.nrrd"
    from Speckle2SelfLib.cli import main
    # the value after --seed-ras may start with a minus sign (argparse alone takes it for an option)
    assert main(["segment", str(tmp_path / "loop.nrrd"), "--seed-ras", ras, "--frame", "1", "--out", str(out),
                 "--no-despeckle", "--method", "flood", "--tolerance", str(smooth_tolerance)]) == 0
    mask = sitk.ReadImage(str(out))
    assert mask.GetSpacing() == volume.GetSpacing() and mask.GetOrigin() == volume.GetOrigin()
    assert mask.GetDirection() == volume.GetDirection()
    labels = sitk.GetArrayFromImage(mask)
    assert labels.shape == frames.shape and set(np.unique(labels)) == {0, 1}
    assert not labels[0].any() and not labels[2].any()       # --frame: only that frame
    assert ev.iou(labels[1] == 1, truths[1]) > 0.7
    # a --frame other than the seed's is a contradiction, refused before any work
    assert main(["segment", str(tmp_path / "loop.nrrd"), "--seed-ras", ras, "--frame", "0", "--out",
                 str(tmp_path / "other.nrrd"), "--no-despeckle"]) == 2
    assert not (tmp_path / "other.nrrd").exists()


def test_cli_bad_seed_is_a_clear_error(tmp_path, phantom, capsys):
    from PIL import Image

    Image.fromarray(phantom[0]).save(tmp_path / "frame.png")
    assert run_cli([str(tmp_path / "frame.png"), "--seed", "500,3", "--out", str(tmp_path / "m.png"),
                    "--no-despeckle"]) == 2
    assert "outside the 128x128 image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli([str(tmp_path / "frame.png"), "--seed", "5", "--out", str(tmp_path / "m.png")])


def test_cli_despeckles_with_a_model_first(tmp_path, phantom, untrained_model):
    from PIL import Image

    Image.fromarray(phantom[0]).save(tmp_path / "frame.png")
    out = tmp_path / "mask.png"
    # an untrained model's output need not show a clean lumen: the plumbing is tested here, not the flag
    assert run_cli([str(tmp_path / "frame.png"), "--seed", "60,64", "--out", str(out),
                    "--model", str(untrained_model), "--method", "growcut", "--keep-flagged"]) == 0
    mask = np.array(Image.open(out))
    assert mask.shape == phantom[0].shape and mask[SEED] == 255


def test_speckle2self_segment_subcommand(tmp_path, phantom):
    from PIL import Image

    from Speckle2SelfLib.cli import main

    Image.fromarray(smoothed(phantom[0])).save(tmp_path / "frame.png")
    out = tmp_path / "mask.png"
    assert main(["segment", str(tmp_path / "frame.png"), "--seed", "60,64", "--out", str(out), "--no-despeckle"]) == 0
    assert np.array(Image.open(out))[SEED] == 255


def test_arrival_map_reproduces_vtk_fills_at_every_tolerance():
    """The fast sweep used by the benchmark equals Slicer's flood fill (VTK) exactly."""
    from benchlib.lumen_evaluation import fill_arrival
    from Speckle2SelfLib.segmentation.editor_effects import _FloodFiller

    rng = np.random.default_rng(7)
    image = (rng.rayleigh(40, (60, 70)) + np.linspace(0, 80, 70)).clip(0, 255).astype(np.uint8)
    seed = (30, 20)
    arrival = fill_arrival(image, seed)
    vtk_filler = _FloodFiller(image, seed, (0.0, 0.0))
    for tolerance in (0, 1, 5, 17, 40, 90, 255):
        np.testing.assert_array_equal(arrival <= tolerance, vtk_filler.fill(tolerance))
