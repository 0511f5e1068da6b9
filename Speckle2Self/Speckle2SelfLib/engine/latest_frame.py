"""Live despeckling in the engine: frames as they arrive, the latest output kept, frames dropped rather than queued.

:class:`StreamDespeckler` -- a worker thread that despeckles submitted frames. Each stream (key,
e.g. an OpenIGTLink device name) holds at most one pending frame: a frame that arrives while the
previous one still waits replaces it and is counted as dropped. Memory stays bounded (per stream:
one pending frame, one in work, the latest result) however slow inference is. No networking here:
the OpenIGTLink relay built on it is :class:`Speckle2SelfLib.igtl.relay.StreamRelay`, the Slicer
side (a live volume node despeckled into an output node, MRML on the main thread only) is
:class:`Speckle2SelfLib.scene.live.LiveVolumeDespeckler`.

numpy only: torch comes with the despeckler it is given.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import numpy as np

DRAIN_SECONDS = 10.0                 # on stop: at most this long to finish the frame in work (and send it)
LATENCY_WINDOW = 1000                # latencies kept for the statistics


def percentiles_ms(values) -> Tuple[Optional[float], Optional[float]]:
    """Median and 95th percentile of ``values`` (seconds) in ms, rounded to 0.01 (None, None when empty)."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return round(float(np.median(arr)), 2), round(float(np.percentile(arr, 95)), 2)


def warm_up(despeckler, runs: int = 3) -> None:
    """Run the model a few times on a small frame: TorchScript optimises its graph during the first
    calls (about 10x slower), which would otherwise hit the first live frames."""
    denoise = despeckler.denoise if hasattr(despeckler, "denoise") else despeckler
    frame = (np.add.outer(np.arange(64), np.arange(64)) % 256).astype(np.uint8)   # not constant: the net runs
    for _ in range(runs):
        denoise(frame)



