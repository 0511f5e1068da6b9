"""Speckle2Self network: one encoder per perturbation scale, one shared decoder.

There are deliberately no skip connections from encoder to decoder and no residual
path from input to output: the 1/16-resolution bottleneck is what keeps the network
from copying speckle through to its output.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

#: Inputs are padded to a multiple of this (four stride-2 stages).
SIZE_MULTIPLE = 16
UPSAMPLE_MODES = ("transposed", "resize")
#: "linear": the last layer's output is clamped to [0, 1] at inference.
#: "norm_relu": the authors' head, InstanceNorm (no affine) + ReLU after the last layer; it
#: maps the darkest speckle (e.g. in an anechoic lumen) to exactly zero.
#: "norm_leaky": InstanceNorm with a learned scale and shift + LeakyReLU(LEAKY_SLOPE), clamped to
#: [0, 1] at inference. The ReLU head passes no gradient below the image's mean, so tissue a
#: little darker than the mean is never pulled back up and ends as flat black patches; the leak
#: keeps that gradient, and the learned scale lets the output match the views' grey levels (a
#: unit-variance output with a leak cannot: only the ReLU's dead zone absorbs that variance).
HEADS = ("linear", "norm_relu", "norm_leaky")
LEAKY_SLOPE = 0.2


def _conv_norm_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm2d(out_ch, affine=True),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a local identity shortcut (inside one resolution only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.InstanceNorm2d(channels, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.InstanceNorm2d(channels, affine=True),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _channels(width: int, depth: int) -> List[int]:
    return [width * 2 ** k for k in range(depth)]


class Encoder(nn.Module):
    """``depth`` stride-2 stages (paper: 4, 1 -> w -> 2w -> 4w -> 8w), each followed by a
    residual block."""

    def __init__(self, width: int = 32, depth: int = 4):
        super().__init__()
        chans = [1] + _channels(width, depth)
        stages = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            stages += [_conv_norm_relu(cin, cout, stride=2), ResidualBlock(cout)]
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)


def _upsample_block(in_ch: int, out_ch: int, mode: str) -> nn.Module:
    if mode == "transposed":
        # kernel 4 / stride 2: every output pixel gets the same number of taps,
        # which avoids most of the checkerboard that kernel 3 produces.
        up = nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False)
        return nn.Sequential(up, nn.InstanceNorm2d(out_ch, affine=True), nn.ReLU(inplace=True))
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                         _conv_norm_relu(in_ch, out_ch))


class Decoder(nn.Module):
    """Residual block, ``depth - 1`` x2 upsampling stages (paper: 8w -> 4w -> 2w -> w) each
    followed by a residual block, and a last x2 stage to one channel."""

    def __init__(self, width: int = 32, upsample: str = "transposed", depth: int = 4, head: str = "linear"):
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        chans = _channels(width, depth)[::-1]
        layers: List[nn.Module] = [ResidualBlock(chans[0])]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [_upsample_block(cin, cout, upsample), ResidualBlock(cout)]
        if upsample == "transposed":
            layers.append(nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1))
        else:
            layers += [nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False),
                       nn.Conv2d(width, 1, 3, padding=1)]
        if head == "norm_relu":
            layers += [nn.InstanceNorm2d(1, affine=False), nn.ReLU()]
        elif head == "norm_leaky":
            layers += [nn.InstanceNorm2d(1, affine=True), nn.LeakyReLU(LEAKY_SLOPE)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Pad the last two dims of (N, C, H, W) up to a multiple, reflecting where possible.

    Sides are padded to at least two multiples: instance norm needs more than one
    bottleneck pixel, or it maps everything to zero.
    """
    h, w = x.shape[-2], x.shape[-1]
    ph = max((multiple - h % multiple) % multiple, 2 * multiple - h)
    pw = max((multiple - w % multiple) % multiple, 2 * multiple - w)
    if ph == 0 and pw == 0:
        return x
    # Reflection needs the pad to be smaller than the side; tiny images fall back to edge copy.
    mode = "reflect" if (ph < h and pw < w) else "replicate"
    return F.pad(x, [0, pw, 0, ph], mode=mode)


class Speckle2SelfNet(nn.Module):
    """Training network: ``forward(views)`` maps view k through encoder k and the shared decoder."""

    def __init__(self, width: int = 32, num_scales: int = 3, upsample: str = "transposed",
                 shared_encoder: bool = False, depth: int = 4, head: str = "linear"):
        super().__init__()
        if width < 1 or num_scales < 1:
            raise ValueError("width and num_scales must be positive")
        if not 2 <= depth <= 6:
            raise ValueError(f"depth (stride-2 stages) must lie in 2..6, got {depth}; the paper uses 4")
        self.width = width
        self.num_scales = num_scales
        self.upsample = upsample
        self.shared_encoder = shared_encoder
        self.depth = depth
        self.head = head
        n_enc = 1 if shared_encoder else num_scales
        self.encoders = nn.ModuleList([Encoder(width, depth) for _ in range(n_enc)])
        self.decoder = Decoder(width, upsample, depth, head)

    def encoder_for(self, k: int) -> Encoder:
        return self.encoders[0 if self.shared_encoder else k]

    def forward(self, views: List[torch.Tensor]) -> List[torch.Tensor]:
        return [self.decoder(self.encoder_for(k)(v)) for k, v in enumerate(views)]

    def inference_module(self) -> "InferenceNet":
        """The deployable net: full-resolution encoder + shared decoder (weights shared)."""
        return InferenceNet(self.encoder_for(0), self.decoder, 2 ** self.depth)


class InferenceNet(nn.Module):
    """Full-resolution encoder + decoder; pads to a multiple of 2^depth (16) and crops back.

    Input (N, 1, H, W) in [0, 1]; output the same shape, clamped to [0, 1].
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, size_multiple: int = SIZE_MULTIPLE):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.size_multiple = size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        y = self.decoder(self.encoder(pad_to_multiple(x, self.size_multiple)))
        return y[:, :, :h, :w].clamp(0.0, 1.0)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, height: int = 512, width: int = 512) -> int:
    """Multiply-accumulates of one forward pass of a (1, 1, H, W) frame (convolutions only)."""
    macs = 0

    def conv_hook(mod, _inp, out):
        nonlocal macs
        k = mod.kernel_size[0] * mod.kernel_size[1]
        if isinstance(mod, nn.ConvTranspose2d):
            # each input pixel scatters k taps into every output channel
            n_in = _inp[0].shape[-1] * _inp[0].shape[-2]
            macs += n_in * k * mod.in_channels * mod.out_channels // mod.groups
        else:
            macs += out.shape[-1] * out.shape[-2] * k * mod.in_channels * mod.out_channels // mod.groups

    hooks = [m.register_forward_hook(conv_hook) for m in module.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, 1, height, width))
    finally:
        for h in hooks:
            h.remove()
    return macs
