"""Memory estimates made before a run starts, so that a run that cannot fit is refused at once
(with the estimate and settings that would fit) instead of being killed half-way.

Training: the activations autograd keeps for the backward pass are measured on one small
crop of the real network (saved-tensor hooks, no guessing per layer) and scaled to the crop
and batch asked for; to that come the weights, gradients and Adam state, and the training
frames' precomputed views (float16, one per scale).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

#: Share of the available memory a run may plan to use (the rest: allocator, Python, OS).
USABLE_SHARE = 0.8
#: Bytes outside the network: Python, torch and the data loader (measured 0.25-0.35 GB).
BASELINE_BYTES = 400 * 2 ** 20


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GB" if n >= 2 ** 30 / 10 else f"{n / 2 ** 20:.0f} MB"


def available_memory(device: str = "cpu") -> Optional[int]:
    """Bytes a new allocation can get: free GPU memory, or the smaller of MemAvailable and the
    cgroup limit (containers); None when unknown."""
    if device.startswith("cuda"):
        import torch
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as fh:
                limit = fh.read().strip()
            with open(usage_file) as fh:
                usage = int(fh.read().strip())
            if limit.isdigit() and int(limit) < 2 ** 60:
                found.append(max(0, int(limit) - usage))
        except (OSError, ValueError):
            continue
    if not found:
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


class InsufficientMemory(ValueError):
    """A run that would not fit in memory, refused before it starts (with settings that fit)."""


@dataclass
class TrainingEstimate:
    total: int                 # bytes
    per_sample: int            # activation bytes of one crop (all scales, forward + backward)
    fixed: int                 # weights, gradients, optimiser state, views of the frames, baseline


def activation_bytes_per_pixel(cfg) -> float:
    """Saved activations (bytes) per crop pixel for one sample, measured on a small crop."""
    import torch

    from .losses import LossConfig, speckle2self_loss
    from .perturbation import multiscale_views
    from .training import build_net

    torch.manual_seed(0)
    net = build_net(cfg)
    loss_cfg = LossConfig(cfg.reconstruction, cfg.consistency)

    def saved_bytes(side: int) -> int:
        seen = {}

        def pack(t):
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            except RuntimeError:
                key = (id(t), t.numel() * t.element_size())
            seen[key] = key[1]
            return t

        x = torch.rand(1, 1, side, side)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            views = multiscale_views(x, cfg.scales, cfg.interpolation)
            speckle2self_loss(net(views), views, loss_cfg)
        return sum(seen.values())

    # Two sizes: the difference removes what does not grow with the crop (weights saved for backward).
    side = 2 * 2 ** int(cfg.depth)
    small, large = saved_bytes(side), saved_bytes(2 * side)
    # Saved tensors plus the live outputs and gradients of the widest layer (measured about 1.5x).
    return 1.5 * max(large - small, 0) / (3 * side * side)


def estimate_training(cfg, frame_pixels: int) -> TrainingEstimate:
    """Peak bytes of ``train(cfg, pool)`` for a pool of ``frame_pixels`` pixels in all."""
    from .training import build_net

    per_pixel = activation_bytes_per_pixel(cfg)
    per_sample = int(per_pixel * cfg.crop * cfg.crop)
    params = sum(p.numel() for p in build_net(cfg).parameters()) * 4
    working = float(getattr(cfg, "working_scale", 1.0) or 1.0)
    views = int(frame_pixels * working * working * (2 * len(cfg.scales) + 4))   # float16 views + float32 frames
    fixed = BASELINE_BYTES + 4 * params + views
    return TrainingEstimate(fixed + per_sample * int(cfg.batch), per_sample, fixed)


def fitting_settings(estimate: TrainingEstimate, available: int, crop: int, batch: int,
                     multiple: int = 16) -> Tuple[int, int]:
    """The largest (crop, batch) no larger than asked that fits ``available`` bytes; (0, 0) if none."""
    budget = available * USABLE_SHARE - estimate.fixed
    if budget <= 0:
        return 0, 0
    per_pixel = estimate.per_sample / (crop * crop)
    fit_batch = int(budget // max(estimate.per_sample, 1))
    if fit_batch >= 1:
        return crop, min(batch, fit_batch)
    side = int((budget / per_pixel) ** 0.5) // multiple * multiple
    return (side, 1) if side >= 2 * multiple else (0, 0)
