"""Network, multi-scale perturbation and loss: the method's facts hold in code."""

import numpy as np
import pytest
import torch

from Speckle2SelfLib.engine.losses import LossConfig, speckle2self_loss
from Speckle2SelfLib.engine.network import Speckle2SelfNet, count_macs, count_parameters, pad_to_multiple
from Speckle2SelfLib.engine.perturbation import minmax_normalise, multiscale_views


def test_views_are_normalised_and_share_anatomy_but_not_speckle():
    rng = np.random.default_rng(0)
    clean = np.zeros((64, 64), np.float32)
    clean[:, 32:] = 1.0
    noisy = torch.from_numpy(clean + 0.3 * rng.random((64, 64), dtype=np.float32))[None, None]
    views = multiscale_views(noisy)
    assert len(views) == 3
    for v in views:
        assert v.shape == noisy.shape
        assert v.min().item() == pytest.approx(0.0) and v.max().item() == pytest.approx(1.0)
    # Coarser views average the noise away: less noise relative to the edge's contrast.
    noise_to_step = [(v[..., 8:56, 4:28].std() / (v[..., 36:60].mean() - v[..., 4:28].mean())).item()
                     for v in views]
    assert max(noise_to_step[1:]) < 0.6 * noise_to_step[0]
    # The coarse views resample the noise differently: their residuals are not the same pattern.
    res1, res2 = (v[0, 0, 8:56, 4:28].flatten() for v in views[1:])
    assert torch.corrcoef(torch.stack([res1, res2]))[0, 1] < 0.9
    # ...but the edge stays where it was in every view.
    for v in views:
        profile = v[0, 0, :, :].mean(0)
        assert abs(int(torch.argmax(profile[1:] - profile[:-1])) + 1 - 32) <= 2


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "area", "nearest"])
def test_every_interpolation_gives_views(mode):
    x = torch.rand(2, 1, 32, 48)
    assert [v.shape for v in multiscale_views(x, interpolation=mode)] == [x.shape] * 3


def test_constant_input_gives_zeros_not_nan():
    views = multiscale_views(torch.full((1, 1, 32, 32), 7.0))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in views)
    assert torch.equal(minmax_normalise(torch.ones(1, 1, 4, 4)), torch.zeros(1, 1, 4, 4))


def test_bad_perturbation_arguments_are_named():
    with pytest.raises(ValueError, match="interpolation"):
        multiscale_views(torch.rand(1, 1, 16, 16), interpolation="lanczos")
    with pytest.raises(ValueError, match="scales"):
        multiscale_views(torch.rand(1, 1, 16, 16), scales=(1.0, 2.0))


