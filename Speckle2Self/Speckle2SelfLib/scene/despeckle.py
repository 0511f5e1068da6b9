"""Despeckling volume and sequence nodes: reading the input, the background job, writing the outputs.

Volume node <-> numpy: a volume's voxels are read as a (K, J, I) stack, one 2D frame per
slice K (a single 2D image is K = 1), despeckled frame by frame by
:class:`~Speckle2SelfLib.engine.inference.Despeckler`, and written into a new (or given) volume
node with the input's geometry (IJK-to-RAS: origin, spacing, directions), parent transform and
window/level. RGB(-like) vector volumes are despeckled on their luminance; ``keep_colour``
keeps coloured pixels (e.g. a Doppler overlay) unchanged in an RGB output. A sequence (a
cine loop) gives a new sequence with the same index name, unit, type and values, added to
the browser that plays the input so that both are browsed frame by frame.

The calls are :class:`~Speckle2SelfLib.scene.logic.Speckle2SelfLogic`'s (``despeckle_volume``,
``despeckle_sequence``, ``prepare_job``); this module holds the steps they share. The input
node is never modified; when the work is cancelled or fails, every node the call created is
removed again. :class:`DespeckleJob` despeckles frames read on the main thread in a worker
thread (numpy/torch only) in batches of about half a second (:mod:`.jobs`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import numpy as np

from ..engine.inference import check_grey_levels
from ..engine.refine import check_refine
from .jobs import BackgroundJob
from .nodes import (COLOUR_THRESHOLD, CreatedNodes, Pixels, base_name, browser_item_number, check_still_in_scene,
                    coloured_pixels, copy_display, copy_geometry, display_name, find_sequence, means_sequence,
                    read_pixels, read_sequence_items, resolve_sequence, scene_of, stack_items, write_voxels)

OUTPUT_SUFFIX = " despeckled"
SEQUENCE_SUFFIX = " sequence"
#: Attribute of an output sequence naming the input sequence's node ID (a rerun replaces it).
SOURCE_ATTRIBUTE = "Speckle2Self.SourceSequence"

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


@dataclass
class SequenceOutput:
    """What despeckling a sequence added to the scene."""

    sequence_node: Any            # vtkMRMLSequenceNode with one despeckled volume per input item
    proxy_node: Any               # volume node showing the browser's current output frame
    browser_node: Any             # vtkMRMLSequenceBrowserNode playing input and output together
    frames: int
    seconds: float
    created_browser: bool = False  # no browser played the input, so a new one was made


# ----------------------------------------------------------------------------- inputs

@dataclass
class VolumeSource:
    """A volume input read on the main thread and checked against the output node."""

    scene: Any
    node: Any
    pixels: Pixels
    colour_out: bool

    @classmethod
    def read(cls, node, output_node, keep_colour: bool) -> "VolumeSource":
        scene = scene_of(node)
        pixels = read_pixels(node)
        colour_out = keep_colour and pixels.rgb is not None
        check_output_node(output_node, node, colour_out)
        shown = find_sequence(output_node) if output_node is not None else None
        if shown is not None:
            raise ValueError(f"output {display_name(output_node)} shows a frame of sequence {display_name(shown[0])}: "
                             "its browser would replace this result at its next step; choose or create another "
                             "output volume")
        return cls(scene, node, pixels, colour_out)


@dataclass
class SequenceSource:
    """A sequence input read on the main thread and checked against the output node: what both
    the blocking call and the background job need before any computation."""

    scene: Any
    sequence: Any
    browser: Any
    input_proxy: Any
    colour_out: bool
    replaced: Any
    frames: int
    stacked: Pixels

    @classmethod
    def read(cls, source, output_node, keep_colour: bool) -> "SequenceSource":
        sequence, browser, input_proxy = resolve_sequence(source)
        scene = scene_of(sequence)
        items = read_sequence_items(sequence)
        colour_out = keep_colour and items[0].rgb is not None
        check_output_node(output_node, input_proxy, colour_out)
        replaced = _earlier_result(output_node, browser, sequence)
        return cls(scene, sequence, browser, input_proxy, colour_out, replaced, len(items), stack_items(items))


# ----------------------------------------------------------------------------- computing

def despeckle_pixels(despeckler, pixels: Pixels, colour_out: bool, colour_threshold: float, batch_size, gamma,
                     blend, progress: ProgressFn, cancel: CancelFn, grey_levels: str = "auto",
                     refine: str = "auto", slice_choice=None) -> np.ndarray:
    """Despeckled voxels in the input's voxel type (RGB with the input's colours kept for ``colour_out``);
    ``slice_choice``: the plane of a 3D volume (Speckle2SelfLib.engine.volume_axes), None: frames along K."""
    from ..engine.volume_axes import despeckle_volume, is_k_frames

    if not is_k_frames(slice_choice):
        grey, _ = despeckle_volume(despeckler, pixels.grey, choice=slice_choice, batch_size=batch_size,
                                   progress=progress, cancel=cancel, gamma=gamma, blend=blend,
                                   grey_levels=grey_levels, refine=refine)
        return finish_pixels(grey, pixels, colour_out, colour_threshold)
    grey = despeckler.denoise(pixels.grey, batch_size=batch_size, progress=progress, cancel=cancel,
                              gamma=gamma, blend=blend, grey_levels=grey_levels, refine=refine)
    return finish_pixels(grey, pixels, colour_out, colour_threshold)


def finish_pixels(grey: np.ndarray, pixels: Pixels, colour_out: bool, colour_threshold: float) -> np.ndarray:
    grey = _cast_like(grey, pixels.dtype)
    return _keep_colour(pixels.rgb, grey, colour_threshold) if colour_out else grey


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float results back to the input's voxel type (rounded and clipped for integers)."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _keep_colour(rgb: np.ndarray, grey: np.ndarray, threshold: float) -> np.ndarray:
    """RGB output: despeckled grey everywhere except coloured input pixels (Doppler, annotations)."""
    coloured = coloured_pixels(rgb, threshold)
    out = np.repeat(grey[..., None], 3, axis=-1)
    out[coloured] = rgb[coloured]
    return out


def scaled_progress(progress: ProgressFn, total: int, frames: int, n: int) -> ProgressFn:
    """Map the engine's (done, frames) onto the first half of a 2N-step progress (N items)."""
    if progress is None:
        return None
    return lambda done, _frames: progress(int(round(done * n / frames)), total)


