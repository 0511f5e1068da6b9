"""Inference engine: numpy in, numpy out, batched, on the GPU when there is one.

Each 2D frame is min-max normalised on its own, passed through the full-resolution
encoder + decoder, and mapped back to the frame's own intensity range and dtype.
Only one batch at a time lives on the device, so memory stays bounded for long cine loops.
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Callable, Iterable, List, Optional, Union

import numpy as np

from .device import (CPU_BATCH, TILE_ABOVE_BYTES, UNTILED_BYTES_PER_PIXEL_CHANNEL, DeviceUnavailable,  # noqa: F401
                     cpu_has_native_bf16, pick_device)
from .models import LoadedModel, load_model, resolve_model_path
from .refine import check_refine, guided_filter, guided_smoothing, model_settings, recommended_mode
from .refine import settings_for as guided_settings

MIN_SIDE = 8           # smaller frames carry no speckle statistics worth filtering
MAX_AUTO_BATCH = 256
#: Output grey levels: "input" fits them to the input's (see :func:`fit_grey_levels`),
#: "network" keeps the network's own, "auto" fits for models whose head ends in an InstanceNorm.
GREY_LEVELS = ("auto", "input", "network")
NORMALISED_HEADS = ("norm_relu", "norm_leaky")

CancelFlag = Union[Callable[[], bool], threading.Event, None]
ProgressFn = Optional[Callable[[int, int], None]]


class Cancelled(RuntimeError):
    """Raised when the cancel flag was set; no partial result is returned."""


def _is_cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set() if is_set is not None else cancel())


def check_frames(array: np.ndarray) -> np.ndarray:
    """Validate an (H, W) or (N, H, W) array; returns it as (N, H, W) (a view, never a copy)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(array).__name__}")
    if array.size == 0:
        raise ValueError(f"empty image (shape {array.shape}); nothing to despeckle")
    if array.dtype.kind not in "uif" or array.dtype.itemsize > 8:
        raise TypeError(f"unsupported dtype {array.dtype}; pass integer or floating-point intensities")
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] >= MIN_SIDE:
        raise ValueError(f"shape {array.shape} looks like an RGB(A) image; convert it to grey first "
                         "(Speckle2SelfLib.fileio.imageio.to_luminance) or pass frames as (N, H, W)")
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a 2D image (H, W) or a stack of frames (N, H, W), got {array.ndim}D "
                         f"shape {array.shape}; split 4D/5D data into 3D stacks")
    frames = array[None] if array.ndim == 2 else array
    if min(frames.shape[1:]) < MIN_SIDE:
        raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} pixels are too small; "
                         f"at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if frames.dtype.kind == "f":
        bad = [k for k, frame in enumerate(frames) if not np.isfinite(frame).all()]
        if bad:
            where = f"frame {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            raise ValueError(f"image contains NaN or infinite values ({where}); replace them "
                             "(e.g. np.nan_to_num) first")
    return frames


def frame_range(frame: np.ndarray):
    """(lo, hi) of a frame as Python floats (float64: no overflow for float32 data near +/-3e38)."""
    return float(frame.min()), float(frame.max())


def is_flat(frame: np.ndarray) -> bool:
    """A frame of one value: nothing to despeckle (it is returned unchanged)."""
    lo, hi = frame_range(frame)
    return not hi > lo


#: dtypes whose values and ranges float32 arithmetic normalises exactly enough.
_FLOAT32_SAFE = (np.uint8, np.int8, np.uint16, np.int16, np.float16, np.float32)


