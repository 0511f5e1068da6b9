"""Inference engine: numpy in, numpy out, batched, on the GPU when there is one.

Each 2D frame is min-max normalised on its own, passed through the full-resolution
encoder + decoder, and mapped back to the frame's own intensity range and dtype.
Only one batch at a time lives on the device, so memory stays bounded for long cine loops.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, List, Optional, Union

import numpy as np

from .models import LoadedModel, load_model, resolve_model_path

MIN_SIDE = 8           # smaller frames carry no speckle statistics worth filtering
CPU_BATCH = 4          # CPU throughput barely changes above this; small batches keep Cancel responsive
MAX_AUTO_BATCH = 256

CancelFlag = Union[Callable[[], bool], "threading.Event", None]  # noqa: F821
ProgressFn = Optional[Callable[[int, int], None]]


class Cancelled(RuntimeError):
    """Raised when the cancel flag was set; no partial result is returned."""


def pick_device(device: str = "auto") -> str:
    """'auto' -> cuda, then mps, then cpu. Explicit names are checked for availability."""
    import torch

    device = (device or "auto").lower()
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    return device


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
    if array.dtype.kind not in "uif":
        raise TypeError(f"unsupported dtype {array.dtype}; pass integer or floating-point intensities")
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] >= MIN_SIDE:
        raise ValueError(f"shape {array.shape} looks like an RGB(A) image; convert it to grey first "
                         "(Speckle2SelfLib.imageio.to_luminance) or pass frames as (N, H, W)")
    if array.ndim not in (2, 3):
        raise ValueError(f"expected a 2D image (H, W) or a stack of frames (N, H, W), got {array.ndim}D "
                         f"shape {array.shape}; split 4D/5D data into 3D stacks")
    frames = array[None] if array.ndim == 2 else array
    if min(frames.shape[1:]) < MIN_SIDE:
        raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} pixels are too small; "
                         f"at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if frames.dtype.kind == "f" and not np.isfinite(frames).all():
        raise ValueError("image contains NaN or infinite values; replace them (e.g. np.nan_to_num) first")
    return frames


def _restore(out01: np.ndarray, frame: np.ndarray, gamma: Optional[float], blend: float) -> np.ndarray:
    """Map a [0, 1] network output back to the frame's range and dtype."""
    lo, hi = float(frame.min()), float(frame.max())
    if hi <= lo:
        return frame.copy()      # a constant frame has no speckle
    y = out01.astype(np.float64)
    if gamma is not None and gamma != 1.0:
        y = np.power(y, gamma)
    if blend > 0:
        y = (1.0 - blend) * y + blend * (frame.astype(np.float64) - lo) / (hi - lo)
    y = y * (hi - lo) + lo
    if frame.dtype.kind in "ui":
        y = np.clip(np.rint(y), lo, hi)
    return y.astype(frame.dtype)


class Despeckler:
    """A loaded model bound to a device. Thread-safe for one call at a time."""

    def __init__(self, loaded: LoadedModel, device: str = "auto"):
        self.loaded = loaded
        self.device = pick_device(device)
        self.module = loaded.module.to(self.device)
        if self.device.startswith("cuda"):
            import torch
            self.module = self.module.to(memory_format=torch.channels_last)

    @classmethod
    def from_file(cls, path=None, device: str = "auto") -> "Despeckler":
        """Load a model file (None: the bundled default model)."""
        return cls(load_model(resolve_model_path(path), device="cpu"), device)

    @property
    def metadata(self) -> dict:
        return self.loaded.metadata

    # ------------------------------------------------------------------ public API
    def denoise(self, array, batch_size: Optional[int] = None, progress: ProgressFn = None,
                cancel: CancelFlag = None, gamma: Optional[float] = None, blend: float = 0.0):
        """Despeckle (H, W), (N, H, W) or an iterable of (H, W) frames.

        Returns the same shape and dtype in each frame's own intensity range. Raises
        Cancelled when ``cancel`` is set between batches (no partial result).
        """
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must lie in [0, 1], got {blend}")
        if gamma is not None and gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        if not isinstance(array, np.ndarray):
            return self._denoise_iterable(array, batch_size, progress, cancel, gamma, blend)
        frames = check_frames(array)
        out = np.empty_like(frames)
        total = len(frames)
        batch = self._batch_size(batch_size, frames.shape[1:])
        done = 0
        while done < total:
            if _is_cancelled(cancel):
                raise Cancelled("despeckling cancelled")
            chunk = frames[done:done + batch]
            results, batch = self._run_batch(chunk, batch)
            for i, (res, frame) in enumerate(zip(results, chunk)):
                out[done + i] = _restore(res, frame, gamma, blend)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        return out[0] if array.ndim == 2 else out

    def _denoise_iterable(self, frames: Iterable, batch_size, progress, cancel, gamma, blend) -> List[np.ndarray]:
        total = len(frames) if hasattr(frames, "__len__") else -1
        outputs: List[np.ndarray] = []
        pending: List[np.ndarray] = []

        def flush():
            stack = np.stack(pending)
            outputs.extend(self.denoise(stack, batch_size, None, cancel, gamma, blend))
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
        return outputs

    # ------------------------------------------------------------------ internals
    def _batch_size(self, requested: Optional[int], hw) -> int:
        if requested is not None:
            if requested < 1:
                raise ValueError(f"batch size must be at least 1, got {requested}")
            return int(requested)
        if not self.device.startswith("cuda"):
            return CPU_BATCH
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

        x = torch.from_numpy(chunk.astype(np.float32, copy=False)).unsqueeze(1)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        span = x.amax(dim=(1, 2, 3), keepdim=True) - lo
        x = torch.where(span > 0, (x - lo) / span.clamp_min(1e-12), torch.zeros_like(x))
        cuda = self.device.startswith("cuda")
        x = x.to(self.device, non_blocking=cuda)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if cuda:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                with torch.autocast("cuda", dtype=dtype):
                    y = self.module(x)
            else:
                y = self.module(x)
        return y.float().squeeze(1).cpu().numpy()


def despeckle(array, model=None, device: str = "auto", **kwargs):
    """One-call convenience: ``despeckle(img)`` with the bundled default model."""
    return Despeckler.from_file(model, device).denoise(array, **kwargs)
