"""Adapt a model to the user's scanner: self-supervised fine-tuning on the user's own images.

The method needs no clean images, so the volumes and cine sequences already loaded in the
scene are enough. :mod:`Speckle2SelfLib.scene.adapt` reads them on the main thread into an
:class:`AdaptData` (numpy frames and what they came from; this module never touches MRML);
the fine-tuning itself (:func:`Speckle2SelfLib.engine.training.train`, starting from the
chosen model) runs in a background thread (:class:`AdaptJob`) that reports progress, the
loss terms, a loss plot and an "input | output" preview of one frame, and can be stopped at
any step: the weights with the lowest smoothed loss so far are kept. The result is a
TorchScript model with full metadata (``adaptation``: source nodes, frame counts, spacing;
the starting model and its checksum; steps, device, time) written to the user models folder
(:mod:`Speckle2SelfLib.engine.user_models`) and registered there with its checksum.

Guard rails (:attr:`AdaptJob.warnings`): too few frames; images mostly black, or with static
or coloured overlays; a loss that indicates copying (output = input) or collapse (flat output).
The console API (``adapt``, ``start_adaptation`` on scene nodes) is in :mod:`Speckle2SelfLib.scene.adapt`.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..jobstate import JobState

#: Fewer usable frames than this gives a warning (the net may learn them by heart).
MIN_FRAMES = 10
#: A pixel is "dark" at or below this fraction of its node's intensity range.
DARK_LEVEL = 0.02
#: Warn when more than this share of the (content-cropped) pixels is dark.
MOSTLY_DARK = 0.6
#: Warn when more than this share of the bright pixels never changes between frames (overlays).
STATIC_OVERLAY = 0.1
#: Warn when more than this share of an RGB node's pixels is coloured (Doppler, annotations).
COLOUR_OVERLAY = 0.05
#: A row or column belongs to the image content when this share of it is not dark in some frame.
CONTENT_SHARE = 0.05

# Loss diagnosis: the smoothed loss terms compared with those of the two trivial solutions
# (output = input: reconstruction 0, consistency high; flat output: the reverse).
COPY_RECONSTRUCTION = 0.05      # reconstruction below this share of the flat solution's ...
COPY_CONSISTENCY = 0.7          # ... and consistency above this share of the copy's: copying
COLLAPSE_CONSISTENCY = 0.05     # consistency below this share of the copy's ...
COLLAPSE_RECONSTRUCTION = 0.7   # ... and reconstruction above this share of the flat one's: collapse
# Output diagnosis on the preview frame.
COPY_TEXTURE = 0.9              # fine texture (speckle) of the output / input above this: copying
COLLAPSE_CONTRAST = 0.1         # output std / input std below this: collapse
DIAGNOSE_AFTER = 20             # steps before the loss is judged (the smoothing needs some)


class AdaptationStopped(RuntimeError):
    """The run was stopped before its first step: no model was written."""


# ----------------------------------------------------------------------------- the frames

@dataclass
class AdaptData:
    """Training frames read from scene nodes, what they came from, and warnings about them."""

    frames: List[np.ndarray]                 # float32 [0, 1] 2D frames, cropped to the image content
    nodes: List[Dict[str, Any]]              # per node: name, class, frames, size, spacing, ...
    warnings: List[str] = field(default_factory=list)

    @property
    def summary(self) -> Dict[str, Any]:
        """What the model's ``training.data`` metadata records."""
        return {"source": "3D Slicer scene nodes", "nodes": [dict(n) for n in self.nodes],
                "frames": len(self.frames), "files": 0}


def prepare_node_frames(grey: np.ndarray, colour_share: Optional[float], crop_to_content: bool):
    """Crop a node's (N, H, W) frames to their content, normalise each to [0, 1]; and measure
    what the guard rails look at (dark share, static overlays; ``colour_share``, the share of
    coloured pixels of an RGB node, None for grey, is passed on)."""
    lo, hi = float(grey.min()), float(grey.max())
    span = hi - lo if hi > lo else 1.0
    bright = grey > lo + DARK_LEVEL * span
    rows, cols = slice(None), slice(None)
    if crop_to_content:
        ever = bright.any(axis=0)
        r = np.flatnonzero(ever.mean(axis=1) >= CONTENT_SHARE)
        c = np.flatnonzero(ever.mean(axis=0) >= CONTENT_SHARE)
        if len(r) and len(c) and r[-1] - r[0] >= 31 and c[-1] - c[0] >= 31:
            rows, cols = slice(int(r[0]), int(r[-1]) + 1), slice(int(c[0]), int(c[-1]) + 1)
    content = grey[:, rows, cols]
    inside = bright[:, rows, cols]
    checks: Dict[str, Any] = {
        "content_box": [cols.start or 0, rows.start or 0, cols.stop or grey.shape[2], rows.stop or grey.shape[1]],
        "dark_share": round(1.0 - float(inside.mean()), 3),
    }
    if len(content) >= 3:
        unchanged = (content.max(axis=0) == content.min(axis=0)) & inside.all(axis=0)
        checks["static_share"] = round(float(unchanged.sum()) / max(1, int(inside.any(axis=0).sum())), 3)
    if colour_share is not None:
        checks["colour_share"] = round(float(colour_share), 3)
    frames = []
    for frame in content:
        f_lo, f_hi = float(frame.min()), float(frame.max())
        if f_hi > f_lo and min(frame.shape) >= 32:
            frames.append(((frame - f_lo) / (f_hi - f_lo)).astype(np.float32))
    return frames, checks


