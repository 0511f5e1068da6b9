"""Self-supervised training really despeckles: measured on simulated speckle with a known clean image."""

import numpy as np
import pytest

from conftest import simulated_frames
from Speckle2SelfLib.engine.inference import Despeckler
from Speckle2SelfLib.engine.models import load_model
from Speckle2SelfLib.simulation import simulate_phantom, speckle_contrast
from Speckle2SelfLib.engine.training import FramePool, TrainConfig, export_checkpoint, train


def _edge_row(img: np.ndarray, col: slice, rows: slice = slice(None)) -> int:
    """Row of the strongest vertical step of the column-averaged profile within ``rows``."""
    profile = img[:, col].astype(np.float64).mean(axis=1)
    step = np.abs(np.diff(profile))
    start = rows.start or 0
    return start + int(np.argmax(step[rows]))


def test_trained_model_lowers_speckle_contrast_and_keeps_the_edge(trained_model):
    # Held-out seed: the model never saw this image.
    phantom, sim = simulate_phantom("layers", seed=123, size=(128, 128))
    engine = Despeckler.from_file(trained_model, device="cpu")
    out = engine.denoise(sim.bmode)
    region = phantom.homogeneous_mask
    before, after = speckle_contrast(sim.bmode, region), speckle_contrast(out, region)
    assert after < 0.6 * before, f"speckle contrast {before:.3f} -> {after:.3f}"
    # ...and closer to the clean anatomy than the speckled input is (correlation: the B-mode
    # grey scale is not the clean image's, so a pixel-wise error would compare unlike things).
    def corr(img):
        return np.corrcoef(img.ravel(), phantom.clean.ravel())[0, 1]
    assert corr(out) > corr(sim.bmode)
    # The strongest layer boundary of the clean image is still the output's strongest step
    # nearby, within two pixels of where it belongs (not smeared or shifted).
    cols = slice(16, 112)
    true_row = _edge_row(phantom.clean, cols)
    near = slice(max(0, true_row - 8), true_row + 9)
    assert abs(_edge_row(out, cols, near) - true_row) <= 2


def test_untrained_network_does_not_pass_the_same_check(untrained_model):
    """The check above can fail: an untrained net does not reproduce the image."""
    phantom, sim = simulate_phantom("layers", seed=123, size=(128, 128))
    out = Despeckler.from_file(untrained_model, device="cpu").denoise(sim.bmode)
    corr = [np.corrcoef(img.ravel(), phantom.clean.ravel())[0, 1] for img in (out, sim.bmode)]
    assert corr[0] < corr[1]


def test_metadata_describes_the_training(trained_model):
    meta = load_model(trained_model).metadata
    assert meta["width"] == 8 and meta["upsample"] == "resize" and meta["depth"] == 2
    assert meta["training"]["steps_done"] == 300
    assert meta["training"]["data"]["frames"] == 8
    assert meta["scales"] == [1.0, 0.5, 0.25] and meta["interpolation"] == "bilinear"


def test_resume_continues_and_checkpoint_exports(tmp_path):
    noisy, _ = simulated_frames(n=2, size=64)
    pool = FramePool(noisy, {"frames": 2})
    cfg = TrainConfig(width=4, crop=32, batch=2, steps=4, checkpoint_every=2, preview_every=2,
                      device="cpu", rotate_degrees=5)
    out = tmp_path / "m.pt"
    _, state = train(cfg, pool, out, progress=False)
    assert state.step == 4 and out.is_file() and out.with_suffix(".preview.png").is_file()
    cfg.steps = 6
    _, state = train(cfg, pool, out, resume=str(out.with_suffix(".ckpt")), progress=False)
    assert state.step == 6
    meta = export_checkpoint(out.with_suffix(".ckpt"), tmp_path / "exported.pt")
    assert meta["training"]["steps_done"] == 6
    assert load_model(tmp_path / "exported.pt").metadata["width"] == 4