# ----------------------------------------------------------------------------- writing

def store_volume(source: VolumeSource, output_node, result: np.ndarray):
    """Write despeckled voxels into ``output_node`` (new when None) like the input volume."""
    check_still_in_scene(source.scene, input=source.node, output=output_node)
    with CreatedNodes(source.scene) as created:
        if output_node is None:
            output_node = created.add(_volume_class(source.colour_out), output_name(source.node))
        write_voxels(output_node, result)
        copy_geometry(source.node, output_node)
        copy_display(source.node, output_node)
        created.track_display(output_node)
    return output_node


#: Name suffix of the uncertainty map's volume node, and its attribute naming the output it describes.
UNCERTAINTY_SUFFIX = " uncertainty"
UNCERTAINTY_OF_ATTRIBUTE = "Speckle2Self.UncertaintyOf"


def check_uncertainty_node(uncertainty_node, input_node, output_node, slice_axis: str) -> None:
    """ValueError unless the uncertainty map can be written: a scalar volume node (or None: a new
    one) that is neither the input nor the output, and one slice plane (not "three")."""
    if slice_axis == "three":
        raise ValueError("the uncertainty map describes one plane's despeckling; choose slice axis auto, i, j or k")
    if uncertainty_node is None:
        return
    if uncertainty_node is input_node or (output_node is not None and uncertainty_node is output_node):
        raise ValueError("the uncertainty map needs its own volume node (not the input or the output); "
                         "choose another node or create a new one")
    if uncertainty_node.GetClassName() != "vtkMRMLScalarVolumeNode":
        raise ValueError(f"the uncertainty map is a scalar volume; {uncertainty_node.GetName()!r} is a "
                         f"{uncertainty_node.GetClassName()}: choose a scalar volume or create a new one")