def node_warnings(info: Dict[str, Any]) -> List[str]:
    name, out = info["name"], []
    if info["frames_used"] < info["frames"]:
        out.append(f"'{name}': {info['frames'] - info['frames_used']} of {info['frames']} frame(s) skipped "
                   "(flat or smaller than 32 pixels)")
    if info["dark_share"] > MOSTLY_DARK:
        out.append(f"'{name}': {info['dark_share']:.0%} of the image is black: few crops show tissue, so "
                   "adaptation learns little; choose images that show more tissue")
    if info.get("static_share", 0.0) > STATIC_OVERLAY:
        out.append(f"'{name}': {info['static_share']:.0%} of the bright pixels never change between frames: "
                   "text, rulers or icons overlaid on the image? The model would learn them as anatomy; "
                   "use the raw image stream (without overlays) if you can")
    if info.get("colour_share", 0.0) > COLOUR_OVERLAY:
        out.append(f"'{name}': {info['colour_share']:.0%} of the pixels are coloured (Doppler or annotation "
                   "overlays); they are trained on as grey levels")
    return out


# ----------------------------------------------------------------------------- loss and output checks

def trivial_losses(pool, cfg, seed: int = 12345) -> Dict[str, float]:
    """Loss terms of the two trivial solutions on one batch of the pool: output = input
    (``copy_consistency``; its reconstruction is 0) and a flat output at each crop's mean
    (``flat_reconstruction``; its consistency is 0)."""
    import torch

    from .losses import LossConfig, speckle2self_loss

    pool.prepare_views(cfg.scales, cfg.interpolation, cfg.working_scale)
    views = pool.sample(np.random.default_rng(seed), max(cfg.batch, 8), cfg.crop, 0.0, 0.0)
    loss_cfg = LossConfig(cfg.reconstruction, cfg.consistency)
    with torch.no_grad():
        copy = speckle2self_loss(list(views), views, loss_cfg)
        flat = [views[0].mean(dim=(2, 3), keepdim=True).expand_as(v) for v in views]
        flat = speckle2self_loss(flat, views, loss_cfg)
    return {"copy_consistency": float(copy["consistency"]), "flat_reconstruction": float(flat["reconstruction"])}


def diagnose_losses(reconstruction: float, consistency: float, reference: Dict[str, float]) -> Optional[str]:
    """'copying' / 'collapse' message when the (smoothed) loss terms sit at a trivial solution."""
    copy_cons = reference.get("copy_consistency") or 0.0
    flat_rec = reference.get("flat_reconstruction") or 0.0
    if copy_cons <= 0 or flat_rec <= 0:
        return None
    if reconstruction < COPY_RECONSTRUCTION * flat_rec and consistency > COPY_CONSISTENCY * copy_cons:
        return ("the loss indicates copying: the outputs reproduce their inputs (speckle included); "
                "stop and try a lower learning rate or more frames")
    if consistency < COLLAPSE_CONSISTENCY * copy_cons and reconstruction > COLLAPSE_RECONSTRUCTION * flat_rec:
        return ("the loss indicates collapse: the outputs are nearly flat; stop, and check the images "
                "(mostly black?) or use a lower learning rate")
    return None