def normalise_frame(frame: np.ndarray, out: np.ndarray) -> None:
    """Write ``frame`` min-max normalised to [0, 1] into the float32 array ``out``.

    Ranges are taken in float64: float32 data near +/-3e38 (whose span overflows float32) and
    float64 data with a range far below float32 resolution (e.g. 1e-13 around 1.0) are
    normalised correctly. A flat frame gives zeros.
    """
    lo, hi = frame_range(frame)
    span = hi - lo
    if not span > 0:
        out[...] = 0.0
        return
    if frame.dtype.type in _FLOAT32_SAFE and 1e-30 < span < 1e38:
        np.copyto(out, frame, casting="unsafe")
        out -= np.float32(lo)
        out *= np.float32(1.0 / span)
    elif np.isfinite(span):
        np.copyto(out, (frame.astype(np.float64) - lo) / span, casting="unsafe")
    else:                       # float64 data spanning more than 1.8e308: halve before subtracting
        np.copyto(out, (frame.astype(np.float64) * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5), casting="unsafe")
    np.clip(out, 0.0, 1.0, out=out)


def check_grey_levels(grey_levels) -> str:
    """``grey_levels`` if it is one of :data:`GREY_LEVELS`, else a ValueError naming them."""
    if not isinstance(grey_levels, str) or grey_levels not in GREY_LEVELS:
        raise ValueError(f"grey_levels must be one of {', '.join(GREY_LEVELS)}, got {grey_levels!r}")
    return grey_levels


def fit_grey_levels(out01: np.ndarray, frame01: np.ndarray) -> np.ndarray:
    """``out01`` under the grey-level map a * out + b (a > 0) with which it best predicts
    ``frame01`` (least squares), clipped to [0, 1]; unchanged when no such map exists.

    A despeckled image is the input without its speckle, so its best linear predictor of the
    input has the input's brightness and contrast. Output heads that end in an InstanceNorm
    (the authors' InstanceNorm + ReLU) throw both away: their raw output is contrast-stretched,
    with every grey level below the image mean shown black.
    """
    import torch

    from .refine import fit_to    # one least-squares map for both (refine.py fits per batch on the device)

    y = torch.from_numpy(np.asarray(out01, dtype=np.float64))[None, None]
    x = torch.from_numpy(np.asarray(frame01, dtype=np.float64))[None, None]
    return np.clip(fit_to(y, x)[0, 0].numpy(), 0.0, 1.0)


def _restore(out01: np.ndarray, frame: np.ndarray, gamma: Optional[float], blend: float,
             fit_levels: bool = False) -> np.ndarray:
    """Map a [0, 1] network output back to the frame's range and dtype (computed in float64);
    ``fit_levels``: first give it the frame's grey levels (:func:`fit_grey_levels`)."""
    lo, hi = frame_range(frame)
    if not hi > lo:
        return frame.copy()      # a constant frame has no speckle
    half = hi * 0.5 - lo * 0.5          # finite even where hi - lo overflows float64
    y = out01.astype(np.float64)
    if fit_levels:
        y = fit_grey_levels(y, (frame.astype(np.float64) * 0.5 - lo * 0.5) / half)
    if gamma is not None and gamma != 1.0:
        np.power(y, gamma, out=y)
    if blend > 0:
        y *= 1.0 - blend
        y += blend * (frame.astype(np.float64) * 0.5 - lo * 0.5) / half
    if np.isfinite(hi - lo):
        y *= hi - lo
        y += lo
    else:                               # lo + 2 y half, without the overflowing intermediate
        y *= half
        y = (y + lo) + y
    if frame.dtype.kind in "ui":
        np.rint(y, out=y)
    np.clip(y, lo, hi, out=y)
    return y.astype(frame.dtype)