def uncertainty_voxels(recorder, pixels: Pixels, slice_choice=None) -> np.ndarray:
    """The maps a :class:`~Speckle2SelfLib.engine.uncertainty.MapRecorder` kept while
    :func:`despeckle_pixels` ran, as float32 (K, J, I) voxels laid out like its result."""
    from ..engine.volume_axes import despeckle_volume, is_k_frames

    if not is_k_frames(slice_choice):
        maps, _ = despeckle_volume(recorder.replay(), pixels.grey, choice=slice_choice)
        return maps.astype(np.float32, copy=False)
    return np.concatenate(recorder.maps).reshape(pixels.grey.shape).astype(np.float32, copy=False)


def store_uncertainty(source: VolumeSource, uncertainty_node, maps: np.ndarray, output_node):
    """Write the uncertainty map into ``uncertainty_node`` (new when None) with the input's geometry;
    the node's attribute :data:`UNCERTAINTY_OF_ATTRIBUTE` names the output node it describes."""
    check_still_in_scene(source.scene, input=source.node, output=uncertainty_node)
    with CreatedNodes(source.scene) as created:
        if uncertainty_node is None:
            uncertainty_node = created.add("vtkMRMLScalarVolumeNode", base_name(source.node) + UNCERTAINTY_SUFFIX)
        write_voxels(uncertainty_node, maps)
        copy_geometry(source.node, uncertainty_node)
        uncertainty_node.SetAttribute(UNCERTAINTY_OF_ATTRIBUTE, output_node.GetID())
    return uncertainty_node


def store_sequence(src: SequenceSource, output_node, per_item: List[np.ndarray], sequences_logic=None,
                   progress: ProgressFn = None, cancel: CancelFn = None):
    """Output sequence + proxy volume, played by the input's browser (or a new one): returns
    (output proxy, output sequence, browser, whether the browser was made here)."""
    n = len(per_item)
    sequence, browser, input_proxy = src.sequence, src.browser, src.input_proxy
    check_still_in_scene(src.scene, sequence=sequence, browser=browser, proxy=input_proxy, output=output_node)
    if sequence.GetNumberOfDataNodes() != n:
        raise ValueError(f"sequence {display_name(sequence)} changed from {n} to {sequence.GetNumberOfDataNodes()} "
                         "frames while it was despeckled; nothing was added, run it again")
    with CreatedNodes(src.scene) as created:
        if output_node is None:    # made first so that it gets the plain "<input> despeckled" name
            output_node = created.add(_volume_class(src.colour_out),
                                      output_name(input_proxy if input_proxy is not None else sequence))
        out_sequence = created.add("vtkMRMLSequenceNode", output_name(sequence) + SEQUENCE_SUFFIX)
        _fill_sequence(out_sequence, sequence, per_item, src.colour_out, progress, cancel, n)
        current = browser_item_number(browser, sequence) if browser is not None else None
        current = min(max(current or 0, 0), n - 1)
        write_voxels(output_node, per_item[current])
        copy_geometry(sequence.GetNthDataNode(current), output_node)
        # Sequence items are copies without scene references (vtkMRMLSequenceNode::CopyContent):
        # the parent transform (e.g. ImageToReference of tracked ultrasound) is the input proxy's.
        transform = input_proxy.GetParentTransformNode() if input_proxy is not None else None
        output_node.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
        copy_display(input_proxy if input_proxy is not None else sequence.GetNthDataNode(0), output_node)
        created.track_display(output_node)
        made_browser = browser is None
        if made_browser:
            browser = created.add("vtkMRMLSequenceBrowserNode", output_name(sequence) + " browser")
        if src.replaced is not None:   # a rerun into the same output: the new frames take the old one's place
            browser.RemoveSynchronizedSequenceNode(src.replaced.GetID())
        _synchronise(browser, out_sequence, output_node, made_browser)
        if src.replaced is not None:
            name = src.replaced.GetName()
            src.scene.RemoveNode(src.replaced)
            out_sequence.SetName(name)
        if sequences_logic is not None:
            sequences_logic.UpdateProxyNodesFromSequences(browser)
        return output_node, out_sequence, browser, made_browser


