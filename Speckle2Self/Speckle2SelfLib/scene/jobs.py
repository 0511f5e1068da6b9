"""Background jobs for a GUI: compute in a worker thread that never touches MRML, store on the main thread.

A job is made on the main thread, which reads what it needs from the scene into numpy. Its
:meth:`~BackgroundJob.start` runs :meth:`~BackgroundJob.compute` in a Python thread (numpy and
torch only); :meth:`~BackgroundJob.poll`, called on the main thread (the Slicer module calls it
from a QTimer), reports progress and, once the thread is done, :meth:`~BackgroundJob.store` s the
result into the scene. So MRML is only ever used on the caller's thread, and a cancelled or
failed job adds nothing to the scene::

    job = logic.prepare_job(volume_node)     # main thread: read frames
    job.start()                              # worker thread: compute
    state = job.poll()                       # main thread, e.g. every 100 ms

:meth:`~BackgroundJob.run` does both on the calling thread (the blocking API).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional

from ..jobstate import JobState


class BackgroundJob:
    """Subclasses define :meth:`compute` (worker thread, no MRML) and :meth:`store` (main thread);
    :meth:`compute` advances :attr:`done` and calls :meth:`check_cancel` between steps of well
    under a second, so that progress moves and :meth:`cancel` takes effect within a second."""

    #: What the job does, for messages ("despeckling cancelled").
    what = "job"

    def __init__(self, total: int):
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.done, self._total = 0, int(total)
        self._output: Any = None
        self._error: Optional[BaseException] = None
        self._state: Optional[JobState] = None      # the final state, once reported
        self.started = 0.0

    @property
    def total(self) -> int:
        return self._total

    # ------------------------------------------------------------------ to define
    def compute(self) -> Any:
        """The work, in the worker thread: numpy/torch only, never MRML."""
        raise NotImplementedError

    def store(self, output: Any) -> Any:
        """Write ``output`` into the scene, on the main thread; returns the job's result."""
        raise NotImplementedError

    # ------------------------------------------------------------------ control
    def start(self):
        """Start the worker thread (once); returns it."""
        if self._thread is not None:
            raise RuntimeError(f"this {self.what} job was started already")
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._work, name=f"Speckle2Self {self.what}", daemon=True)
        self._thread.start()
        return self._thread

    def run(self) -> Any:
        """Compute and store on the calling thread (no worker thread); returns the result."""
        self.started = time.monotonic()
        return self.store(self.compute())

    def cancel(self) -> None:
        """Stop after the current step; the scene is left as it was. The next :meth:`poll`
        reports the job cancelled at once, even while the worker finishes a step."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def check_cancel(self) -> None:
        """In :meth:`compute`: raise Cancelled when :meth:`cancel` was called."""
        from ..engine.inference import Cancelled

        if self._cancel.is_set():
            raise Cancelled(f"{self.what} cancelled")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the worker thread (tests, scripts); True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is not None and not self._thread.is_alive()

    def poll(self) -> JobState:
        """Progress now; once the worker is done, store the result in the scene (call this on the
        thread that owns the scene). The final state is reported again on later calls."""
        from ..engine.inference import Cancelled

        if self._state is not None:
            return self._state
        if self._thread is not None and self._thread.is_alive() and self._cancel.is_set():
            # Ended for the caller now: a step that cannot be interrupted (loading a model) may
            # still be running; the worker stops at its next check and its output is never stored.
            self._state = JobState(self.done, self._total, False, cancelled=True)
            return self._state
        if self._thread is None or self._thread.is_alive():
            return JobState(self.done, self._total, self._thread is not None)
        if self._error is None and self._cancel.is_set():
            self._error = Cancelled(f"{self.what} cancelled")
        if self._error is not None:
            cancelled = isinstance(self._error, Cancelled)
            self._state = JobState(self.done, self._total, False, cancelled=cancelled,
                                   error=None if cancelled else self._error)
            return self._state
        try:
            result = self.store(self._output)
        except Exception as err:       # e.g. the input was deleted meanwhile: nothing was added
            self._state = JobState(self.done, self._total, False, error=err)
            return self._state
        self._state = JobState(self._total, self._total, False, finished=True, result=result)
        return self._state

    def _work(self) -> None:
        try:
            self._output = self.compute()
        except BaseException as err:      # reported by poll() on the main thread
            self._error = err
