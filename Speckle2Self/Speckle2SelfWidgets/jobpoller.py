"""One QTimer poller for every background job of the module (despeckling, segmentation, adaptation).

A job speaks the protocol of :mod:`Speckle2SelfLib.jobstate`: ``poll()`` on the main thread
returns a JobState (progress while running; at the end how it ended, with the result written
into the scene on this thread), ``cancel()`` asks it to stop. The worker thread never touches
MRML or Qt; the timer's ticks are where the GUI learns about progress and the end.
"""

import qt


class JobPoller:
    """Poll ``job`` every ``intervalMs`` on the main thread: ``onProgress(state)`` while it runs,
    ``onEnd(state)`` once when it has ended (finished, cancelled or failed)."""

    def __init__(self, job, intervalMs: int, onProgress, onEnd):
        self.job = job
        self._onProgress = onProgress
        self._onEnd = onEnd
        self._cancelRequested = False
        self._timer = qt.QTimer()
        self._timer.setInterval(intervalMs)
        self._timer.connect("timeout()", self.tick)
        self._timer.start()

    def cancel(self) -> None:
        """Ask the job to stop; the next tick reports how it ended."""
        self._cancelRequested = True
        self.job.cancel()

    def stop(self) -> None:
        """Stop polling (a closing scene or a reloaded module): the job is cancelled, not waited for."""
        self.cancel()
        self._timer.stop()

    @property
    def active(self) -> bool:
        return self._timer.isActive()

    def tick(self) -> None:
        job = self.job
        if self._cancelRequested:
            job.cancel()          # again: a job may ignore a cancel that came before it started
        state = job.poll()
        if state.running:
            self._onProgress(state)
            return
        self._timer.stop()
        self._onEnd(state)