def test_architecture_is_the_papers():
    net = Speckle2SelfNet(width=32)
    assert len(net.encoders) == 3
    enc_convs = [m for m in net.encoders[0].modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert [(c.in_channels, c.out_channels) for c in enc_convs] == [(1, 32), (32, 64), (64, 128), (128, 256)]
    ups = [m for m in net.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in ups] == [(256, 128), (128, 64), (64, 32), (32, 1)]
    # Parameter count and cost per 512x512 frame, reported in docs (inference net only).
    inf = net.inference_module()
    assert 4.0e6 < count_parameters(inf) < 4.5e6
    assert 11e9 < count_macs(inf) < 13e9


def test_no_path_from_input_to_output_bypasses_the_bottleneck():
    """Changing one input pixel must not change the output there more than elsewhere in its
    16x16 cell: with a skip connection, the output would copy the pixel (speckle)."""
    torch.manual_seed(0)
    inf = Speckle2SelfNet(width=4).inference_module().eval()
    x = torch.rand(1, 1, 64, 64)
    y0 = inf(x)
    x2 = x.clone()
    x2[0, 0, 21, 21] += 0.5
    diff = (inf(x2) - y0).abs()[0, 0]
    assert diff.sum() > 0
    # Influence is spread over a wide area, not peaked at the changed pixel.
    assert diff[21, 21] < 0.5 * diff.max() + 1e-6 or diff[21, 21] < 0.05


@pytest.mark.parametrize("shape", [(1, 1, 37, 101), (2, 1, 16, 16), (1, 1, 9, 200)])
def test_inference_net_pads_and_crops_back(shape):
    inf = Speckle2SelfNet(width=4).inference_module().eval()
    with torch.no_grad():
        y = inf(torch.rand(shape))
    assert y.shape == shape
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert pad_to_multiple(torch.rand(shape)).shape[-2] % 16 == 0


def test_leaky_head_passes_gradient_below_the_mean_where_the_relu_head_passes_none():
    """The authors' IN + ReLU head maps everything below the image's mean to exactly 0 and gives
    those pixels no gradient (flat black patches in dark tissue); the leaky head keeps it."""
    torch.manual_seed(0)
    grads = {}
    for head in ("norm_relu", "norm_leaky"):
        net = Speckle2SelfNet(width=4, depth=2, upsample="resize", head=head)
        views = [v.requires_grad_(True) for v in multiscale_views(torch.rand(1, 1, 32, 32))]
        out = net(views)[0]
        below = out <= 0
        assert below.float().mean() > 0.2, "instance norm puts part of the image below its mean"
        grad_out, = torch.autograd.grad(out.sum(), out, retain_graph=True)
        pre_head = net.decoder.layers[:-1](net.encoders[0](views[0]))
        grad_pre, = torch.autograd.grad(net.decoder.layers[-1](pre_head).sum(), pre_head)
        grads[head] = float(grad_pre[pre_head < 0].abs().min())
        inf = net.inference_module().eval()
        with torch.no_grad():
            y = inf(torch.rand(1, 1, 40, 36))
        assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert grads["norm_relu"] == 0.0
    assert grads["norm_leaky"] == pytest.approx(0.2)


def test_shared_encoder_and_resize_decoder_variants():
    net = Speckle2SelfNet(width=4, upsample="resize", shared_encoder=True)
    assert len(net.encoders) == 1
    outs = net(multiscale_views(torch.rand(2, 1, 32, 32)))
    assert len(outs) == 3 and outs[0].shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="upsample"):
        Speckle2SelfNet(width=4, upsample="pixelshuffle")


def test_loss_terms_follow_the_configuration():
    a, b, c = (torch.full((1, 1, 4, 4), v) for v in (0.0, 0.5, 1.0))
    views = [torch.zeros(1, 1, 4, 4)] * 3
    default = speckle2self_loss([a, b, c], views)
    # MSE reconstruction: 0 + 0.25 + 1 ; L1 consistency: |0-.5| + |0-1| + |.5-1|
    assert default["reconstruction"].item() == pytest.approx(1.25)
    assert default["consistency"].item() == pytest.approx(2.0)
    assert default["total"].item() == pytest.approx(3.25)
    l1mse = speckle2self_loss([a, b, c], views, LossConfig("l1", "mse"))
    assert l1mse["reconstruction"].item() == pytest.approx(1.5)
    assert l1mse["consistency"].item() == pytest.approx(0.25 + 1 + 0.25)
    assert speckle2self_loss([a, b, c], views, LossConfig(consistency="none"))["consistency"].item() == 0.0
    with pytest.raises(ValueError, match="reconstruction"):
        LossConfig(reconstruction="ssim")


