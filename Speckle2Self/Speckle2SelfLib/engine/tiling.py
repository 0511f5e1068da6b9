"""Bounded-memory inference for large frames: the network layer by layer, convolutions in strips.

Why not independent overlapping tiles: every block of the network ends in an InstanceNorm,
whose mean and variance are taken over the *whole* frame. A tile normalised with its own
statistics gives a different result everywhere, not only at its seams (a tile of dark
background would have its noise stretched to full contrast). So instead:

* each InstanceNorm is a global step: its per-channel statistics are computed over the whole
  activation map, which is then normalised in place;
* the local layers between two norms (convolutions, transposed convolutions, upsampling,
  ReLU) are run in horizontal strips with a halo that covers their receptive field, so only
  one strip of their (possibly 4x larger, upsampled) intermediates exists at a time;
* the residual shortcut ``act(x + body(x))`` is added in place.

The result equals the plain forward pass up to float rounding (the reductions are summed in
another order), with no seams at all; peak memory is a few activation maps of one frame at
the network's first (1/2) resolution instead of the whole graph's intermediates for a batch.

The scripted module is walked through its submodules (``original_name``); a structure this
executor does not know raises :class:`UnsupportedNetwork`, and :func:`self_check` compares it
against the module on a small probe before it is trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import List, Optional, Union

#: Bytes one strip's intermediates may take (per run of local layers).
STRIP_BUDGET = 48 * 2 ** 20


class UnsupportedNetwork(RuntimeError):
    """The module holds a layer type the strip executor cannot run exactly."""


@dataclass
class _Local:
    module: object
    kind: str                 # conv | convt | upsample | pointwise
    scale: Fraction           # output rows per input row
    halo: int                 # rows of input context needed on each side
    out_channels: Optional[int] = None


@dataclass
class _Norm:
    module: object


@dataclass
class _Residual:
    body: List["_Step"]
    act: List["_Step"] = field(default_factory=list)


_Step = Union[_Local, _Norm, _Residual]


@dataclass
class Plan:
    steps: List[_Step]
    size_multiple: int


def _name(module) -> str:
    return str(getattr(module, "original_name", type(module).__name__))


def _pair_first(value) -> int:
    return int(value[0] if isinstance(value, (tuple, list)) else value)


def _local(module) -> _Local:
    name = _name(module)
    if name == "Conv2d":
        stride, k, d = _pair_first(module.stride), _pair_first(module.kernel_size), _pair_first(module.dilation)
        if _pair_first(module.stride) != int(module.stride[-1]):
            raise UnsupportedNetwork("anisotropic stride")
        return _Local(module, "conv", Fraction(1, stride), (k - 1) * d // 2 + 1, int(module.out_channels))
    if name == "ConvTranspose2d":
        stride, k = _pair_first(module.stride), _pair_first(module.kernel_size)
        return _Local(module, "convt", Fraction(stride), k // stride + 2, int(module.out_channels))
    if name == "Upsample":
        factor = module.scale_factor
        factor = factor[0] if isinstance(factor, (tuple, list)) else factor
        if factor is None or float(factor) != int(factor) or module.size is not None:
            raise UnsupportedNetwork("upsampling to a fixed size or by a non-integer factor")
        return _Local(module, "upsample", Fraction(int(factor)), 2)
    if name in ("ReLU", "LeakyReLU", "Identity", "Sigmoid", "Tanh"):
        return _Local(module, "pointwise", Fraction(1), 0)
    raise UnsupportedNetwork(f"layer type {name}")


def _children(module) -> list:
    return [child for _name_, child in module.named_children()]


def _walk(module) -> List[_Step]:
    name = _name(module)
    if name in ("Sequential", "Encoder", "Decoder"):
        steps: List[_Step] = []
        for child in _children(module):
            steps += _walk(child)
        return steps
    if name == "ResidualBlock":
        parts = dict(module.named_children())
        if set(parts) != {"body", "act"}:
            raise UnsupportedNetwork("residual block layout")
        return [_Residual(_walk(parts["body"]), _walk(parts["act"]))]
    if name == "InstanceNorm2d":
        return [_Norm(module)]
    return [_local(module)]


def build_plan(module) -> Plan:
    """The steps of an InferenceNet (pad, encoder, decoder, crop, clamp); raises UnsupportedNetwork."""
    if _name(module) != "InferenceNet":
        raise UnsupportedNetwork(f"top-level module {_name(module)}")
    parts = dict(module.named_children())
    if set(parts) != {"encoder", "decoder"}:
        raise UnsupportedNetwork("InferenceNet layout")
    return Plan(_walk(parts["encoder"]) + _walk(parts["decoder"]), int(module.size_multiple))


# ----------------------------------------------------------------------------- execution

def run_plan(plan: Plan, x, strip_budget: int = STRIP_BUDGET):
    """(N, 1, H, W) float32 in [0, 1] -> (N, 1, H, W), one frame at a time."""
    import torch

    from .network import pad_to_multiple

    outputs = []
    with torch.inference_mode():
        for frame in x.split(1):
            h, w = frame.shape[-2:]
            y = _run_steps(plan.steps, pad_to_multiple(frame, plan.size_multiple).clone(), True, strip_budget)
            outputs.append(y[:, :, :h, :w].clamp(0.0, 1.0))
            del y
    return torch.cat(outputs)


def _run_steps(steps: List[_Step], x, owned: bool, budget: int):
    """Run steps on a whole activation map; ``owned``: x may be modified in place."""
    i = 0
    while i < len(steps):
        step = steps[i]
        if isinstance(step, _Norm):
            x = x if owned else x.clone()
            _instance_norm_(step.module, x)
            owned = True
            i += 1
        elif isinstance(step, _Residual):
            body = _run_steps(step.body, x, False, budget)
            x = x if owned else x.clone()
            x.add_(body)
            del body
            x = _run_steps(step.act, x, True, budget)
            owned = True
            i += 1
        else:
            run = []
            while i < len(steps) and isinstance(steps[i], _Local):
                run.append(steps[i])
                i += 1
            if all(s.kind == "pointwise" for s in run) and owned:
                for s in run:
                    _pointwise_(s.module, x)
            else:
                x = _run_strips(run, x, budget)
                owned = True
    return x


def _pointwise_(module, x) -> None:
    if _name(module) == "ReLU":
        x.clamp_(min=0)
    else:
        x.copy_(module(x))


def _instance_norm_(module, x) -> None:
    """InstanceNorm2d of a (1, C, H, W) map, in place, with statistics over the whole map."""
    import torch

    running = getattr(module, "running_mean", None)
    if running is not None and not bool(getattr(module, "training", False)):
        mean, var = running.view(1, -1, 1, 1), module.running_var.view(1, -1, 1, 1)
    else:
        var, mean = torch.var_mean(x, dim=(2, 3), unbiased=False, keepdim=True)
    scale = torch.rsqrt(var + float(module.eps))
    weight = getattr(module, "weight", None)
    if weight is not None:
        scale = scale * weight.view(1, -1, 1, 1)
    x.sub_(mean).mul_(scale)
    bias = getattr(module, "bias", None)
    if bias is not None:
        x.add_(bias.view(1, -1, 1, 1))


def _out_rows(run: List[_Local], rows: int) -> int:
    for s in run:
        m = s.module
        if s.kind == "conv":
            k, st, p, d = (_pair_first(m.kernel_size), _pair_first(m.stride), _pair_first(m.padding),
                           _pair_first(m.dilation))
            rows = (rows + 2 * p - d * (k - 1) - 1) // st + 1
        elif s.kind == "convt":
            k, st, p = _pair_first(m.kernel_size), _pair_first(m.stride), _pair_first(m.padding)
            rows = (rows - 1) * st - 2 * p + _pair_first(m.dilation) * (k - 1) + _pair_first(m.output_padding) + 1
        elif s.kind == "upsample":
            rows = int(math.floor(rows * s.scale))
    return rows


def _run_strips(run: List[_Local], x, budget: int):
    """A run of local layers over horizontal strips of x, each with a halo; exact."""
    import torch

    h_in, w_in, c_in = x.shape[-2], x.shape[-1], x.shape[1]
    scale, align, halo, per_row = Fraction(1), 1, Fraction(0), c_in * w_in * 4
    channels = c_in
    for s in run:
        halo += Fraction(s.halo) / scale          # in rows of the run's input
        if s.scale < 1:
            align = align * int(1 / (scale * s.scale)) // math.gcd(align, int(1 / (scale * s.scale)))
        scale *= s.scale
        channels = s.out_channels or channels
        per_row = max(per_row, int(channels * w_in * scale * scale * 4))
    step = align * scale.denominator // math.gcd(align, scale.denominator)   # core rows: multiples of step
    margin = int(math.ceil(halo / step)) * step + step
    h_out = _out_rows(run, h_in)
    core = max(step, int(budget // max(per_row, 1)) // step * step)
    if core + 2 * margin >= h_in:
        return _apply(run, x)
    out = None
    for c0 in range(0, h_in, core):
        c1 = min(h_in, c0 + core)
        i0, i1 = max(0, c0 - margin), min(h_in, c1 + margin)
        y = _apply(run, x[:, :, i0:i1])
        o0 = int((c0 - i0) * scale)
        rows = (int(c1 * scale) if c1 < h_in else h_out) - int(c0 * scale)
        if out is None:
            out = torch.empty((1, y.shape[1], h_out, y.shape[-1]), dtype=y.dtype, device=y.device)
        out[:, :, int(c0 * scale):int(c0 * scale) + rows] = y[:, :, o0:o0 + rows]
        del y
    return out


def _apply(run: List[_Local], x):
    for s in run:
        x = s.module(x)
    return x


def self_check(module, plan: Plan, tolerance: float = 1e-4) -> float:
    """Largest difference between the plan (forced into several strips) and the module on a probe.

    Raises UnsupportedNetwork when it exceeds ``tolerance``.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((1, 1, 8 * plan.size_multiple + 5, 3 * plan.size_multiple + 3), generator=generator)
    with torch.inference_mode():
        expected = module(probe)
    got = run_plan(plan, probe, strip_budget=4096)      # several strips per layer
    err = float((got - expected).abs().max())
    if not err <= tolerance:
        raise UnsupportedNetwork(f"strip execution differs from the module by {err:.2g}")
    return err