def diagnose_output(inp: np.ndarray, out: np.ndarray) -> Optional[str]:
    """'copying' / 'collapse' message from a frame and the model's output of it (both [0, 1])."""
    from scipy.ndimage import gaussian_filter

    inp = np.asarray(inp, np.float64)
    out = np.asarray(out, np.float64)
    in_std, out_std = inp.std(), out.std()
    if in_std <= 1e-6:
        return None
    if out_std < COLLAPSE_CONTRAST * in_std:
        return f"the output is nearly flat (contrast {out_std / in_std:.0%} of the input's): collapse"
    texture_in = np.std(inp - gaussian_filter(inp, 1.5))
    texture_out = np.std(out - gaussian_filter(out, 1.5))
    if texture_in > 0 and texture_out > COPY_TEXTURE * texture_in:
        return (f"the output keeps {texture_out / texture_in:.0%} of the input's fine texture: the model "
                "copies its input instead of removing speckle")
    return None


def render_loss_plot(history: Sequence[Dict[str, float]], path, size=(360, 140)) -> None:
    """A small PNG of the smoothed loss terms over the steps (total black, reconstruction blue,
    consistency orange; log scale). Written atomically (a reader never sees half a file)."""
    from PIL import Image, ImageDraw

    w, h = size
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    margin_l, margin_r, margin_t, margin_b = 4, 4, 14, 14
    keys = (("total", (0, 0, 0)), ("reconstruction", (31, 119, 180)), ("consistency", (255, 127, 14)))
    series = {k: _smooth([max(float(e.get(k, 0.0)), 1e-8) for e in history]) for k, _ in keys}
    values = [v for s in series.values() for v in s]
    steps = [int(e.get("step", i + 1)) for i, e in enumerate(history)]
    if values:
        lo, hi = math.log10(min(values)), math.log10(max(values))
        hi = hi if hi > lo else lo + 1e-3
        first, last = steps[0], max(steps[-1], steps[0] + 1)
        for key, colour in keys:
            points = [(margin_l + (s - first) / (last - first) * (w - margin_l - margin_r),
                       margin_t + (hi - math.log10(v)) / (hi - lo) * (h - margin_t - margin_b))
                      for s, v in zip(steps, series[key])]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
        draw.text((margin_l, 1), f"loss {10 ** hi:.3g}", fill=(80, 80, 80))
        draw.text((margin_l, h - margin_b + 1), f"{10 ** lo:.3g}   step {first}..{steps[-1]}", fill=(80, 80, 80))
    draw.text((w - 150, 1), "total rec cons", fill=(80, 80, 80))
    _save_atomically(image, path)


