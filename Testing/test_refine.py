"""Network-guided smoothing (engine.refine): edges of the input kept, flat speckle averaged,
the option reaching the output through the engine, the CLI and the Slicer logic."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from Speckle2SelfLib.cli.main import main
from Speckle2SelfLib.engine import refine
from Speckle2SelfLib.engine.inference import Despeckler
from conftest import simulated_frames

SIZE = 96
EDGE = 48          # the step sits between rows 47 and 48


def _speckled_step(seed: int = 0):
    """A dark half over a bright half with multiplicative, 2-px-correlated speckle, and a soft
    "network output" for it: the clean step blurred by 3 px (a guide without sharp edges)."""
    rng = np.random.default_rng(seed)
    clean = np.where(np.arange(SIZE)[:, None] < EDGE, 0.25, 0.75) * np.ones((1, SIZE))
    grain = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 1.0)
    speckled = np.clip(clean * (1 + 1.2 * grain / grain.std() * 0.3), 0, 1)
    guide = ndimage.gaussian_filter(clean, 3.0)
    return clean, speckled, guide


def _as_batch(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))[None, None]


def _rise_px(image: np.ndarray) -> float:
    """10-90% rise distance (px) of the column-averaged profile across the step."""
    profile = image[:, 16:-16].mean(axis=1)
    lo, hi = profile[EDGE - 16:EDGE - 8].mean(), profile[EDGE + 8:EDGE + 16].mean()
    rows = np.arange(EDGE - 12, EDGE + 12)
    norm = (profile[rows] - lo) / (hi - lo)
    return float(np.interp(0.9, norm, rows) - np.interp(0.1, norm, rows))


def test_guided_smoothing_averages_flat_speckle_and_keeps_the_input_edge():
    clean, speckled, guide = _speckled_step()
    settings = refine.GuidedSmoothing(sigma_px=5.0, range_sigma=0.04, stride=1)
    out = refine.guided_smoothing(_as_batch(speckled), _as_batch(guide), settings)[0, 0].numpy()
    blurred = ndimage.gaussian_filter(speckled, settings.sigma_px)      # same window, no guide
    flat = np.s_[8:EDGE - 12, 8:-8]
    assert out[flat].std() < 0.35 * speckled[flat].std()
    # The edge stays as sharp as the input's (within a pixel) where the unguided mean smears it.
    assert _rise_px(out) <= _rise_px(speckled) + 1.0 < _rise_px(blurred) - 2.0
    # A weighted mean of input pixels: no grey level outside the input's range.
    assert speckled.min() - 1e-6 <= out.min() and out.max() <= speckled.max() + 1e-6


def test_a_flat_guide_gives_the_plain_gaussian_mean_and_a_flat_input_stays_flat():
    _clean, speckled, _guide = _speckled_step(seed=1)
    settings = refine.GuidedSmoothing(sigma_px=2.0, range_sigma=0.04, stride=1)
    out = refine.guided_smoothing(_as_batch(speckled), torch.zeros(1, 1, SIZE, SIZE), settings)[0, 0].numpy()
    radius = settings.radius
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * settings.sigma_px ** 2))
    expected = ndimage.correlate(speckled, kernel / kernel.sum(), mode="nearest")
    np.testing.assert_allclose(out, expected, atol=1e-5)
    flat = refine.guided_smoothing(torch.full((1, 1, 20, 20), 0.3), _as_batch(_speckled_step()[2][:20, :20]), settings)
    torch.testing.assert_close(flat, torch.full((1, 1, 20, 20), 0.3))


def _two_steps(dark=(0.02, 0.07), bright=(0.6, 0.7), seed: int = 0):
    """Left half: a faint dark step (a lumen and its wall); right half: a bright step of the same
    size in grey levels (tissue texture); mild speckle; the guide is the clean image."""
    rng = np.random.default_rng(seed)
    rows = np.arange(SIZE)[:, None] < EDGE
    clean = np.where(np.arange(SIZE)[None, :] < SIZE // 2, np.where(rows, *dark), np.where(rows, *bright))
    speckled = np.clip(clean + 0.01 * ndimage.gaussian_filter(rng.standard_normal(clean.shape), 1.0), 0, 1)
    return clean, speckled


def _step_contrast(out: np.ndarray, cols) -> float:
    """Mean grey level just below the step minus just above it, in the given columns."""
    return float(out[EDGE:EDGE + 3, cols].mean() - out[EDGE - 3:EDGE, cols].mean())


def test_a_compressed_range_keeps_a_faint_dark_step_and_merges_a_bright_one():
    """Steps of 0.05 (dark) and 0.1 (bright) grey levels: on plain levels the bright one is the
    larger and keeps more contrast; on the square-root scale the dark one becomes the larger."""
    clean, speckled = _two_steps()
    plain = refine.GuidedSmoothing(sigma_px=5.0, range_sigma=0.06, stride=1)
    outputs = {power: refine.guided_smoothing(_as_batch(speckled), _as_batch(clean),
                                              plain._replace(range_power=power))[0, 0].numpy()
               for power in (1.0, 0.5)}
    dark, bright = slice(8, SIZE // 2 - 8), slice(SIZE // 2 + 8, SIZE - 8)
    # On the square-root scale the dark step (0.02 -> 0.07, 0.05 on plain levels) becomes 0.12 and
    # the bright one (0.6 -> 0.7, 0.1 on plain levels) 0.06, so the dark boundary keeps more of
    # its contrast and the bright one is averaged more.
    assert _step_contrast(outputs[0.5], dark) > _step_contrast(outputs[1.0], dark) + 0.005
    assert _step_contrast(outputs[0.5], bright) < _step_contrast(outputs[1.0], bright) - 0.005
    assert _step_contrast(outputs[0.5], dark) > 0.8 * (0.07 - 0.02)
    # still a weighted mean of input pixels
    assert speckled.min() - 1e-6 <= outputs[0.5].min() and outputs[0.5].max() <= speckled.max() + 1e-6


def test_the_default_models_output_is_its_network_steering_the_smoothing_it_recommends():
    """The bundled default's metadata (sigma, range and range power) reaches denoise(): its output
    equals the product's filter (the bilateral grid) run by hand with those settings, and differs
    from plain levels."""
    engine = Despeckler.from_file(None, "cpu", backend="fp32")
    settings = refine.settings_for(1.0, **refine.model_settings(engine.metadata))
    assert settings.range_power < 1.0
    _clean, speckled, _guide = _speckled_step(seed=7)
    frame = speckled.astype(np.float32)
    lo, hi = float(frame.min()), float(frame.max())
    network = engine.denoise(frame, refine="none", grey_levels="network", working_scale=1.0)
    x, y = _as_batch((frame - lo) / (hi - lo)), _as_batch((network - lo) / (hi - lo)).clamp(0, 1)
    by_hand = refine.guided_filter(x, y, settings)[0, 0].numpy() * (hi - lo) + lo
    plain = refine.guided_filter(x, y, settings._replace(range_power=1.0))[0, 0].numpy() * (hi - lo) + lo
    out = engine.denoise(frame, working_scale=1.0)
    np.testing.assert_allclose(out, by_hand, atol=1e-4)
    assert np.abs(out - plain).max() > 1e-3


def test_sparse_neighbours_cost_a_quarter_and_the_window_follows_the_working_scale():
    full = refine.settings_for(1.0)
    assert (full.sigma_px, full.range_sigma, full.stride) == (refine.GUIDED_SIGMA_PX, refine.GUIDED_RANGE, 2)
    half = refine.settings_for(0.5)        # frames shrunk by 2 for the network: grains twice as wide
    assert half.sigma_px == 2 * full.sigma_px and half.stride == 4 and half.radius == 2 * full.radius
    assert refine._offsets(12, 2) == list(range(-12, 13, 2))
    _clean, speckled, guide = _speckled_step(seed=2)
    dense = refine.guided_smoothing(_as_batch(speckled), _as_batch(guide), full._replace(stride=1))
    sparse = refine.guided_smoothing(_as_batch(speckled), _as_batch(guide), full)
    assert float((dense - sparse).abs().mean()) < 0.01


def test_engine_guided_output_has_the_input_levels_and_less_speckle_than_the_network(untrained_model):
    noisy, _ = simulated_frames(n=2, size=128, seed=3)
    frames = np.rint(np.stack(noisy) * 255).astype(np.uint8)
    engine = Despeckler.from_file(None, device="cpu", backend="fp32")
    own = engine.denoise(frames, refine="none")
    assert engine.last_refine == "none"
    guided = engine.denoise(frames, refine="guided")
    assert engine.last_refine == "guided" and guided.shape == frames.shape and guided.dtype == frames.dtype
    assert not np.array_equal(guided, own)
    # the bundled default model recommends it (metadata "refine"), so "auto", the default, applies it
    assert engine.metadata["refine"] == "guided" and engine.resolve_refine("auto") == "guided"
    np.testing.assert_array_equal(engine.denoise(frames), guided)
    for g, x in zip(guided.astype(float), frames.astype(float)):
        assert abs(g.mean() - x.mean()) < 2.0
        assert np.abs(np.diff(g, axis=1)).mean() < 0.5 * np.abs(np.diff(x, axis=1)).mean()
    # an iterable of frames takes the same path
    np.testing.assert_array_equal(np.stack(engine.denoise(list(frames), refine="guided")), guided)


def test_models_without_a_recommendation_default_to_their_own_output(untrained_model):
    engine = Despeckler.from_file(untrained_model, device="cpu")
    assert "refine" not in engine.metadata and engine.resolve_refine() == "none"
    assert engine.resolve_refine(None) == "none" and engine.resolve_refine("guided") == "guided"


def test_cli_refine_option_reaches_the_output(untrained_model, tmp_path, capsys):
    from PIL import Image

    frame = np.rint(simulated_frames(n=1, size=96, seed=4)[0][0] * 255).astype(np.uint8)
    Image.fromarray(frame).save(tmp_path / "a.png")
    outputs = {}
    for mode in ("none", "guided"):
        out = tmp_path / f"{mode}.png"
        assert main(["denoise", str(tmp_path / "a.png"), str(out), "--device", "cpu", "--refine", mode]) == 0
        outputs[mode] = np.asarray(Image.open(out))
    assert not np.array_equal(outputs["none"], outputs["guided"])
    assert main(["denoise", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--refine", "sharp"]) == 2
    assert "invalid choice: 'sharp'" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_a_model_carries_its_own_smoothing_settings_and_fine_tuning_keeps_them(trained_model, tmp_path):
    """``export --refine guided --refine-sigma-px/--refine-range`` records the recommendation and
    its settings; ``refine="auto"`` then applies them; ``train --init`` passes them on."""
    from Speckle2SelfLib.engine.models import load_model
    from Speckle2SelfLib.engine.training import FramePool, config_from_model, train

    checkpoint = trained_model.with_suffix(".ckpt")
    wide, plain = tmp_path / "wide.pt", tmp_path / "plain.pt"
    assert main(["export", str(checkpoint), "--out", str(wide), "--refine", "guided",
                 "--refine-sigma-px", "14", "--refine-range", "0.08", "--refine-range-power", "0.5"]) == 0
    assert main(["export", str(checkpoint), "--out", str(plain), "--refine", "guided"]) == 0
    meta = load_model(wide).metadata
    assert (meta["refine"], meta["refine_sigma_px"], meta["refine_range"], meta["refine_range_power"]) == \
        ("guided", 14.0, 0.08, 0.5)
    assert "refine_sigma_px" not in load_model(plain).metadata
    assert refine.settings_for(1.0, **refine.model_settings(meta)) == refine.GuidedSmoothing(14.0, 0.08, 2, 0.5)
    assert refine.settings_for(1.0, **refine.model_settings(load_model(plain).metadata)) == \
        refine.GuidedSmoothing(refine.GUIDED_SIGMA_PX, refine.GUIDED_RANGE, 2, 1.0)

    _clean, speckled, _guide = _speckled_step(seed=5)
    frame = np.rint(speckled * 255).astype(np.uint8)
    wider = Despeckler.from_file(wide, "cpu", backend="fp32")
    smoother = wider.denoise(frame).astype(float)
    assert wider.last_refine == "guided"
    default = Despeckler.from_file(plain, "cpu", backend="fp32").denoise(frame).astype(float)
    flat = (slice(4, EDGE - 16), slice(16, -16))     # inside the dark half, away from the step
    assert smoother[flat].std() < 0.8 * default[flat].std()

    cfg = config_from_model(wide, crop=32, batch=2, steps=1, device="cpu", preview_every=0)
    tuned = tmp_path / "tuned.pt"
    pool = FramePool(simulated_frames(n=2, size=64, seed=6)[0], {"frames": 2})
    train(cfg, pool, tuned, progress=False, init_model=str(wide))
    assert refine.recommendation(load_model(tuned).metadata) == refine.recommendation(meta)
    # the checkpoint keeps it: a resumed run and an export of the checkpoint recommend it too,
    # even with the starting model gone; export --refine replaces it
    wide.unlink()
    cfg.steps = 2
    train(cfg, pool, tuned, resume=str(tuned.with_suffix(".ckpt")), progress=False)
    assert refine.recommendation(load_model(tuned).metadata) == refine.recommendation(meta)
    exported = tmp_path / "exported.pt"
    assert main(["export", str(tuned.with_suffix(".ckpt")), "--out", str(exported)]) == 0
    assert refine.recommendation(load_model(exported).metadata) == refine.recommendation(meta)
    assert main(["export", str(tuned.with_suffix(".ckpt")), "--out", str(tmp_path / "own.pt"), "--refine", "none"]) == 0
    assert refine.recommendation(load_model(tmp_path / "own.pt").metadata) == {"refine": "none"}
    # --refine guided on a run that inherited it keeps the settings it does not set itself
    assert main(["export", str(tuned.with_suffix(".ckpt")), "--out", str(tmp_path / "same.pt"), "--refine", "guided"]) == 0
    assert refine.recommendation(load_model(tmp_path / "same.pt").metadata) == refine.recommendation(meta)
    assert main(["export", str(tuned.with_suffix(".ckpt")), "--out", str(tmp_path / "range.pt"), "--refine", "guided",
                 "--refine-range", "0.1"]) == 0
    assert refine.recommendation(load_model(tmp_path / "range.pt").metadata) == {**refine.recommendation(meta),
                                                                                "refine_range": 0.1}


def test_export_of_a_model_file_rewrites_only_its_recommendation_and_name(trained_model, tmp_path, capsys):
    """``export MODEL.pt --refine ...`` (how v4 was made from v3): same weights, new recommendation."""
    from Speckle2SelfLib.engine.models import load_model

    source = load_model(trained_model).metadata
    guided, kept, named, plain = (tmp_path / f"{n}.pt" for n in ("guided", "kept", "named", "plain"))
    assert main(["export", str(trained_model), "--out", str(guided), "--name", "tuned-v2", "--refine", "guided",
                 "--refine-sigma-px", "12", "--refine-range", "0.06", "--refine-range-power", "0.5"]) == 0
    meta = load_model(guided).metadata
    assert meta["weights_sha256"] == source["weights_sha256"] and meta["name"] == "tuned-v2"
    assert refine.recommendation(meta) == {"refine": "guided", "refine_sigma_px": 12.0, "refine_range": 0.06,
                                           "refine_range_power": 0.5}
    assert meta["training"] == source["training"]
    # guided over guided keeps what is not set again; none drops the settings; --name alone renames
    assert main(["export", str(guided), "--out", str(kept), "--refine", "guided", "--refine-range-power", "1"]) == 0
    assert refine.recommendation(load_model(kept).metadata) == {"refine": "guided", "refine_sigma_px": 12.0,
                                                                "refine_range": 0.06, "refine_range_power": 1.0}
    assert main(["export", str(guided), "--out", str(plain), "--refine", "none"]) == 0
    assert refine.recommendation(load_model(plain).metadata) == {"refine": "none"}
    assert main(["export", str(guided), "--out", str(named), "--name", "other"]) == 0
    assert load_model(named).metadata["name"] == "other"
    assert refine.recommendation(load_model(named).metadata) == refine.recommendation(meta)
    frame = np.rint(_speckled_step(seed=3)[1] * 255).astype(np.uint8)
    assert not np.array_equal(Despeckler.from_file(guided, "cpu", backend="fp32").denoise(frame),
                              Despeckler.from_file(plain, "cpu", backend="fp32").denoise(frame))
    capsys.readouterr()
    assert main(["export", str(guided), "--out", str(tmp_path / "same.pt")]) == 2
    assert "already a model: give --refine ... or --name" in capsys.readouterr().err
    assert not (tmp_path / "same.pt").exists()


@pytest.mark.parametrize("options, needle", [
    (["--refine-sigma-px", "14"], "add --refine guided"),
    (["--refine", "none", "--refine-range", "0.1"], "add --refine guided"),
    (["--refine", "guided", "--refine-sigma-px", "100"], "--refine-sigma-px must lie in [0.5, 32.0]"),
    (["--refine", "guided", "--refine-range", "0"], "must be positive"),
    (["--refine-range-power", "0.5"], "add --refine guided"),
    (["--refine", "guided", "--refine-range-power", "2"], "--refine-range-power must lie in [0.2, 1.0]"),
], ids=["sigma without guided", "range with none", "sigma too wide", "range zero", "power without guided",
        "power above 1"])
def test_export_refuses_refinement_settings_that_cannot_apply(options, needle, trained_model, tmp_path, capsys):
    out = tmp_path / "m.pt"
    capsys.readouterr()
    assert main(["export", str(trained_model.with_suffix(".ckpt")), "--out", str(out), *options]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("shape, sigma, stride", [((2, 1, 41, 57), 7.0, 2), ((1, 1, 5, 7), 3.5, 1), ((1, 1, 33, 30), 10.0, 2)],
                         ids=["batch", "frame smaller than the window", "wide window"])
def test_pairwise_weights_computed_once_equal_the_plain_loop_over_every_offset(shape, sigma, stride):
    """guided_smoothing gives each pair's weight to both pixels; the plain definition, one
    neighbour offset at a time, must give the same result (edges replicated)."""
    rng = np.random.default_rng(7)
    image = torch.from_numpy(rng.random(shape).astype(np.float32))
    guide = torch.from_numpy(rng.random(shape).astype(np.float32))
    settings = refine.GuidedSmoothing(sigma, 0.05, stride)
    r, (h, w) = settings.radius, shape[-2:]
    fitted = refine.fit_to(guide, image)
    padded_image = torch.nn.functional.pad(image, (r,) * 4, mode="replicate")
    padded_guide = torch.nn.functional.pad(fitted, (r,) * 4, mode="replicate")
    total, weights = torch.zeros_like(image), torch.zeros_like(image)
    for dy in refine._offsets(r, stride):
        for dx in refine._offsets(r, stride):
            near = (..., slice(r + dy, r + dy + h), slice(r + dx, r + dx + w))
            weight = torch.exp(-(fitted - padded_guide[near]) ** 2 / (2 * 0.05 ** 2) - (dy * dy + dx * dx) / (2 * sigma ** 2))
            total += weight * padded_image[near]
            weights += weight
    torch.testing.assert_close(refine.guided_smoothing(image, guide, settings), total / weights, atol=3e-6, rtol=0)