def _map_in_grey_levels(maps01: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """(N, H, W) uncertainty maps on [0, 1] grey levels as float32 in each frame's own range
    (zero for flat frames, which are returned unchanged)."""
    out = np.empty(maps01.shape, np.float32)
    largest = float(np.finfo(np.float32).max)
    for k, (m, frame) in enumerate(zip(maps01, frames)):
        lo, hi = frame_range(frame)
        if not hi > lo:
            out[k] = 0.0
        elif (hi - lo) * float(m.max()) < largest:
            np.multiply(m, np.float32(hi - lo), out=out[k], casting="unsafe")
        else:                           # ranges near float32's limit: in float64, clipped
            out[k] = np.clip(m.astype(np.float64) * min(hi - lo, 1e308), 0.0, largest)
    return out


class Despeckler:
    """A loaded model bound to a device. Thread-safe for one call at a time."""

    def __init__(self, loaded: LoadedModel, device: str = "auto", backend: str = "auto"):
        """``backend``: auto, fp32, bf16, openvino or onnxruntime (Speckle2SelfLib.engine.backends)."""
        from .backends import select_backend

        self.loaded = loaded
        self.device = pick_device(device)
        self.last_working_scale = 1.0     # the factor the latest denoise() call ran at
        self.last_refine = "none"         # the refinement the latest denoise() call applied
        #: "grid" (the product's bilateral grid) or "direct" (the reference sum over the window),
        #: Speckle2SelfLib.engine.refine; the benchmarks compare the two.
        self.refine_method = "grid"
        self.module = loaded.module.to(self.device)
        if self.device.startswith("cuda"):
            import torch
            self.module = self.module.to(memory_format=torch.channels_last)
        self.backend, self._runner = select_backend(backend, self.device, loaded)

    @classmethod
    def from_file(cls, path=None, device: str = "auto", backend: str = "auto") -> "Despeckler":
        """Load a model file (None: the bundled default model)."""
        return cls(load_model(resolve_model_path(path), device="cpu"), device, backend)

    @property
    def metadata(self) -> dict:
        return self.loaded.metadata

    # ------------------------------------------------------------------ public API
    def denoise(self, array, batch_size: Optional[int] = None, progress: ProgressFn = None,
                cancel: CancelFlag = None, gamma: Optional[float] = None, blend: float = 0.0,
                working_scale: Union[str, float, None] = "auto", grey_levels: str = "auto",
                refine: Optional[str] = "auto", uncertainty: bool = False):
        """Despeckle (H, W), (N, H, W) or an iterable of (H, W) frames.

        Returns the same shape and dtype in each frame's own intensity range. Raises
        Cancelled when ``cancel`` is set between batches (no partial result).
        ``working_scale``: "auto" resamples the frames so their speckle grain matches the
        model's training data (one factor for the whole call); a number forces a factor;
        "off", None or 1 runs at the frames' own resolution.
        ``grey_levels``: "input" gives each output frame the brightness and contrast of its
        input frame (:func:`fit_grey_levels`), "network" keeps the network's own (the authors'
        head stretches contrast), "auto" (default) fits them where the model's head needs it.
        ``refine``: "guided" smooths the input where the network's output is uniform and only
        along boundaries where it changes (Speckle2SelfLib.engine.refine): smoother tissue with
        the input's own edges, always in the input's grey levels (``grey_levels`` "network" is
        refused with it); "none" (or None) returns the network's output itself; "auto"
        (default) does what the model's metadata recommends (:meth:`resolve_refine`).
        ``uncertainty``: also return a map of where not to trust the output, ``(output, map)``:
        float32 of the output's shape, the expected absolute error of each output pixel in the
        frame's grey levels (Speckle2SelfLib.engine.uncertainty; before ``gamma`` and ``blend``);
        an iterable gives two lists. Not computed unless asked.
        """
        refine = self.check_output_options(grey_levels, refine)
        if not isinstance(uncertainty, (bool, np.bool_)):
            raise ValueError(f"uncertainty must be True or False, got {uncertainty!r}")
        if isinstance(blend, bool) or not isinstance(blend, (int, float, np.floating, np.integer)) \
                or not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be a number in [0, 1], got {blend!r}")
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer))
                                  or not np.isfinite(gamma) or gamma <= 0):
            raise ValueError(f"gamma must be a finite positive number, got {gamma!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch size must be a whole number of at least 1, got {batch_size!r}")
        # a guided result is a weighted mean of input pixels: it already has the input's grey levels
        fit_levels = self.fits_grey_levels(grey_levels) and refine == "none"
        if not isinstance(array, np.ndarray):
            return self._denoise_iterable(array, batch_size, progress, cancel, gamma, blend, working_scale,
                                          grey_levels, refine, bool(uncertainty))
        frames = check_frames(array)
        self.last_working_scale = self.resolve_working_scale(frames, working_scale)
        self.last_refine = refine
        out = np.empty_like(frames)
        maps = np.empty(frames.shape, np.float32) if uncertainty else None
        self._uncertainty_batches = [] if uncertainty else None
        total = len(frames)
        batch = self._batch_size(batch_size, frames.shape[1:])
        done = flat = 0
        while done < total:
            if _is_cancelled(cancel):
                raise Cancelled("despeckling cancelled")
            chunk = frames[done:done + batch]
            if maps is not None:
                self._uncertainty_batches.clear()
            results, batch = self._run_batch(chunk, batch)
            if maps is not None:          # the last len(chunk) frames: a batch retried after OOM ran again
                maps[done:done + len(chunk)] = _map_in_grey_levels(
                    np.concatenate(self._uncertainty_batches)[-len(chunk):], chunk)
            if not np.isfinite(results).all():
                raise FloatingPointError(f"the model produced NaN or infinite values (frames {done}.."
                                         f"{done + len(chunk) - 1}); the model file is probably broken")
            for i, (res, frame) in enumerate(zip(results, chunk)):
                out[done + i] = _restore(res, frame, gamma, blend, fit_levels)
                if is_flat(frame):
                    flat += 1
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if flat:
            warnings.warn(f"{flat} of {total} frame(s) have a single value (flat); returned unchanged, "
                          "there is nothing to despeckle", stacklevel=2)
        self._uncertainty_batches = None
        if maps is not None:
            return (out[0], maps[0]) if array.ndim == 2 else (out, maps)
        return out[0] if array.ndim == 2 else out

    def _denoise_iterable(self, frames: Iterable, batch_size, progress, cancel, gamma, blend,
                          working_scale="auto", grey_levels: str = "auto", refine: str = "auto",
                          uncertainty: bool = False):
        total = len(frames) if hasattr(frames, "__len__") else -1
        outputs: List[np.ndarray] = []
        maps: List[np.ndarray] = []
        pending: List[np.ndarray] = []

        def flush():
            nonlocal working_scale
            stack = np.stack(pending)
            if working_scale == "auto":     # one factor for the whole stream, from its first frames
                working_scale = self.resolve_working_scale(stack, "auto")
            result = self.denoise(stack, batch_size, None, cancel, gamma, blend, working_scale, grey_levels,
                                  refine, uncertainty)
            if uncertainty:
                result, stack_maps = result
                maps.extend(stack_maps)
            outputs.extend(result)
            pending.clear()
            if progress is not None:
                progress(len(outputs), total)

        for frame in frames:
            frame = np.asarray(frame)
            if frame.ndim != 2:
                raise ValueError(f"each frame of an iterable must be 2D (H, W), got shape {frame.shape}")
            if pending and frame.shape != pending[0].shape:
                flush()
            pending.append(frame)
            if len(pending) >= (batch_size or CPU_BATCH):
                flush()
        if pending:
            flush()
        return (outputs, maps) if uncertainty else outputs

    def resolve_refine(self, refine: Optional[str] = "auto") -> str:
        """"guided" or "none": ``refine`` itself, or for "auto" the model's recommendation
        (metadata "refine"; models without one: "none"). Unknown values raise a ValueError."""
        refine = check_refine(refine)
        if refine == "auto":
            return recommended_mode(self.metadata)
        return refine

    def check_output_options(self, grey_levels: str = "auto", refine: Optional[str] = "auto") -> str:
        """The refinement :meth:`denoise` applies ("guided" or "none"); a ValueError where
        ``grey_levels`` asks for what the refinement cannot give."""
        refine = self.resolve_refine(refine)
        if check_grey_levels(grey_levels) == "network" and refine == "guided":
            raise ValueError("grey levels 'network' are the network output's own, but this model's output is its "
                             "guided refinement, which always has the input's grey levels: add refine 'none' "
                             "(CLI: --refine none) to get the network's output and its grey levels")
        return refine

    def fits_grey_levels(self, grey_levels: str = "auto") -> bool:
        """Whether :meth:`denoise` with this ``grey_levels`` fits the output's grey levels to the input's."""
        check_grey_levels(grey_levels)
        if grey_levels == "auto":
            return self.metadata.get("head") in NORMALISED_HEADS
        return grey_levels == "input"

    # ------------------------------------------------------------------ internals
    def _batch_size(self, requested: Optional[int], hw) -> int:
        if requested is not None:
            if requested < 1:
                raise ValueError(f"batch size must be at least 1, got {requested}")
            return int(requested)
        if not self.device.startswith("cuda"):
            from .backends import cpu_batch
            return cpu_batch(getattr(self, "backend", "fp32"), hw, int(self.metadata.get("width", 32)))
        import torch
        free, _total = torch.cuda.mem_get_info(torch.device(self.device))
        # Peak activation memory is dominated by the width-channel maps at 1/2 resolution,
        # about 4 live copies in fp32; the factor leaves room for the allocator.
        width = int(self.metadata.get("width", 32))
        per_frame = hw[0] * hw[1] * width * 4 * 2
        return int(max(1, min(MAX_AUTO_BATCH, 0.5 * free // per_frame)))

    def _run_batch(self, chunk: np.ndarray, batch: int):
        """Run one chunk; on CUDA out-of-memory halve the batch, finally fall back to CPU."""
        import torch

        while True:
            try:
                results = [self._forward(chunk[i:i + batch]) for i in range(0, len(chunk), batch)]
                return np.concatenate(results), batch
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch > 1:
                    batch = max(1, batch // 2)
                    continue
                warnings.warn("CUDA out of memory even for one frame; continuing on the CPU")
                self.device = "cpu"
                self.module = self.module.to("cpu", memory_format=torch.contiguous_format)

    def _forward(self, chunk: np.ndarray) -> np.ndarray:
        import torch

        normalised = np.empty((len(chunk), 1) + chunk.shape[1:], np.float32)
        for frame, target in zip(chunk, normalised):
            normalise_frame(frame, target[0])      # float64 ranges; flat frames give zeros
        x = torch.from_numpy(normalised)
        return self._apply_module(x).squeeze(1).cpu().numpy()

    def _apply_module(self, x):
        """(N, 1, H, W) float32 in [0, 1] on the CPU -> (N, 1, H, W) float32 in [0, 1] on the CPU.

        The frames are resampled to the model's working scale (where their speckle grain
        matches the training data's) and back; with refine "guided" the output then steers a
        smoothing of the input (Speckle2SelfLib.engine.refine).
        """
        import torch

        from .perturbation import resample_to_working_scale   # imports torch: lazily

        h, w = x.shape[-2:]
        small = resample_to_working_scale(x, self.last_working_scale)
        y = self._run_module_tiled(small) if self._needs_tiling(small) else self._run_module(small)
        if y.shape[-2:] != (h, w):
            y = torch.nn.functional.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        y = y.clamp(0.0, 1.0)
        if getattr(self, "_uncertainty_batches", None) is not None:      # asked for: denoise(uncertainty=True)
            from .uncertainty import combine, uncertainty_components
            settings = guided_settings(self.last_working_scale, **model_settings(self.metadata))
            guided = self.last_refine == "guided"
            parts = uncertainty_components(x.to(self.device), y.to(self.device), settings, guided,
                                           self.last_working_scale)
            self._uncertainty_batches.append(combine(parts)[:, 0].cpu().numpy())
            if guided and self.refine_method == "grid":
                # the statistics' weighted mean is guided_filter's output (same splat, blur and slice; to the
                # bit with one torch thread, Testing/test_uncertainty.py; within float rounding where the
                # grid splits its strips among threads): no second grid
                return parts["output"].float().cpu()
        if self.last_refine == "guided":
            settings = guided_settings(self.last_working_scale, **model_settings(self.metadata))
            smooth = guided_smoothing if self.refine_method == "direct" else guided_filter
            y = smooth(x.to(self.device), y.to(self.device), settings).float().cpu()
        return y

    def resolve_working_scale(self, frames: np.ndarray, working_scale: Union[str, float, None] = "auto") -> float:
        """The resampling factor for these (N, H, W) frames.

        "auto": where the model records the view difference it was trained at, the factor
        that gives these frames the same (Speckle2SelfLib.engine.grain); else the model's fixed
        working scale (1 for models without one).
        """
        from . import grain

        if working_scale is None or working_scale == "off":
            return 1.0
        if working_scale != "auto":
            try:
                scale = float(working_scale)
            except (TypeError, ValueError):
                scale = math.nan
            if not np.isfinite(scale) or not grain.SCALE_LIMITS[0] <= scale <= grain.SCALE_LIMITS[1]:
                raise ValueError(f"working scale must be 'auto', 'off' (or None) or a number in "
                                 f"{list(grain.SCALE_LIMITS)}, got {working_scale!r}")
            return scale
        target = self.metadata.get("working_view_difference")
        if target:
            # a model trained on enlarged frames may enlarge new ones as far (bundled ones: 1)
            largest = max(1.0, float(self.metadata.get("working_scale") or 1.0))
            return grain.match_working_scale(frames, float(target), largest)
        return float(self.metadata.get("working_scale", 1.0))

    def _run_module(self, x):
        """The network itself on (N, 1, h, w) in [0, 1]; returns float32 on the CPU."""
        import torch

        if getattr(self, "_runner", None) is not None and self.device == "cpu":
            return self._runner(x)          # bf16 / OpenVINO / ONNX Runtime (Speckle2SelfLib.engine.backends)
        cuda = self.device.startswith("cuda")
        x = x.to(self.device, non_blocking=cuda)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if cuda and getattr(self, "backend", "auto") != "fp32":
                bf16 = getattr(self, "backend", "auto") == "bf16" or torch.cuda.is_bf16_supported()
                dtype = torch.bfloat16 if bf16 else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    y = self.module(x)
            else:
                y = self.module(x)
        return y.float().cpu()


    # ------------------------------------------------------------------ bounded memory (large frames)
    def _needs_tiling(self, x) -> bool:
        """Whether the plain forward pass of (N, 1, h, w) would need more than the memory budget."""
        n, _, h, w = x.shape
        estimate = n * h * w * int(self.metadata.get("width", 32)) * UNTILED_BYTES_PER_PIXEL_CHANNEL
        if self.device.startswith("cuda"):
            import torch
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            return estimate > 0.5 * free
        return estimate > TILE_ABOVE_BYTES

    def _strip_plan(self):
        """The network as a layer-by-layer strip plan (Speckle2SelfLib.engine.tiling), or None when this
        model's structure is not one the executor reproduces exactly (checked once on a probe)."""
        if not hasattr(self, "_plan"):
            from .tiling import UnsupportedNetwork, build_plan, self_check
            try:
                self._plan = build_plan(self.module)
                self_check(self.module, self._plan)
            except UnsupportedNetwork as err:
                warnings.warn(f"large frames run untiled with this model ({err}); memory is not bounded")
                self._plan = None
        return self._plan

    def _run_module_tiled(self, x):
        """Like _run_module, one frame at a time with bounded memory: every InstanceNorm over the
        whole frame, the convolutions between them in strips with halos (equal to the plain pass
        up to float rounding, no seams)."""
        from .tiling import run_plan

        plan = self._strip_plan()
        if plan is None:
            return self._run_module(x)
        return run_plan(plan, x.to(self.device)).float().cpu()