def test_fine_tuning_starts_from_the_given_model(trained_model, tmp_path):
    from Speckle2SelfLib.engine.training import config_from_model

    noisy, _ = simulated_frames(n=2, size=64, seed=50)
    cfg = config_from_model(trained_model, crop=32, batch=2, steps=1, lr=1e-9, device="cpu",
                            preview_every=0)
    out = tmp_path / "tuned.pt"
    train(cfg, FramePool(noisy, {"frames": 2}), out, progress=False, init_model=str(trained_model))
    x = simulated_frames(n=1, size=64, seed=99)[0][0]
    # fp32 pinned: bf16 inference (the default on CPUs with native bf16) rounds outputs near 0.45
    # to steps of 0.002-0.004, which would hide or fake a difference between the two models.
    a = Despeckler.from_file(trained_model, "cpu", backend="fp32").denoise(x)
    b = Despeckler.from_file(out, "cpu", backend="fp32").denoise(x)
    # One step at a negligible learning rate: the fine-tuned model is the starting model.
    np.testing.assert_allclose(a, b, atol=2e-3)


def test_fine_tuning_with_another_head_and_scales_keeps_the_model_before_the_head(trained_model, tmp_path):
    """``train --init M --head norm_leaky --scales ...``: the encoder and decoder come from M, the new
    head starts fresh (scale 1, shift 0; training then calibrates it), the new factors are stored; a model whose decoder does
    not match is refused with its name."""
    import torch

    from Speckle2SelfLib.engine.network import Speckle2SelfNet
    from Speckle2SelfLib.engine.training import build_net, config_from_model, init_from_model

    cfg = config_from_model(trained_model, head="norm_leaky", scales=[1.0, 0.35, 0.18], crop=32, batch=2,
                            steps=1, device="cpu", preview_every=0)
    meta = load_model(trained_model).metadata
    assert (cfg.head, cfg.scales, cfg.width, cfg.depth) == ("norm_leaky", [1.0, 0.35, 0.18], meta["width"],
                                                            meta["depth"])
    net = build_net(cfg)
    assert init_from_model(net, trained_model) is True, "the model had no affine head norm: it starts fresh"
    source = load_model(trained_model).module.state_dict()
    for name, value in net.decoder.state_dict().items():
        if f"decoder.{name}" in source:
            assert torch.equal(value, source[f"decoder.{name}"]), name
    head_norm = net.decoder.layers[-2]
    assert torch.equal(head_norm.weight, torch.ones(1)) and torch.equal(head_norm.bias, torch.zeros(1))
    out = tmp_path / "leaky.pt"
    train(cfg, FramePool(simulated_frames(n=2, size=64, seed=50)[0], {"frames": 2}), out, progress=False,
          init_model=str(trained_model))
    tuned = load_model(out).metadata
    assert tuned["head"] == "norm_leaky" and tuned["scales"] == [1.0, 0.35, 0.18]
    assert 0 < tuned["training"]["data"]["head_scale"] < 1, "the fresh head was calibrated to the views"
    # and back: a linear head drops the model's norm, everything before it comes from the model
    back_cfg = config_from_model(out, head="linear", crop=32, batch=2, steps=1, device="cpu", preview_every=0)
    back = build_net(back_cfg)
    assert init_from_model(back, out) is True, "the model's head norm was dropped: the head starts fresh"
    leaky_state = load_model(out).module.state_dict()
    for name, value in back.decoder.state_dict().items():
        assert torch.equal(value, leaky_state[f"decoder.{name}"]), name
    linear_out = tmp_path / "linear.pt"
    train(back_cfg, FramePool(simulated_frames(n=2, size=64, seed=51)[0], {"frames": 2}), linear_out,
          progress=False, init_model=str(out))
    assert load_model(linear_out).metadata["head"] == "linear"
    assert "head_scale" in load_model(linear_out).metadata["training"]["data"], "the linear head was calibrated"
    other = Speckle2SelfNet(width=meta["width"] * 2, depth=meta["depth"])
    with pytest.raises(ValueError, match="encoder does not match"):
        init_from_model(other, trained_model)