def _stream_denoiser(despeckler, refine: str = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """``despeckler.denoise`` with the grain-matched working scale found once per frame size:
    one stream comes from one probe and setting, and matching the grain resamples each frame at
    13 candidate scales, work a live stream should not repeat for every frame. ``refine``: see
    :meth:`~Speckle2SelfLib.engine.inference.Despeckler.denoise` ("none" skips the guided
    refinement, a small share of a frame's time on the bilateral grid)."""
    if not hasattr(despeckler, "resolve_working_scale"):
        return despeckler.denoise
    refine = despeckler.resolve_refine(refine)     # a bad value is refused before any frame
    scales: Dict[Tuple[int, ...], float] = {}

    def denoise(frames: np.ndarray) -> np.ndarray:
        key = tuple(np.shape(frames)[-2:])
        if key not in scales:
            scales[key] = despeckler.resolve_working_scale(np.asarray(frames), "auto")
        return despeckler.denoise(frames, working_scale=scales[key], refine=refine)

    return denoise


@dataclass
class StreamResult:
    """One despeckled frame (or stack) and what came with it."""

    key: str
    output: np.ndarray
    meta: Any
    index: int             # submission number (increasing over all streams)
    received: float        # time.monotonic() when submitted
    finished: float        # time.monotonic() when despeckled

    @property
    def seconds(self) -> float:
        return self.finished - self.received


@dataclass
class StreamStats:
    received: int          # frames submitted
    processed: int         # frames despeckled
    dropped: int           # frames replaced (or refused) before being despeckled
    failed: int            # frames the despeckler raised on
    pending: int
    latency_ms_median: Optional[float]   # submit -> despeckled
    latency_ms_p95: Optional[float]


@dataclass
class _Item:
    key: str
    frames: np.ndarray
    meta: Any
    index: int
    received: float


class StreamDespeckler:
    """Despeckle frames as they arrive; the latest frame of each stream wins.

    ``despeckler``: a :class:`~Speckle2SelfLib.engine.inference.Despeckler` or any callable taking and
    returning an array. ``on_output(result)`` and ``on_error(key, meta, error)`` run in the
    worker thread. Without :meth:`start`, call :meth:`process_pending` to work in the caller's
    thread. ``received == processed + dropped + failed + pending`` holds at any time.
    """

    def __init__(self, despeckler, on_output: Optional[Callable[[StreamResult], None]] = None, *,
                 on_error: Optional[Callable[[str, Any, BaseException], None]] = None, max_streams: int = 8,
                 refine: str = "auto"):
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self._denoise = _stream_denoiser(despeckler, refine) if hasattr(despeckler, "denoise") else despeckler
        if not callable(self._denoise):
            raise TypeError("despeckler must be a Despeckler or a callable array -> array")
        self.on_output = on_output
        self.on_error = on_error
        self.max_streams = max_streams
        self._cond = threading.Condition()
        self._pending: "OrderedDict[str, _Item]" = OrderedDict()
        self._latest: Dict[str, StreamResult] = {}
        self._busy = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._index = 0
        self._received = self._processed = self._dropped = self._failed = 0
        self._latencies: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.last_error: Optional[BaseException] = None

    # ------------------------------------------------------------------ life cycle
    def start(self, warm: bool = False) -> "StreamDespeckler":
        """Start the worker thread; with ``warm`` it first runs :func:`warm_up` (frames submitted
        meanwhile wait, the latest winning as always)."""
        with self._cond:
            if self._thread is not None:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._run, args=(warm,), name="speckle2self-stream", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Stop the worker after the frame in work; frames still pending count as dropped.
        Returns False when the worker did not end within ``timeout``."""
        with self._cond:
            self._stopping = True
            self._dropped += len(self._pending)
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
            self._thread = None
        return True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ frames in, results out
    def submit(self, frames: np.ndarray, key: str = "", meta: Any = None) -> bool:
        """Hand over a frame (H, W) or stack (N, H, W); it is not copied, so do not change it.

        A frame of ``key`` still waiting is replaced (counted as dropped). Returns False when the
        frame is refused: the despeckler is stopping, or ``max_streams`` other streams are pending.
        """
        with self._cond:
            self._received += 1
            if self._stopping or (key not in self._pending and len(self._pending) >= self.max_streams):
                self._dropped += 1
                return False
            if key in self._pending:
                self._dropped += 1          # replaced in place: the stream keeps its turn
            self._index += 1
            self._pending[key] = _Item(key, frames, meta, self._index, time.monotonic())
            self._cond.notify_all()
        return True

    def latest(self, key: str = "") -> Optional[StreamResult]:
        """The newest despeckled result of ``key`` (None before the first)."""
        with self._cond:
            return self._latest.get(key)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or in work; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def process_pending(self) -> int:
        """Despeckle what is pending in the caller's thread (no worker needed); returns the count."""
        done = 0
        while True:
            item = self._take(block=False)
            if item is None:
                return done
            self._process(item)
            done += 1

    @property
    def stats(self) -> StreamStats:
        with self._cond:
            median, p95 = percentiles_ms(list(self._latencies))
            return StreamStats(self._received, self._processed, self._dropped, self._failed, len(self._pending),
                               median, p95)

    # ------------------------------------------------------------------ worker
    def _take(self, block: bool) -> Optional[_Item]:
        with self._cond:
            while block and not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending or (block and self._stopping):
                return None
            _key, item = self._pending.popitem(last=False)
            self._busy = True
            return item

    def _run(self, warm: bool = False) -> None:
        if warm:
            with self._cond:
                self._busy = True
            try:
                warm_up(self._denoise)
            except Exception:  # noqa: BLE001 - the first real frame reports the same error
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        while True:
            item = self._take(block=True)
            if item is None:
                return
            self._process(item)

    def _process(self, item: _Item) -> None:
        result = None
        try:
            try:
                output = self._denoise(item.frames)
            except Exception as err:  # reported, counted; the stream goes on with the next frame
                with self._cond:
                    self._failed += 1
                    self.last_error = err
                if self.on_error is not None:
                    self.on_error(item.key, item.meta, err)
                return
            result = StreamResult(item.key, output, item.meta, item.index, item.received, time.monotonic())
            with self._cond:
                self._latest[item.key] = result
                self._processed += 1
                self._latencies.append(result.seconds)
            if self.on_output is not None:
                self.on_output(result)
        except Exception as err:  # a failing callback must not kill the worker
            self.last_error = err
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


__all__ = ["warm_up", "StreamDespeckler", "StreamResult", "StreamStats"]
