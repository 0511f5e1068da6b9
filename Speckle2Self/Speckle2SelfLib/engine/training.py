"""Self-supervised training: random crops of unlabeled frames, multi-scale views, Adam.

No clean images are needed: every frame of every input file is a training sample.
Runs stop by steps, epochs or a wall-clock budget, checkpoint regularly and resume
exactly where they stopped, so long CPU runs can live in the background.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..fileio.imageio import iter_inputs, read_frames
from .losses import LossConfig, speckle2self_loss
from .perturbation import DEFAULT_SCALES, minmax_normalise, multiscale_views, resample_to_working_scale


@dataclass
class TrainConfig:
    width: int = 32
    scales: Sequence[float] = DEFAULT_SCALES
    interpolation: str = "bilinear"
    upsample: str = "transposed"
    shared_encoder: bool = False
    depth: int = 4                    # stride-2 stages; the paper's bottleneck is 1/16 (4)
    head: str = "linear"              # "norm_relu": the authors' InstanceNorm + ReLU output head
    crop: int = 128
    batch: int = 16
    lr: float = 1e-3
    betas: Sequence[float] = (0.5, 0.999)
    lr_schedule: str = "constant"     # "cosine": warm-up, then cosine decay over the budget
    warmup_steps: int = 200
    steps: Optional[int] = None
    epochs: Optional[float] = None
    minutes: Optional[float] = None
    # Augmentation is applied AFTER the views are made, identically to every view: a
    # resampling step before the views would blur the full-resolution view towards the
    # coarser ones and teach the net to copy its input.
    augment_prob: float = 0.3         # share of samples rotated (the authors augment 30%)
    rotate_degrees: float = 10.0
    working_scale: float = 1.0        # frames are resampled by this before the views (grain matching)
    reconstruction: str = "mse"
    consistency: str = "l1"
    consistency_weight: float = 1.0   # the consistency term's weight (the paper: 1; losses.LossConfig)
    edge_sigma: Optional[float] = None  # edge-aware consistency (losses.edge_weight); None: the paper's
    edge_power: float = 1.0           # the edge weight compares view ** edge_power (losses.LossConfig)
    seed: int = 0
    device: str = "auto"
    amp: bool = True                  # CUDA: fp16/bf16; CPU: bf16 where the CPU has native bf16
    checkpoint_every: int = 200       # steps
    preview_every: int = 500          # steps (0: never)
    name: str = "speckle2self"

    def __post_init__(self):
        if self.crop % 16 or self.crop < 32:
            raise ValueError(f"crop must be a multiple of 16 and at least 32, got {self.crop}")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")
        if self.steps is None and self.epochs is None and self.minutes is None:
            raise ValueError("give a stopping rule: steps, epochs or minutes")
        if not 0.0 <= self.augment_prob <= 1.0:
            raise ValueError(f"augment_prob must lie in [0, 1], got {self.augment_prob}")
        if not 0.05 <= self.working_scale <= 4.0:
            raise ValueError(f"working_scale must lie in [0.05, 4], got {self.working_scale}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        self.loss_config()   # validates the loss settings
        self._check_numbers()   # issue #16: no NaN/zero/negative settings reach a run

    def loss_config(self) -> LossConfig:
        """The loss this run trains with."""
        return LossConfig(self.reconstruction, self.consistency, consistency_weight=self.consistency_weight,
                          edge_sigma=self.edge_sigma, edge_power=self.edge_power)

    def _check_numbers(self) -> None:
        import math

        def finite_positive(name, value):
            if value is not None and (isinstance(value, bool) or not math.isfinite(float(value)) or value <= 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")

        if self.steps is not None and int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1 (0 steps would write an untrained model), got {self.steps}")
        finite_positive("epochs", self.epochs)
        finite_positive("minutes", self.minutes)
        finite_positive("lr", self.lr)
        if int(self.width) < 1:
            raise ValueError(f"width must be at least 1, got {self.width}")
        if self.crop % 2 ** int(self.depth):
            raise ValueError(f"crop {self.crop} must be a multiple of 2^depth = {2 ** int(self.depth)}")
        if not self.scales or any(not (math.isfinite(float(v)) and 0 < float(v) <= 1) for v in self.scales):
            raise ValueError(f"scales must be numbers in (0, 1], got {list(self.scales)}")
        if not math.isfinite(float(self.rotate_degrees)):
            raise ValueError(f"rotate_degrees must be finite, got {self.rotate_degrees}")
        if int(self.checkpoint_every) < 1 or int(self.preview_every) < 0:
            raise ValueError("checkpoint_every must be at least 1 and preview_every at least 0")


# ----------------------------------------------------------------------------- data

#: Crops whose full view spans less of the frame's [0, 1] range than this are redrawn.
MIN_CROP_CONTRAST = 0.25


class FramePool:
    """All training frames as float32 [0, 1] arrays; views made per whole frame; random crops.

    The views of each frame are computed once, on the whole frame (after resampling it to the
    working scale), so a crop's views are exactly the whole frame's views there; crops then
    get the same augmentation in every view, and each view is stretched to [0, 1].
    """

    def __init__(self, frames: List[np.ndarray], summary: Dict):
        if not frames:
            raise ValueError("no training frames; give image, volume, sequence or DICOM files or folders")
        self.frames = frames
        self.summary = summary
        self._views: Optional[List[np.ndarray]] = None
        self._views_key = None

    @classmethod
    def from_paths(cls, inputs: Sequence[str], min_side: int = 32) -> "FramePool":
        frames, files, skipped = [], [], []
        for path in iter_inputs(list(inputs)):
            data = read_frames(path)
            usable = [f for f in data.frames if min(f.shape) >= min_side and f.max() > f.min()]
            if not usable:
                skipped.append(path.name)
                continue
            frames += [_to_unit(f) for f in usable]
            files.append(path.name)
        summary = {"files": len(files), "frames": len(frames), "examples": files[:10],
                   "skipped": skipped[:10]}
        return cls(frames, summary)

    def __len__(self) -> int:
        return len(self.frames)

    def check_crop(self, crop: int, working_scale: float = 1.0, multiple: int = 16) -> None:
        """A ValueError, before any training, when a frame at the working scale is smaller than
        the crop: its crops would be padded with mirrored anatomy the network then learns."""
        sides = [(max(1, round(h * working_scale)), max(1, round(w * working_scale))) for h, w in
                 (f.shape for f in self.frames)]
        h, w = min(sides, key=min)
        if crop > min(h, w):
            fits = min(h, w) // multiple * multiple
            fix = f"use a crop of {fits} px or less (a multiple of {multiple})" if fits >= 32 else \
                "leave out frames this small"
            scale = f" at working scale {working_scale:g}" if working_scale != 1.0 else ""
            raise ValueError(f"the crop ({crop} px) is larger than the smallest training frame, {h}x{w} px{scale}: "
                             f"{fix}")

    def prepare_views(self, scales: Sequence[float], interpolation: str = "bilinear",
                      working_scale: float = 1.0) -> None:
        """Compute and keep (S, H, W) float16 views of every frame (idempotent)."""
        import torch

        key = (tuple(scales), interpolation, float(working_scale))
        if self._views_key == key:
            return
        views = []
        for frame in self.frames:
            x = torch.from_numpy(np.ascontiguousarray(frame))[None, None]
            x = resample_to_working_scale(x, working_scale)
            stack = torch.cat(multiscale_views(x, scales, interpolation), dim=1)[0]
            views.append(stack.to(torch.float16).numpy())
        self._views, self._views_key = views, key

    def sample(self, rng: np.random.Generator, batch: int, crop: int, augment_prob: float = 0.3,
               rotate_degrees: float = 10.0):
        """One (B, 1, crop, crop) torch batch per view: the same crop and augmentation in every view."""
        import torch

        if self._views is None:
            raise RuntimeError("call prepare_views() before sampling")
        rotate = rng.random(batch) < augment_prob if rotate_degrees else np.zeros(batch, bool)
        # Rotated samples need a margin so no corner samples outside the patch.
        margin = math.ceil(crop * (abs(math.cos(math.radians(rotate_degrees))) +
                                   abs(math.sin(math.radians(rotate_degrees))))) + 2
        patches = []
        for rot in rotate:
            patch = torch.from_numpy(self._contrasted_crop(rng, margin if rot else crop).astype(np.float32))
            if rot:
                angle = rng.uniform(-rotate_degrees, rotate_degrees)
                patch = _rotate_center_crop(patch[None], np.array([angle]), crop)[0]
            patches.append(patch)
        x = torch.stack(patches)                                  # (B, S, crop, crop)
        # Horizontal flips only: a vertical flip would put depth (attenuation) upside down.
        flip = torch.from_numpy(rng.random(batch) < 0.5)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        # Each view of each crop is stretched to [0, 1], as the paper normalises each view: with
        # whole-frame ranges, dark crops have so little contrast that the L1 consistency term
        # outweighs the MSE reconstruction and the net collapses to a flat output.
        return [minmax_normalise(x[:, k:k + 1].contiguous()) for k in range(x.shape[1])]

    def _contrasted_crop(self, rng: np.random.Generator, size: int, tries: int = 20) -> np.ndarray:
        """A random crop whose full view spans at least MIN_CROP_CONTRAST of the frame's range:
        stretching a near-flat crop to [0, 1] would only teach the net quantisation noise."""
        for _ in range(tries):
            views = self._crop(rng, size)
            full = views[0]
            if float(full.max()) - float(full.min()) >= MIN_CROP_CONTRAST:
                return views
        return views

    def view_difference(self, working_scale: float = 1.0, max_frames: int = 16) -> Optional[float]:
        """Mean view difference (0.5 view vs full view, Speckle2SelfLib.engine.grain) of up to
        ``max_frames`` frames at the working scale: what the model learns to work at."""
        from .grain import view_difference_at

        pick = np.unique(np.linspace(0, len(self.frames) - 1, min(max_frames, len(self.frames))).round().astype(int))
        values = [view_difference_at(self.frames[k], working_scale) for k in pick]
        values = [v for v in values if v is not None]
        return round(float(np.mean(values)), 4) if values else None

    def _crop(self, rng: np.random.Generator, size: int) -> np.ndarray:
        views = self._views[rng.integers(len(self._views))]
        _, h, w = views.shape
        if h < size or w < size:
            views = np.pad(views, ((0, 0), (0, max(0, size - h)), (0, max(0, size - w))), mode="reflect")
            _, h, w = views.shape
        r, c = rng.integers(h - size + 1), rng.integers(w - size + 1)
        return views[:, r:r + size, c:c + size]



class DeviceFramePool(FramePool):
    """A FramePool whose crops are drawn on the training device (one GPU, no CPU round trips);
    ``train`` samples through it on CUDA (:func:`sampling_pool`).

    The views are the library's (``FramePool.prepare_views``), moved to the device once. A batch is
    drawn as ``FramePool.sample`` draws it: a frame and a position uniformly per sample; rotated
    samples (``augment_prob``) take a patch with the library's margin and are rotated about its
    centre and centre-cropped (bilinear, reflection); crops whose full view spans less than
    MIN_CROP_CONTRAST are redrawn (here: the first of ``CANDIDATES`` draws that passes, else the
    last); horizontal flips; each view of each crop stretched to [0, 1]. Frames smaller than a
    patch are reflect-padded at the bottom/right, as the library pads them.
    """

    CANDIDATES = 8

    def __init__(self, frames, summary, device: str, crop: int, rotate_degrees: float):
        super().__init__(frames, summary)
        self.device = device
        self.margin = self._margin(crop, rotate_degrees)
        self._stack = None

    @classmethod
    def from_pool(cls, pool: FramePool, device: str, crop: int, rotate_degrees: float) -> "DeviceFramePool":
        """The same frames and summary (the same dict: what training adds to it stays visible)."""
        return cls(pool.frames, pool.summary, device, crop, rotate_degrees)

    @staticmethod
    def _margin(crop: int, rotate_degrees: float) -> int:
        # The library's margin (FramePool.sample): a rotated crop never samples outside the patch.
        rad = math.radians(rotate_degrees)
        return math.ceil(crop * (abs(math.cos(rad)) + abs(math.sin(rad)))) + 2

    def prepare_views(self, scales, interpolation: str = "bilinear", working_scale: float = 1.0) -> None:
        import torch

        key = (tuple(scales), interpolation, float(working_scale))
        if self._views_key == key and self._stack is not None:
            return
        super().prepare_views(scales, interpolation, working_scale)
        sizes = np.array([v.shape[1:] for v in self._views])
        height, width = max(int(sizes[:, 0].max()), self.margin), max(int(sizes[:, 1].max()), self.margin)
        stack = np.empty((len(self._views), self._views[0].shape[0], height, width), np.float16)
        for k, views in enumerate(self._views):
            h, w = views.shape[1:]
            stack[k] = views if (h, w) == (height, width) else \
                np.pad(views, ((0, 0), (0, height - h), (0, width - w)), mode="reflect")
        self._sizes = sizes
        self._stack = torch.from_numpy(stack).to(self.device)
        self._views = None            # the device copy is the one sampled; free the host one

    def sample(self, rng, batch: int, crop: int, augment_prob: float = 0.3, rotate_degrees: float = 10.0):
        import torch

        if self._stack is None:
            raise RuntimeError("call prepare_views() before sampling")
        rotate = rng.random(batch) < augment_prob if rotate_degrees else np.zeros(batch, bool)
        margin = self._margin(crop, rotate_degrees)
        if margin > self._stack.shape[-1] or margin > self._stack.shape[-2]:
            raise ValueError(f"patches of {margin} px need a pool made with crop {crop} and rotation {rotate_degrees}")
        x = torch.empty((batch, self._stack.shape[1], crop, crop), device=self.device)
        plain = np.flatnonzero(~rotate)
        turned = np.flatnonzero(rotate)
        if len(plain):
            x[torch.as_tensor(plain, device=self.device)] = self._patches(rng, len(plain), crop)
        if len(turned):
            patches = self._patches(rng, len(turned), margin)
            angles = rng.uniform(-rotate_degrees, rotate_degrees, len(turned))
            x[torch.as_tensor(turned, device=self.device)] = self._rotate_center_crop(patches, angles, crop)
        flip = torch.as_tensor(rng.random(batch) < 0.5, device=self.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return [minmax_normalise(x[:, k:k + 1].contiguous()) for k in range(x.shape[1])]

    def _patches(self, rng, n: int, size: int):
        """(n, S, size, size) float32 patches; the full view of each spans >= MIN_CROP_CONTRAST where
        one of CANDIDATES draws does."""
        import torch

        k = self.CANDIDATES
        idx = rng.integers(len(self._sizes), size=(n, k))
        h, w = self._sizes[idx, 0], self._sizes[idx, 1]
        r = np.floor(rng.random((n, k)) * (np.maximum(h - size, 0) + 1)).astype(np.int64)
        c = np.floor(rng.random((n, k)) * (np.maximum(w - size, 0) + 1)).astype(np.int64)
        dev = self.device
        idx_t, r_t, c_t = (torch.as_tensor(a, device=dev) for a in (idx, r, c))
        span = torch.arange(size, device=dev)
        full = self._stack[idx_t[..., None, None], 0, (r_t[..., None] + span)[..., :, None],
                           (c_t[..., None] + span)[..., None, :]]                     # (n, k, size, size)
        flat = full.flatten(2).float()
        ok = (flat.amax(-1) - flat.amin(-1)) >= MIN_CROP_CONTRAST
        # argmax gives the first passing draw; where none passes, the last draw (as the library)
        pick = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), k - 1, dtype=torch.long, device=dev))
        rows = torch.arange(n, device=dev)
        idx_c, r_c, c_c = idx_t[rows, pick], r_t[rows, pick], c_t[rows, pick]
        views = torch.arange(self._stack.shape[1], device=dev)
        patches = self._stack[idx_c[:, None, None, None], views[None, :, None, None],
                              (r_c[:, None] + span)[:, None, :, None], (c_c[:, None] + span)[:, None, None, :]]
        return patches.float()

    def _rotate_center_crop(self, x, angles_deg, crop: int):
        """The library's _rotate_center_crop on the device."""
        import torch
        import torch.nn.functional as F

        size = x.shape[-1]
        a = torch.as_tensor(np.radians(angles_deg), dtype=torch.float32, device=x.device)
        scale = crop / size
        theta = torch.zeros(len(angles_deg), 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) * scale, -torch.sin(a) * scale
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) * scale, torch.cos(a) * scale
        grid = F.affine_grid(theta, [len(angles_deg), x.shape[1], crop, crop], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def sampling_pool(pool: FramePool, device: str, crop: int, rotate_degrees: float) -> FramePool:
    """The pool training draws crops from: on CUDA the crops are drawn on the GPU
    (:class:`DeviceFramePool`, the same sampling rules), elsewhere ``pool`` itself."""
    if str(device).startswith("cuda") and type(pool) is FramePool:
        return DeviceFramePool.from_pool(pool, device, crop, rotate_degrees)
    return pool


def _to_unit(frame: np.ndarray) -> np.ndarray:
    f = frame.astype(np.float32)
    lo, hi = float(f.min()), float(f.max())
    return (f - lo) / (hi - lo)


def _rotate_center_crop(x, angles_deg: np.ndarray, crop: int):
    import torch
    import torch.nn.functional as F

    size = x.shape[-1]
    theta = torch.zeros(len(angles_deg), 2, 3)
    a = torch.from_numpy(np.radians(angles_deg)).float()
    scale = crop / size
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a) * scale, -torch.sin(a) * scale
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a) * scale, torch.cos(a) * scale
    grid = F.affine_grid(theta, [len(angles_deg), x.shape[1], crop, crop], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------- training

@dataclass
class TrainState:
    step: int = 0
    elapsed_s: float = 0.0
    last_loss: Dict[str, float] = field(default_factory=dict)


def build_net(cfg: TrainConfig):
    from .network import Speckle2SelfNet
    return Speckle2SelfNet(cfg.width, len(cfg.scales), cfg.upsample, cfg.shared_encoder, cfg.depth, cfg.head)


def _amp_dtype(device: str):
    import torch
    from .inference import cpu_has_native_bf16
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPUs without native bf16 (AVX2 only) autocast emulates it and is slower than fp32.
    return torch.bfloat16 if cpu_has_native_bf16() else None


def config_from_model(model_path, scales: Optional[Sequence[float]] = None, head: Optional[str] = None,
                      **overrides) -> TrainConfig:
    """A TrainConfig whose architecture matches an exported model (for fine-tuning it).

    ``scales`` and ``head`` replace the model's when given: every scale's encoder starts from the
    model's full-resolution one anyway, and a new head's parameters start fresh while everything
    before it comes from the model. The loss is the caller's (TrainConfig's defaults: the
    paper's), not the model's own: adapting v4 to a bone sequence for 8 minutes with v4's
    edge-aware consistency gained homogeneity +0.001 and CNR +0.08, with the paper's loss +0.032
    and +0.88 (``benchmarks/adaptation.py --minutes 8``; docs/methodology.md)."""
    from .models import load_model

    meta = load_model(model_path).metadata
    arch = dict(width=int(meta["width"]), scales=list(scales or meta["scales"]),
                interpolation=meta["interpolation"],
                upsample=meta.get("upsample", "transposed"), shared_encoder=bool(meta.get("shared_encoder", False)),
                depth=int(meta.get("depth", 4)), head=head or meta.get("head", "linear"),
                working_scale=float(meta.get("working_scale", 1.0)))
    return TrainConfig(**{**overrides, **arch})


def init_from_model(net, model_path) -> bool:
    """Start every encoder and the decoder from an exported model's weights.

    An exported model holds only the full-resolution encoder; the other scales' encoders
    start as copies of it, which is far closer to their optimum than random weights.
    Returns True when the model's head differs (its norm is dropped, or this network's starts
    fresh; see :func:`calibrate_head`).
    """
    from .models import load_model

    state = load_model(model_path).module.state_dict()
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    dec = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
    for encoder in net.encoders:
        try:
            encoder.load_state_dict(enc)
        except RuntimeError as err:       # shapes or layers differ: another width or depth
            raise ValueError(f"{model_path}: its encoder does not match this network "
                             f"({str(err).splitlines()[-1].strip()})") from err
    missing, unexpected = net.decoder.load_state_dict(dec, strict=False)
    # Layers after the decoder's last conv are the head's norm; where the heads differ, the
    # model's norm is dropped or this network's starts fresh.
    after_last_conv = _last_conv_index(net.decoder.layers) + 1
    off_head = [k for k in list(missing) + list(unexpected) if int(k.split(".")[1]) < after_last_conv]
    if off_head:
        raise ValueError(f"{model_path}: its decoder does not match this network "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return bool(missing or unexpected)


def _last_conv_index(layers) -> int:
    import torch

    convs = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    return max(i for i, layer in enumerate(layers) if isinstance(layer, convs))


def calibrate_head(net, full_views) -> Optional[Dict[str, float]]:
    """Start a fresh output head at the grey levels of the views.

    A fresh InstanceNorm scale 1 and shift 0 give a unit-variance output, while the views lie in
    [0, 1]: fine-tuning v2 with a new head kept the reconstruction MSE near 0.12 for the first
    400 steps (0.005 with the model's own head). A linear head that replaces a norm head gets a
    last conv trained to feed an InstanceNorm, whose raw output has arbitrary grey levels. Either
    way the head's scale and shift start at the least-squares map from what it scales (the
    normalised output; the last conv's output) to the full-resolution view of a sample batch.
    Returns the values set, or None for heads without a learned scale (norm_relu).
    """
    import torch

    layers = net.decoder.layers
    with torch.no_grad():
        if net.head == "linear":
            conv = layers[_last_conv_index(layers)]
            scale, shift = _least_squares_map(net.decoder(net.encoder_for(0)(full_views)), full_views)
            conv.weight.mul_(scale)
            conv.bias.mul_(scale).add_(shift)
        else:
            norm = layers[-2]
            if not (isinstance(norm, torch.nn.InstanceNorm2d) and norm.affine):
                return None
            z = torch.nn.functional.instance_norm(layers[:-2](net.encoder_for(0)(full_views)).float())
            scale, shift = _least_squares_map(z, full_views)
            norm.weight.fill_(scale)
            norm.bias.fill_(shift)
    return {"head_scale": round(scale, 5), "head_shift": round(shift, 5)}


def _least_squares_map(x, target) -> Tuple[float, float]:
    """Scale and shift minimising the mean squared difference of ``scale * x + shift`` to ``target``."""
    x, target = x.float(), target.float()
    centred = x - x.mean()
    scale = float((centred * (target - target.mean())).mean() / centred.pow(2).mean().clamp_min(1e-12))
    return scale, float(target.mean() - scale * x.mean())


def train(cfg: TrainConfig, pool: FramePool, out_path, resume: Optional[str] = None,
          progress: bool = True, on_step: Optional[Callable[[TrainState], None]] = None,
          init_model: Optional[str] = None, should_stop: Optional[Callable[[], bool]] = None,
          keep_best: bool = False, sampler: str = "auto"):
    """Train, checkpoint next to ``out_path`` and export a TorchScript model there.

    ``init_model`` fine-tunes an exported model (its architecture must match ``cfg``:
    use :func:`config_from_model`). Returns (net, state). The checkpoint ``<out>.ckpt``
    can be passed back as ``resume``. ``should_stop`` is asked after each step; when it
    returns True the run ends there (checkpoint and export as at the end). ``keep_best``
    exports the weights of the step with the lowest smoothed loss (:class:`BestWeights`)
    instead of the last ones; the checkpoint keeps the last ones, for resuming.

    On CUDA the crops are drawn on the GPU (:class:`DeviceFramePool`; ``sampler="host"`` keeps
    ``FramePool.sample``). Under torchrun (WORLD_SIZE > 1; Speckle2SelfLib.engine.distributed) every process trains
    its own crops through DistributedDataParallel and rank 0 alone writes checkpoints,
    previews and the model; every rank returns the same weights.
    """
    from . import distributed

    ctx = distributed.from_environment(cfg.device)
    try:
        return _train(cfg, pool, out_path, resume, progress, on_step, init_model, should_stop, keep_best, ctx,
                      sampler)
    finally:
        ctx.close()


def _rank_rng(cfg: TrainConfig, ctx, step: int, resumed: Optional[np.random.Generator]) -> np.random.Generator:
    """Rank 0 draws the single-process crop stream; rank r > 0 its own, seeded by (seed, rank)
    and, after a resume, by (seed, step, rank)."""
    if ctx.rank == 0:
        return resumed if resumed is not None else np.random.default_rng(cfg.seed)
    return np.random.default_rng([cfg.seed, step, ctx.rank] if resumed is not None else [cfg.seed, ctx.rank])


def _train(cfg: TrainConfig, pool: FramePool, out_path, resume, progress, on_step, init_model, should_stop,
           keep_best, ctx, sampler: str = "auto"):
    import torch
    from .inference import pick_device
    from .models import export_model

    out_path = Path(out_path)
    pool.check_crop(cfg.crop, cfg.working_scale)
    device = ctx.device(pick_device(cfg.device))
    if sampler == "auto":       # CUDA: crops drawn on the GPU; "host": FramePool.sample on the CPU
        pool = sampling_pool(pool, device, cfg.crop, cfg.rotate_degrees)
    torch.manual_seed(cfg.seed)
    rng = _rank_rng(cfg, ctx, 0, None)
    net = build_net(cfg).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    state = TrainState()
    fresh_head = bool(init_model) and not resume and init_from_model(net, init_model)
    # the output the starting model recommends, read now (the file may be gone when training
    # ends) and kept in every checkpoint, so a resumed or exported run recommends it too
    recommended = starting_recommendation(init_model) if init_model and not resume else {}
    started_from = model_record(init_model) if init_model and not resume else None
    if resume:
        rng, recommended, started_from = _load_checkpoint(resume, net, opt, state, device)
        rng = _rank_rng(cfg, ctx, state.step, rng)
    pool.prepare_views(cfg.scales, cfg.interpolation, cfg.working_scale)
    if fresh_head:   # own random stream: the training samples stay those of the seed
        sample = pool.sample(np.random.default_rng(cfg.seed + 1), max(cfg.batch, 8), cfg.crop, 0.0)
        calibrated = calibrate_head(net, sample[0].to(device))
        if calibrated:
            pool.summary.update(calibrated)
    amp = _amp_dtype(device) if cfg.amp else None
    if amp is not None:
        net = net.to(memory_format=torch.channels_last)
    pool.summary.setdefault("view_difference", pool.view_difference(cfg.working_scale))
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    loss_cfg = cfg.loss_config()
    coarsest = min(range(len(cfg.scales)), key=lambda k: cfg.scales[k])
    total_steps = _total_steps(cfg, len(pool))
    bar = _progress_bar(progress and ctx.is_main, total_steps, state.step)
    ckpt_path = out_path.with_suffix(".ckpt")
    t0 = time.monotonic() - state.elapsed_s
    best = BestWeights() if keep_best and ctx.is_main else None
    stopped = False
    net.train()
    model = ctx.wrap(net, device)       # DistributedDataParallel under torchrun, else the net itself
    ask_stop = should_stop
    while not _done(cfg, state, total_steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, state, total_steps)
        views = [v.to(device) for v in pool.sample(rng, cfg.batch, cfg.crop, cfg.augment_prob, cfg.rotate_degrees)]
        if amp is not None:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
            outputs = model(views)
            losses = speckle2self_loss([o.float() for o in outputs], views, loss_cfg, coarsest)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(losses["total"]).backward()
            scaler.step(opt)
            scaler.update()
        else:
            losses["total"].backward()
            opt.step()
        state.step += 1
        state.elapsed_s = time.monotonic() - t0
        state.last_loss = {k: float(v.detach()) for k, v in losses.items()}
        if ctx.active:      # the ranks' mean loss, rank 0's clock, and one decision to stop for all
            keys = sorted(state.last_loss)
            means, stop_now, state.elapsed_s = ctx.agree([state.last_loss[k] for k in keys],
                                                         ask_stop is not None and ask_stop(), state.elapsed_s)
            state.last_loss = dict(zip(keys, means))
            should_stop = _always if stop_now else None
        if not math.isfinite(state.last_loss["total"]):
            raise FloatingPointError(f"loss became {state.last_loss['total']} at step {state.step}; "
                                     "lower the learning rate or disable AMP (--no-amp)")
        if best is not None:
            best.update(net, state)
        _update_bar(bar, state)
        if state.step % cfg.checkpoint_every == 0 and ctx.is_main:
            save_checkpoint(ckpt_path, net, opt, state, cfg, pool.summary, recommended, started_from)
        if cfg.preview_every and state.step % cfg.preview_every == 0 and ctx.is_main:
            write_preview(net, pool, out_path.with_suffix(".preview.png"))
        if on_step is not None:
            on_step(state)
        if should_stop is not None and should_stop():
            stopped = True
            break
    if bar is not None:
        bar.close()
    if not ctx.is_main:
        ctx.barrier()           # rank 0 writes the checkpoint and the model
        return net, state
    save_checkpoint(ckpt_path, net, opt, state, cfg, pool.summary, recommended, started_from)
    summary = training_summary(cfg, pool, state, device)
    if ctx.active:
        summary["processes"] = ctx.world_size
        summary["global_batch"] = cfg.batch * ctx.world_size
    summary["amp"] = amp is not None        # what ran: CPUs without native bf16 train in fp32 even when asked
    if started_from:
        summary["started_from"] = started_from
    if stopped:
        summary["stopped_early"] = True
    if best is not None:
        summary.update(best.restore(net))
    export_model(net, out_path, scales=cfg.scales, interpolation=cfg.interpolation, name=cfg.name,
                 training=summary, extra={**_grain_metadata(cfg, pool.summary), **recommended})
    ctx.barrier()
    return net, state


def _always() -> bool:
    return True


class BestWeights:
    """The weights of the step with the lowest smoothed total loss seen so far.

    Single-batch losses of random crops are noisy, so the loss is smoothed (exponential
    moving average over about ``1 / alpha`` steps) before steps are compared.
    """

    def __init__(self, alpha: float = 0.1):
        self.alpha = alpha
        self.smoothed: Optional[float] = None
        self.best_loss = math.inf
        self.best_step = 0
        self.weights: Optional[Dict] = None

    def update(self, net, state: TrainState) -> None:
        loss = state.last_loss["total"]
        self.smoothed = loss if self.smoothed is None else (1 - self.alpha) * self.smoothed + self.alpha * loss
        if self.smoothed < self.best_loss:
            self.best_loss, self.best_step = self.smoothed, state.step
            self.weights = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def restore(self, net) -> Dict:
        """Load the best weights into ``net``; returns what the model metadata records."""
        if self.weights is None:
            return {}
        net.load_state_dict(self.weights)
        return {"best_step": self.best_step, "best_smoothed_loss": round(self.best_loss, 6)}


def _grain_metadata(cfg: TrainConfig, data: Dict) -> Dict:
    """What inference needs to give new frames the training data's grain."""
    return {"working_scale": cfg.working_scale, "working_view_difference": data.get("view_difference")}


def learning_rate(cfg: TrainConfig, state: TrainState, total_steps: Optional[int]) -> float:
    """The paper's constant rate, or linear warm-up then cosine decay to 5% over the budget
    (steps, or wall-clock minutes when the run is timed)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if state.step < cfg.warmup_steps:
        return cfg.lr * (state.step + 1) / cfg.warmup_steps
    if total_steps is not None:
        progress = state.step / max(1, total_steps)
    else:
        progress = state.elapsed_s / (60.0 * cfg.minutes)
    progress = min(1.0, max(0.0, progress))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _total_steps(cfg: TrainConfig, n_frames: int) -> Optional[int]:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.epochs is not None:
        # One epoch = as many crops as there are frames.
        return max(1, math.ceil(cfg.epochs * n_frames / cfg.batch))
    return None


def _done(cfg: TrainConfig, state: TrainState, total_steps: Optional[int]) -> bool:
    if total_steps is not None and state.step >= total_steps:
        return True
    return cfg.minutes is not None and state.elapsed_s >= cfg.minutes * 60


def _progress_bar(enabled: bool, total: Optional[int], initial: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _update_bar(bar, state: TrainState) -> None:
    if bar is None:
        return
    bar.update(1)
    if state.step % 10 == 0:
        bar.set_postfix(loss=f"{state.last_loss['total']:.4f}",
                        rec=f"{state.last_loss['reconstruction']:.4f}",
                        cons=f"{state.last_loss['consistency']:.4f}", refresh=False)


def training_summary(cfg: TrainConfig, pool: FramePool, state: TrainState, device: str) -> Dict:
    summary = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every", "preview_every")}
    summary.update(steps_done=state.step, minutes_done=round(state.elapsed_s / 60, 2), device_used=device,
                   final_loss=state.last_loss, data=pool.summary)
    summary["scales"], summary["betas"] = list(cfg.scales), list(cfg.betas)
    return summary


# ----------------------------------------------------------------------------- checkpoints

def starting_recommendation(init_model) -> Dict:
    """The refinement the model a run fine-tunes recommends (metadata "refine", ...): a model
    fine-tuned from it recommends the same output (adapting the bundled default must keep its guided smoothing)."""
    from .models import read_metadata
    from .refine import recommendation

    return recommendation(read_metadata(init_model))


def model_record(model_path) -> Dict:
    """Which model a run started from: name, file and checksums (kept in its checkpoint and
    metadata, so a fine-tuned model says what it was fine-tuned from)."""
    from .models import file_sha256, read_metadata

    meta = read_metadata(model_path)
    return {"name": meta.get("name"), "file": Path(model_path).name, "sha256": file_sha256(model_path),
            "weights_sha256": meta.get("weights_sha256")}


def save_checkpoint(path, net, opt, state: TrainState, cfg: TrainConfig, data: Optional[Dict] = None,
                    recommendation: Optional[Dict] = None, started_from: Optional[Dict] = None) -> None:
    import torch

    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": state.step,
                "elapsed_s": state.elapsed_s, "config": _plain(asdict(cfg)), "data": data or {},
                "recommendation": recommendation or {}, "started_from": started_from or {}}, tmp)
    tmp.replace(path)   # an interrupted save never clobbers the last good checkpoint


def _plain(cfg: Dict) -> Dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def load_checkpoint_config(path) -> TrainConfig:
    import torch
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return TrainConfig(**ckpt["config"])


def _load_checkpoint(path, net, opt, state: TrainState, device: str) -> Tuple[np.random.Generator, Dict, Dict]:
    """Restore a run; returns its random stream, the output its starting model recommended and
    that model's record (:func:`model_record`; empty for a run from scratch)."""
    import torch

    # weights_only: a checkpoint holds tensors and plain values; nothing is unpickled as code.
    ckpt = torch.load(path, map_location=device, weights_only=True)
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    state.step, state.elapsed_s = int(ckpt["step"]), float(ckpt["elapsed_s"])
    # Continue the crop sequence instead of replaying the first crops again.
    return (np.random.default_rng([int(ckpt["config"]["seed"]), state.step]), dict(ckpt.get("recommendation") or {}),
            dict(ckpt.get("started_from") or {}))


def export_checkpoint(ckpt_path, out_path, name: Optional[str] = None, extra: Optional[Dict] = None) -> Dict:
    """Export a checkpoint (e.g. from an interrupted run) as a TorchScript model.

    The model recommends the output the run's starting model recommended, unless ``extra``
    gives another "refine" (``speckle2self export --refine ...``); ``--refine guided`` on a run
    that inherited the guided smoothing keeps the inherited settings it does not set itself."""
    import torch
    from .models import export_model
    from .refine import overridden, recommendation

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = TrainConfig(**ckpt["config"])
    net = build_net(cfg)
    net.load_state_dict(ckpt["model"])
    summary = _plain(asdict(cfg))
    summary.update(steps_done=int(ckpt["step"]), minutes_done=round(float(ckpt["elapsed_s"]) / 60, 2),
                   data=ckpt.get("data", {}))
    if ckpt.get("started_from"):
        summary["started_from"] = ckpt["started_from"]
    extra = dict(extra or {})
    extra.update(overridden(ckpt.get("recommendation") or {}, recommendation(extra)))
    return export_model(net, out_path, scales=cfg.scales, interpolation=cfg.interpolation,
                        name=name or cfg.name, training=summary,
                        extra={**_grain_metadata(cfg, ckpt.get("data", {})), **extra})


# ----------------------------------------------------------------------------- preview

def write_preview(net, pool: FramePool, path, size: int = 512) -> None:
    """Save "input | output" for the first frame (centre crop) so progress can be seen."""
    import torch
    from PIL import Image

    from .inference import NORMALISED_HEADS, fit_grey_levels

    frame = pool.frames[0]
    h, w = frame.shape
    r, c = max(0, (h - size) // 2), max(0, (w - size) // 2)
    patch = frame[r:r + size, c:c + size]
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    with torch.inference_mode():
        x = minmax_normalise(torch.from_numpy(np.ascontiguousarray(patch))[None, None].to(device))
        y = net.inference_module()(x)[0, 0].float().cpu().numpy()
    net.train(was_training)
    if net.head in NORMALISED_HEADS:     # as the engine shows it (grey_levels="auto")
        y = fit_grey_levels(y, x[0, 0].float().cpu().numpy()).astype(np.float32)
    side = np.concatenate([patch, np.ones((patch.shape[0], 4), np.float32), y], axis=1)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    Image.fromarray(np.round(np.clip(side, 0, 1) * 255).astype(np.uint8)).save(tmp, format="PNG")
    tmp.replace(path)        # a viewer (or the module's preview) never reads a half-written PNG
