"""The one job protocol the module's GUI polls: ``poll() -> JobState`` and ``cancel()``.

Despeckling and segmentation (:class:`Speckle2SelfLib.scene.jobs.BackgroundJob`) and adaptation
(:class:`Speckle2SelfLib.engine.adapt.AdaptJob`) all speak it, so one QTimer poller serves them all.
No dependencies: every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class JobState:
    """What a job's ``poll()`` reports: work done of total, and how the job ended."""

    done: int
    total: int
    running: bool                      # the worker thread is still computing
    finished: bool = False             # ended with a result (``result``)
    cancelled: bool = False            # cancelled: nothing was added to the scene
    error: Optional[BaseException] = None
    result: Any = None                 # what the job produced (for scene jobs: what they stored)

    @property
    def ended(self) -> bool:
        return not self.running