def _smooth(values: List[float], alpha: float = 0.1) -> List[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else (1 - alpha) * ema + alpha * v
        out.append(ema)
    return out


def _save_atomically(image, path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    image.save(tmp, format="PNG")
    tmp.replace(path)


# ----------------------------------------------------------------------------- the job

@dataclass
class AdaptResult:
    """A finished adaptation: the registered model file and what it records."""

    path: Path
    name: str
    sha256: str
    metadata: Dict[str, Any]
    steps: int
    stopped: bool
    warnings: List[str]


@dataclass
class AdaptProgress:
    """A consistent copy of a job's state, safe to read on any thread."""

    phase: str = "waiting"              # waiting | preparing | training | exporting | done | failed | stopped
    step: int = 0
    total_steps: Optional[int] = None
    elapsed_s: float = 0.0
    budget_s: Optional[float] = None
    loss: Dict[str, float] = field(default_factory=dict)
    history: List[Dict[str, float]] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    preview_path: Optional[Path] = None      # PNG "input | output" of one frame
    loss_plot_path: Optional[Path] = None
    version: int = 0                         # increases whenever the preview or plot is rewritten
    error: Optional[str] = None

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] by steps or by time, whichever budget ends the run first."""
        parts = []
        if self.total_steps:
            parts.append(self.step / self.total_steps)
        if self.budget_s:
            parts.append(self.elapsed_s / self.budget_s)
        return min(1.0, max(parts)) if parts else 0.0


#: Held while an adaptation names, writes and registers its model (two jobs in one process
#: would otherwise pick the same free file name).
_FINISHING = threading.Lock()


class AdaptJob:
    """Fine-tune a model on frames read from the scene, in a background thread.

    ``data``: :class:`AdaptData`, e.g. from :func:`Speckle2SelfLib.scene.adapt.frames_from_nodes` (main thread).
    ``init``: the starting model: None (the bundled default), a bundled model's name, a user
    model's name or a model file. Stops after ``minutes`` or ``steps`` (the first reached) or
    :meth:`stop`. ``crop`` (multiple of 16), ``batch``, ``lr`` (constant; 1e-3 adapted faster than
    3e-4 in 3-minute trials, docs/benchmarks.md) and ``device`` as for training. The loss is the
    paper's, whatever the starting model was trained with: adapting v4 with its own edge-aware
    consistency gained far less (see :func:`~.training.config_from_model`).
    The result is written to the user models folder (``directory``; see user_models) and
    registered there.
    """

    def __init__(self, data: AdaptData, *, init=None, minutes: Optional[float] = 10.0, steps: Optional[int] = None,
                 crop: int = 128, batch: int = 8, lr: float = 1e-3, device: str = "auto",
                 name: Optional[str] = None, directory=None, preview_every: int = 25, seed: int = 0):
        from . import user_models
        from .models import bundled_entry, read_metadata, resolve_model_path
        from .training import model_record

        if not minutes and not steps:
            raise ValueError("give a time budget (minutes) or a number of steps")
        if minutes is not None and (not math.isfinite(float(minutes)) or minutes <= 0):
            raise ValueError(f"minutes must be a positive number, got {minutes!r}")
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be at least 1, got {steps!r}")
        if int(crop) % 16 or int(crop) < 32:
            raise ValueError(f"crop must be a multiple of 16 and at least 32, got {crop}")
        self.data = data
        # a bundled model's name means that model, even if a user model was given the same name
        user = user_models.find_user_model(init, directory) if init and bundled_entry(str(init)) is None else None
        self.init_path = user.path if user is not None else resolve_model_path(None if init is None else str(init))
        self.init_metadata = read_metadata(self.init_path)
        self.init_record = model_record(self.init_path)
        self.minutes = float(minutes) if minutes else None
        self.steps = int(steps) if steps else None
        self.crop, self.batch, self.device = int(crop), int(batch), device
        self.lr = float(lr)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.preview_every, self.seed = max(1, int(preview_every)), int(seed)
        self.directory = directory
        first = data.nodes[0]["name"] if data.nodes else "scene"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.name = name or f"{user_models.slug(first)}-adapted-{stamp}"
        self.result: Optional[AdaptResult] = None
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress = AdaptProgress(warnings=list(data.warnings), total_steps=self.steps,
                                       budget_s=60 * self.minutes if self.minutes else None)
        self._thread: Optional[threading.Thread] = None
        self._work: Optional[Path] = None

    # ------------------------------------------------------------------ control
    def start(self) -> "AdaptJob":
        """Run in a daemon thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("this adaptation was already started")
        self._thread = threading.Thread(target=self._run_catching, name="Speckle2Self-adapt", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the run to end after the current step (the best weights so far are kept)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> Optional[AdaptResult]:
        """Wait for the thread; re-raises the run's error; returns the result (None on timeout)."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return None
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        """The job protocol's name for :meth:`stop` (the best weights so far are still kept)."""
        self.stop()

    def poll(self) -> JobState:
        """The job protocol (:mod:`Speckle2SelfLib.jobstate`): steps done, and how the run ended.
        Stopped after a first step still ends with a model (``finished``); stopped before one is
        ``cancelled``. The loss terms, preview and warnings are in :meth:`snapshot`."""
        snap = self.snapshot()
        if self.is_running() or self._thread is None:
            return JobState(snap.step, snap.total_steps or 0, self._thread is not None)
        if isinstance(self.error, AdaptationStopped):
            return JobState(snap.step, snap.total_steps or 0, False, cancelled=True)
        if self.error is not None:
            return JobState(snap.step, snap.total_steps or 0, False, error=self.error)
        return JobState(snap.step, snap.total_steps or 0, False, finished=True, result=self.result)

    def snapshot(self) -> AdaptProgress:
        with self._lock:
            p = self._progress
            return AdaptProgress(p.phase, p.step, p.total_steps, p.elapsed_s, p.budget_s, dict(p.loss),
                                 list(p.history), list(p.warnings), p.preview_path, p.loss_plot_path, p.version,
                                 p.error)

    @property
    def warnings(self) -> List[str]:
        return self.snapshot().warnings

    # ------------------------------------------------------------------ the run
    def run(self) -> AdaptResult:
        """The whole run on the calling thread (``start`` runs it in the background)."""
        from . import user_models

        self._work = user_models.work_directory(self.directory)
        try:
            return self._run()
        finally:
            user_models.remove_work_directory(self._work)

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as err:  # reported through snapshot() and wait()
            self.error = err
            with self._lock:
                self._progress.phase = "stopped" if isinstance(err, AdaptationStopped) else "failed"
                self._progress.error = str(err)

    def _set(self, **values) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self._progress, key, value)

    def _warn(self, message: str) -> None:
        with self._lock:
            if message not in self._progress.warnings:
                self._progress.warnings.append(message)

    def _run(self) -> AdaptResult:
        from .inference import pick_device
        from .models import read_metadata
        from .training import FramePool, config_from_model, train

        started = _dt.datetime.now(_dt.timezone.utc)
        self._set(phase="preparing")
        device = pick_device(self.device)
        cfg = config_from_model(self.init_path, crop=self.crop, batch=self.batch, lr=self.lr, steps=self.steps,
                                minutes=self.minutes, device=device, seed=self.seed, name=self.name,
                                checkpoint_every=max(50, self.preview_every), preview_every=self.preview_every)
        pool = FramePool(list(self.data.frames), self.data.summary)
        reference = trivial_losses(pool, cfg)
        if self._stop.is_set():
            raise AdaptationStopped("adaptation stopped before training started; no model was written")
        trained = self._work / "model.pt"
        self._set(phase="training")
        t0 = time.monotonic()
        smoothed: Dict[str, float] = {}

        def on_step(state) -> None:
            for key, value in state.last_loss.items():
                smoothed[key] = value if key not in smoothed else 0.9 * smoothed[key] + 0.1 * value
            entry = {"step": state.step, **{k: round(v, 6) for k, v in state.last_loss.items()}}
            with self._lock:
                self._progress.step, self._progress.elapsed_s = state.step, state.elapsed_s
                self._progress.loss = dict(state.last_loss)
                self._progress.history.append(entry)
            if state.step >= DIAGNOSE_AFTER:
                problem = diagnose_losses(smoothed["reconstruction"], smoothed["consistency"], reference)
                if problem:
                    self._warn(problem)
            if state.step % self.preview_every == 0:
                self._refresh_views(trained.with_suffix(".preview.png"))

        _net, state = train(cfg, pool, trained, progress=False, on_step=on_step, init_model=str(self.init_path),
                            should_stop=self._stop.is_set, keep_best=True)
        self._set(phase="exporting", elapsed_s=time.monotonic() - t0)
        self._refresh_views(None)
        trained_meta = read_metadata(trained)
        training = trained_meta.get("training", {})
        with _FINISHING:     # pick the file name, write and register it: one adaptation at a time
            return self._finish(_net, cfg, state, trained, trained_meta, training, device, started)

    def _finish(self, _net, cfg, state, trained, trained_meta, training, device, started) -> AdaptResult:
        from . import user_models
        from .models import export_model, load_model
        from .refine import recommendation

        final = user_models.unique_model_path(self.name, self.directory)
        adaptation = {
            "source": {"kind": "3D Slicer scene", "nodes": self.data.nodes, "frames": len(self.data.frames)},
            "initial_model": self.init_record,
            "steps": state.step, "best_step": training.get("best_step"),
            "stopped_early": bool(training.get("stopped_early", False)),
            "budget": {"minutes": self.minutes, "steps": self.steps},
            "crop": self.crop, "batch": self.batch, "lr": self.lr,
            "device": device, "minutes": round(state.elapsed_s / 60, 2),
            "started": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "warnings": self.warnings,
        }
        extra = {k: trained_meta[k] for k in ("working_scale", "working_view_difference") if k in trained_meta}
        extra.update(recommendation(self.init_metadata))     # e.g. the default model's guided smoothing stays on
        extra["adaptation"] = adaptation
        export_model(_net, final, scales=cfg.scales, interpolation=cfg.interpolation, name=self.name,
                     training=training, extra=extra)
        try:
            load_model(final)                   # the same checks as every later use of the file
            model = user_models.register_user_model(final, self.name, self.directory)
        except Exception:
            final.unlink(missing_ok=True)
            raise
        self.result = AdaptResult(final, model.name, model.sha256, model.metadata, state.step,
                                  adaptation["stopped_early"], self.warnings)
        self._set(phase="done")
        return self.result

    def _refresh_views(self, preview_png: Optional[Path]) -> None:
        """Diagnose the newest "input | output" preview (written by train in this thread, so it
        is complete), copy it atomically for the GUI and redraw the loss plot."""
        from PIL import Image

        shown = self._work / "preview.png"
        if preview_png is not None and preview_png.is_file():
            with Image.open(preview_png) as img:
                side = np.asarray(img.convert("L"), np.float32) / 255.0
            half = (side.shape[1] - 4) // 2
            problem = diagnose_output(side[:, :half], side[:, half + 4:])
            if problem:
                self._warn(problem)
            _save_atomically(Image.fromarray(np.round(side * 255).astype(np.uint8)), shown)
        plot = self._work / "loss.png"
        history = self.snapshot().history
        if history:
            render_loss_plot(history, plot)
        with self._lock:
            self._progress.preview_path = shown if shown.is_file() else None
            self._progress.loss_plot_path = plot if plot.is_file() else None
            self._progress.version += 1
