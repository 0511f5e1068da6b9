"""Adapting a model to the scene's own images: reading the chosen nodes, and the console API.

The fine-tuning itself is :class:`Speckle2SelfLib.engine.adapt.AdaptJob` (numpy and torch, no
MRML); this module reads the volume and sequence nodes into its :class:`~Speckle2SelfLib.engine.adapt.AdaptData`
on the main thread, so that the engine never touches the scene. From Slicer's Python console::

    from Speckle2SelfLib.scene.adapt import adapt, start_adaptation
    result = adapt([getNode('Image_Image')], minutes=30)          # blocks; result.path, result.warnings
    job = start_adaptation([getNode('Sequence')], minutes=30, init=None, device='cuda')  # background
    job.snapshot().step; job.stop(); job.wait(); job.result.path

The scene is never modified: nodes are only read.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..engine.adapt import MIN_FRAMES, AdaptData, AdaptJob, AdaptProgress, AdaptResult, node_warnings, \
    prepare_node_frames
from .nodes import coloured_pixels, read_input


def frames_from_nodes(nodes: Sequence, all_frames: bool = True, crop_to_content: bool = True) -> AdaptData:
    """Read volume and sequence nodes (grey or RGB) into training frames. Call on the main thread.

    A sequence node or sequence browser gives every frame of its sequence; a volume gives its
    slices, or (``all_frames``) every frame of the sequence it shows when it is a sequence proxy.
    A sequence chosen twice (e.g. as node and as proxy) is read once. RGB is read as luminance.
    Each node's frames are cropped to the content (rows and columns that are not black in any
    frame: the margins around a sector or a screen capture teach nothing).
    """
    nodes = _given_nodes(nodes)
    frames: List[np.ndarray] = []
    summaries: List[Dict[str, Any]] = []
    warnings: List[str] = []
    seen = set()
    for node in nodes:
        source, items, geometry_node = read_input(node, all_frames)
        key = source.GetID() or id(source)
        if key in seen:
            continue
        seen.add(key)
        grey = np.concatenate([p.grey for p in items]).astype(np.float32)          # (N, J, I)
        rgb = [p.rgb for p in items if p.rgb is not None]
        info = {"name": source.GetName(), "class": source.GetClassName(), "frames": int(grey.shape[0]),
                "size": [int(grey.shape[2]), int(grey.shape[1])],
                "spacing": [round(float(v), 6) for v in geometry_node.GetSpacing()],
                "rgb": bool(rgb)}
        colour_share = float(coloured_pixels(np.concatenate(rgb)).mean()) if rgb else None
        node_frames, checks = prepare_node_frames(grey, colour_share, crop_to_content)
        info.update(checks)
        info["frames_used"] = len(node_frames)
        warnings += node_warnings(info)
        summaries.append(info)
        frames += node_frames
    if not frames:
        raise ValueError("the chosen nodes have no usable frames (all are flat or smaller than 32 pixels)")
    if len(frames) < MIN_FRAMES:
        warnings.insert(0, f"only {len(frames)} frame(s) to adapt on (fewer than {MIN_FRAMES}): the model may learn "
                           "these images by heart; add more frames or sequences of the same scanner if you can")
    return AdaptData(frames, summaries, warnings)


def _given_nodes(nodes) -> list:
    """The chosen nodes as a list without None; a clear error when there are none."""
    if nodes is None:
        raise ValueError("no input nodes; select one or more volume or sequence nodes")
    if not isinstance(nodes, (list, tuple)):
        nodes = [nodes]
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        raise ValueError("no input nodes; select one or more volume or sequence nodes")
    return nodes


def start_adaptation(nodes, *, all_frames: bool = True, **options) -> AdaptJob:
    """Read ``nodes`` now (main thread) and fine-tune in the background; returns the running job.

    Options as for :class:`~Speckle2SelfLib.engine.adapt.AdaptJob` (minutes, steps, init, crop,
    batch, lr, device, name, directory).
    """
    return AdaptJob(frames_from_nodes(nodes, all_frames), **options).start()


def adapt(nodes, minutes: Optional[float] = 10.0, init=None, *, steps: Optional[int] = None,
          all_frames: bool = True, on_update: Optional[Callable[[AdaptProgress], None]] = None,
          should_stop: Optional[Callable[[], bool]] = None, poll_s: float = 1.0, **options) -> AdaptResult:
    """Adapt a model to ``nodes`` (volume / sequence nodes) and wait for it; returns the result.

    ``init``: the starting model (None: the bundled default). ``on_update(progress)`` is
    called about every ``poll_s`` seconds on the calling thread; ``should_stop()`` turning
    True stops the run (the best weights so far are still exported). Warnings (too few
    frames, overlays, copying, collapse) are in ``result.warnings``.
    """
    job = AdaptJob(frames_from_nodes(nodes, all_frames), init=init, minutes=minutes, steps=steps, **options)
    job.start()
    while job.wait(poll_s) is None and job.is_running():
        if should_stop is not None and should_stop():
            job.stop()
        if on_update is not None:
            on_update(job.snapshot())
    result = job.wait()
    if on_update is not None:
        on_update(job.snapshot())
    return result