def _fill_sequence(out_sequence, sequence, per_item: List[np.ndarray], colour_out: bool,
                   progress: ProgressFn, cancel: CancelFn, n: int) -> None:
    """One output volume per input item, at the same index value, with the item's geometry."""
    import slicer

    from ..engine.inference import Cancelled, _is_cancelled

    out_sequence.SetIndexName(sequence.GetIndexName())
    out_sequence.SetIndexUnit(sequence.GetIndexUnit())
    out_sequence.SetIndexType(sequence.GetIndexType())
    out_sequence.SetAttribute(SOURCE_ATTRIBUTE, sequence.GetID() or "")
    for i, voxels in enumerate(per_item):
        if _is_cancelled(cancel):
            raise Cancelled("despeckling cancelled")
        item = sequence.GetNthDataNode(i)
        frame = getattr(slicer, _volume_class(colour_out))()
        frame.SetName(base_name(item, "frame") + OUTPUT_SUFFIX)
        write_voxels(frame, voxels)
        copy_geometry(item, frame)
        out_sequence.SetDataNodeAtValue(frame, sequence.GetNthIndexValue(i))
        if progress is not None:
            progress(n + i + 1, 2 * n)


def _earlier_result(output_node, browser, sequence):
    """The output sequence of an earlier run on ``sequence`` that ``output_node`` shows (to be
    replaced by this run), None when ``output_node`` shows no sequence. Refuses to take over the
    proxy of any other sequence."""
    found = find_sequence(output_node) if output_node is not None else None
    if found is None:
        return None
    shown, shown_by = found
    if shown_by is not browser or shown.GetAttribute(SOURCE_ATTRIBUTE) != sequence.GetID():
        raise ValueError(f"{display_name(output_node)} already shows sequence {display_name(shown)}; choose a new "
                         "output volume")
    return shown


def _synchronise(browser, out_sequence, proxy, made_browser: bool) -> None:
    """Play ``out_sequence`` in ``browser`` with ``proxy`` as the node that shows its current item."""
    modifying = browser.StartModify()
    try:
        if made_browser:
            set_primary = getattr(browser, "SetAndObservePrimarySequenceNodeID", None) or \
                browser.SetAndObserveMasterSequenceNodeID
            set_primary(out_sequence.GetID())
        else:
            browser.AddSynchronizedSequenceNode(out_sequence)
        browser.AddProxyNode(proxy, out_sequence, False)
        browser.SetSaveChanges(out_sequence, False)   # edits of the proxy must not rewrite the result
    finally:
        browser.EndModify(modifying)


# ----------------------------------------------------------------------------- output nodes

def _volume_class(colour: bool) -> str:
    return "vtkMRMLVectorVolumeNode" if colour else "vtkMRMLScalarVolumeNode"


def output_name(node) -> str:
    return base_name(node) + OUTPUT_SUFFIX