def test_fresh_head_starts_at_the_views_grey_levels():
    """calibrate_head: the new head's scale and shift are the least-squares map from the
    normalised output to the view, so the start is far nearer the views than scale 1, shift 0."""
    import torch

    from Speckle2SelfLib.engine.network import Speckle2SelfNet
    from Speckle2SelfLib.engine.perturbation import minmax_normalise
    from Speckle2SelfLib.engine.training import calibrate_head

    torch.manual_seed(0)
    frames = simulated_frames(n=4, size=64, seed=7)[0]
    views = minmax_normalise(torch.from_numpy(np.stack(frames)[:, None].astype(np.float32)))
    net = Speckle2SelfNet(width=4, depth=2, head="norm_leaky").eval()
    with torch.no_grad():
        before = torch.mean((net([views])[0] - views) ** 2).item()
        values = calibrate_head(net, views)
        after = torch.mean((net([views])[0] - views) ** 2).item()
    assert values is not None and values["head_scale"] == pytest.approx(net.decoder.layers[-2].weight.item(), abs=1e-4)
    assert after < 0.5 * before, f"MSE to the view {before:.4f} -> {after:.4f}"
    assert calibrate_head(Speckle2SelfNet(width=4, depth=2, head="norm_relu"), views) is None


def test_a_linear_head_replacing_a_norm_head_starts_at_the_views_grey_levels():
    """A model's last conv trained to feed an InstanceNorm has arbitrary grey levels; with a
    linear head in its place, calibrate_head scales and shifts that conv's output by the
    least-squares map to the view, so training does not start far from the views."""
    import torch

    from Speckle2SelfLib.engine.network import Speckle2SelfNet
    from Speckle2SelfLib.engine.perturbation import minmax_normalise
    from Speckle2SelfLib.engine.training import calibrate_head

    torch.manual_seed(1)
    frames = simulated_frames(n=4, size=64, seed=8)[0]
    views = minmax_normalise(torch.from_numpy(np.stack(frames)[:, None].astype(np.float32)))
    net = Speckle2SelfNet(width=4, depth=2, head="linear").eval()
    last = net.decoder.layers[-1]
    with torch.no_grad():
        last.weight.mul_(40.0)       # grey levels far from the views', as after a norm head
        last.bias.fill_(-3.0)
        before = torch.mean((net.decoder(net.encoder_for(0)(views)) - views) ** 2).item()
        values = calibrate_head(net, views)
        raw = net.decoder(net.encoder_for(0)(views))
        after = torch.mean((raw - views) ** 2).item()
    assert values is not None and values["head_scale"] > 0
    assert abs(raw.mean().item() - views.mean().item()) < 1e-3, "the shift puts the output's mean at the view's"
    assert after < 0.2 * before, f"MSE to the view {before:.4f} -> {after:.4f}"


def test_training_needs_a_stopping_rule_and_valid_crop():
    with pytest.raises(ValueError, match="stopping rule"):
        TrainConfig()
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainConfig(steps=1, crop=100)
    with pytest.raises(ValueError, match="no training frames"):
        FramePool([], {})


def test_cuda_training_draws_crops_on_the_device():
    """``train --device cuda`` samples through the engine's DeviceFramePool (the same crops as
    FramePool.sample; checked on the CPU, where it runs the same code)."""
    import torch
    from Speckle2SelfLib.engine.perturbation import minmax_normalise
    from Speckle2SelfLib.engine.training import DeviceFramePool, FramePool, sampling_pool

    frame = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    pool = FramePool([frame], {"files": 1})
    assert sampling_pool(pool, "cpu", 64, 10.0) is pool
    on_gpu = sampling_pool(pool, "cuda:0", 64, 10.0)
    assert isinstance(on_gpu, DeviceFramePool) and on_gpu.summary is pool.summary and on_gpu.device == "cuda:0"
    here = DeviceFramePool.from_pool(pool, "cpu", 64, 10.0)
    here.prepare_views((1.0, 0.5, 0.25))
    pool.prepare_views((1.0, 0.5, 0.25))
    expected = minmax_normalise(torch.from_numpy(pool._views[0][0].astype(np.float32))[None, None])[0, 0]
    for sample in here.sample(np.random.default_rng(0), 4, 64, augment_prob=0.0)[0][:, 0]:
        assert torch.allclose(sample, expected, atol=1e-6) or torch.allclose(sample, expected.flip(-1), atol=1e-6)