def test_edge_aware_consistency_drops_the_pull_across_an_edge_only():
    from Speckle2SelfLib.engine.losses import edge_weight

    coarse = torch.zeros(1, 1, 8, 8)
    coarse[..., 4:] = 1.0                     # a wall between columns 3 and 4
    weight = edge_weight(coarse, 0.015)
    assert weight[..., 3].max().item() < 1e-6          # across the wall: no pull
    assert weight[..., :3].min().item() == pytest.approx(1.0)
    assert weight[..., 5:].min().item() == pytest.approx(1.0)
    # Outputs that disagree only along the wall cost nothing with the weight, full L1 without.
    out_a, out_b = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    out_b[..., 3] = 1.0
    views = [torch.zeros(1, 1, 8, 8), coarse]
    plain = speckle2self_loss([out_a, out_b], views)
    aware = speckle2self_loss([out_a, out_b], views, LossConfig(edge_sigma=0.015))
    assert plain["consistency"].item() == pytest.approx(1 / 8)
    assert aware["consistency"].item() == pytest.approx(0.0, abs=1e-6)
    # A disagreement in flat tissue costs the same with and without the weight.
    out_b = torch.zeros(1, 1, 8, 8)
    out_b[..., 0] = 1.0
    assert speckle2self_loss([out_a, out_b], views, LossConfig(edge_sigma=0.015))["consistency"].item() \
        == pytest.approx(1 / 8)
    # The weight comes from the view named coarsest (here listed first), not from the last one.
    out_b = torch.zeros(1, 1, 8, 8)
    out_b[..., 3] = 1.0
    reordered = views[::-1]
    assert speckle2self_loss([out_a, out_b], reordered, LossConfig(edge_sigma=0.015), coarsest=0)[
        "consistency"].item() == pytest.approx(0.0, abs=1e-6)
    assert speckle2self_loss([out_a, out_b], reordered, LossConfig(edge_sigma=0.015), coarsest=1)[
        "consistency"].item() == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="edge_sigma"):
        LossConfig(edge_sigma=0.0)


def test_consistency_weight_scales_only_the_consistency_term():
    outputs = [torch.full((1, 1, 8, 8), 0.2), torch.full((1, 1, 8, 8), 0.6)]
    views = [torch.full((1, 1, 8, 8), 0.3), torch.full((1, 1, 8, 8), 0.5)]
    paper = speckle2self_loss(outputs, views)
    quarter = speckle2self_loss(outputs, views, LossConfig(consistency_weight=0.25))
    assert paper["consistency"].item() == pytest.approx(0.4) and paper["reconstruction"].item() == pytest.approx(0.02)
    assert quarter["consistency"].item() == pytest.approx(0.4)          # reported unweighted, as in the log
    assert paper["total"].item() == pytest.approx(0.02 + 0.4)
    assert quarter["total"].item() == pytest.approx(0.02 + 0.25 * 0.4)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="consistency_weight"):
            LossConfig(consistency_weight=bad)


def test_edge_weight_on_compressed_levels_keeps_a_faint_dark_step_and_lets_a_bright_one_go():
    from Speckle2SelfLib.engine.losses import edge_weight

    coarse = torch.zeros(1, 1, 4, 8)
    coarse[0, 0, :2, :4], coarse[0, 0, :2, 4:] = 0.02, 0.05     # a faint wall beside a dark lumen
    coarse[0, 0, 2:, :4], coarse[0, 0, 2:, 4:] = 0.60, 0.63     # the same step in bright tissue
    plain = edge_weight(coarse, 0.04)
    compressed = edge_weight(coarse, 0.04, power=0.5)
    dark_step, bright_step = (0, 0, 0, 3), (0, 0, 3, 3)
    assert plain[dark_step].item() == pytest.approx(plain[bright_step].item(), rel=1e-5)
    assert compressed[dark_step].item() < 0.1 < plain[dark_step].item()     # the dark wall keeps its own output
    assert compressed[bright_step].item() > plain[bright_step].item()       # bright tissue is pulled together more
    assert compressed[0, 0, 0, 0].item() == pytest.approx(1.0)              # flat tissue: full pull either way
    assert torch.equal(edge_weight(coarse, 0.04, power=1.0), plain)
    with pytest.raises(ValueError, match="edge_sigma"):
        LossConfig(edge_power=0.5)                 # the power changes a weight that is not there
    with pytest.raises(ValueError, match="edge_power"):
        LossConfig(edge_sigma=0.01, edge_power=0.1)