def check_output_node(output_node, input_node, colour: bool) -> None:
    """ValueError unless ``output_node`` (None: a new one) can take the result: never the input,
    a scalar volume for grey results, a vector volume for RGB ones."""
    import slicer

    if output_node is None:
        return
    name = display_name(output_node)
    if input_node is not None and output_node is input_node:
        raise ValueError(f"output {name} is the input; the input is never overwritten, "
                         "choose another output or create a new volume")
    if isinstance(output_node, slicer.vtkMRMLLabelMapVolumeNode) or \
            not isinstance(output_node, slicer.vtkMRMLScalarVolumeNode):
        raise ValueError(f"output {name} is a {output_node.GetClassName()}; choose a scalar volume "
                         "or create a new volume")
    is_vector = isinstance(output_node, slicer.vtkMRMLVectorVolumeNode)
    if colour and not is_vector:
        raise ValueError(f"output {name} is a grey (scalar) volume but 'keep colour' gives RGB; "
                         "create a new output volume or a vector volume")
    if not colour and is_vector:
        raise ValueError(f"output {name} is an RGB (vector) volume but the result is grey; "
                         "create a new output volume or choose a scalar volume")


# ----------------------------------------------------------------------------- background job

class DespeckleJob(BackgroundJob):
    """Despeckle in a worker thread that never touches MRML (GUI: poll from a QTimer).

    Made by :meth:`Speckle2SelfLogic.prepare_job <Speckle2SelfLib.scene.logic.Speckle2SelfLogic.prepare_job>`
    on the main thread, which reads the voxels to numpy. :meth:`start` runs the model (loading
    included) in a Python thread, in batches of about :attr:`seconds_per_batch` of work each
    (the first is a single frame that times the model), so progress moves and :meth:`cancel`
    takes effect within about that time. :meth:`poll`, called on the main thread, reports
    progress and, once the thread is done, writes the result into the scene.
    """

    what = "despeckling"
    seconds_per_batch = 0.5

    def __init__(self, logic, pixels: Pixels, store: Callable[[np.ndarray], Any], *,
                 colour_out: bool, colour_threshold: float, model, device, batch_size, gamma, blend,
                 grey_levels: str = "auto", refine: str = "auto", slice_choice=None, uncertainty: bool = False):
        super().__init__(int(pixels.grey.shape[0]))
        self._uncertainty = uncertainty             # also keep the uncertainty map (volumes)
        self.uncertainty_maps: Optional[np.ndarray] = None
        self.slice_choice = slice_choice            # the plane of a 3D volume (engine.volume_axes); None: K
        self._logic, self._pixels, self._store = logic, pixels, store
        self._colour_out, self._colour_threshold = colour_out, colour_threshold
        self._model, self._device, self._batch_size = model, device, batch_size
        self._gamma, self._blend, self._grey_levels = gamma, blend, grey_levels   # checked by prepare_job
        self._refine = refine
        self.batches: List[int] = []                # frames per batch, in order (for tests and logs)

    def compute(self) -> np.ndarray:
        """Worker thread: numpy and torch only."""
        despeckler = self._logic.despeckler(self._model, self._device)
        if self._uncertainty:
            from ..engine.uncertainty import MapRecorder
            despeckler = MapRecorder(despeckler)
        output = self._despeckle(despeckler)
        if self._uncertainty:
            self.uncertainty_maps = uncertainty_voxels(despeckler, self._pixels, self.slice_choice)
        return output

    def _despeckle(self, despeckler) -> np.ndarray:
        grey = self._pixels.grey
        from ..engine.volume_axes import despeckle_volume, is_k_frames
        if not is_k_frames(self.slice_choice):     # another plane: frames over all passes scaled onto K's
            def advance(done, total):
                self.done = min(len(grey), int(done * len(grey) / max(total, 1)))
            out, _ = despeckle_volume(despeckler, grey, choice=self.slice_choice, batch_size=self._batch_size,
                                      progress=advance, cancel=self._cancel, gamma=self._gamma, blend=self._blend,
                                      grey_levels=self._grey_levels, refine=self._refine)
            self.done = len(grey)
            return finish_pixels(out, self._pixels, self._colour_out, self._colour_threshold)
        scale = despeckler.resolve_working_scale(grey, "auto")   # one factor for all frames, as one call
        limit = self._batch_size or len(grey)
        out, size = None, 1
        while self.done < len(grey):
            self.check_cancel()
            chunk = grey[self.done:self.done + size]
            tic = time.monotonic()
            denoised = despeckler.denoise(chunk, batch_size=len(chunk), gamma=self._gamma, blend=self._blend,
                                          working_scale=scale, grey_levels=self._grey_levels, refine=self._refine)
            if out is None:
                out = np.empty(grey.shape, dtype=denoised.dtype)
            out[self.done:self.done + len(chunk)] = denoised
            per_frame = max(time.monotonic() - tic, 1e-4) / len(chunk)
            self.batches.append(len(chunk))
            self.done += len(chunk)
            size = int(max(1, min(limit, self.seconds_per_batch / per_frame)))
        return finish_pixels(out, self._pixels, self._colour_out, self._colour_threshold)

    def store(self, output: np.ndarray) -> Any:
        result = self._store(output)
        self._logic.last_seconds = time.monotonic() - self.started
        return result


def prepare_job(logic, source, output_node=None, *, all_frames: bool = True, model=None,
                device: Optional[str] = None, batch_size: Optional[int] = None, gamma: Optional[float] = None,
                blend: float = 0.0, keep_colour: bool = False,
                colour_threshold: float = COLOUR_THRESHOLD, grey_levels: str = "auto",
                refine: str = "auto", slice_axis: str = "auto", uncertainty: bool = False,
                uncertainty_node=None) -> DespeckleJob:
    """Read ``source`` now (main thread) for a :class:`DespeckleJob` of ``logic``; ``slice_axis``: the
    plane of a 3D volume (Speckle2SelfLib.engine.volume_axes; a sequence's frames are its items).
    ``uncertainty`` (volumes): also the uncertainty map, into ``uncertainty_node`` (new when None),
    kept as ``logic.last_uncertainty_node``."""
    from ..engine.volume_axes import check_slice_axis, choose_volume_axis, record_on_node

    check_slice_axis(slice_axis)
    logic.last_uncertainty_node = None
    if uncertainty and means_sequence(source, all_frames):
        raise ValueError("the uncertainty map is made for volumes only, not yet for a whole sequence; "
                         "despeckle the sequence without it, or one frame (all frames off) with it")
    if uncertainty:
        check_uncertainty_node(uncertainty_node, source, output_node, slice_axis)
    options = dict(model=model, device=device, batch_size=batch_size, gamma=gamma, blend=blend,
                   colour_threshold=colour_threshold, grey_levels=check_grey_levels(grey_levels),
                   refine=check_refine(refine))
    if means_sequence(source, all_frames):
        src = SequenceSource.read(source, output_node, keep_colour)
        job: Optional[DespeckleJob] = None

        def store(result: np.ndarray) -> SequenceOutput:
            out = store_sequence(src, output_node, np.split(result, src.frames), logic.sequences_logic)
            return SequenceOutput(out[1], out[0], out[2], src.frames, time.monotonic() - job.started, out[3])

        job = DespeckleJob(logic, src.stacked, store, colour_out=src.colour_out, **options)
        return job
    volume = VolumeSource.read(source, output_node, keep_colour)
    choice = choose_volume_axis(volume.pixels.grey, slice_axis)

    def store_both(result: np.ndarray):
        out = record_on_node(store_volume(volume, output_node, result), choice)
        if uncertainty:
            logic.last_uncertainty_node = store_uncertainty(volume, uncertainty_node, job.uncertainty_maps, out)
        return out

    job = DespeckleJob(logic, volume.pixels, store_both, colour_out=volume.colour_out, slice_choice=choice,
                       uncertainty=uncertainty, **options)
    return job
