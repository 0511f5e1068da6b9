"""Despeckling volume and sequence nodes: reading the input, the background job, writing the outputs.

Volume node <-> numpy: a volume's voxels are read as a (K, J, I) stack, one 2D frame per
slice K (a single 2D image is K = 1), despeckled frame by frame by
:class:`~Speckle2SelfLib.engine.inference.Despeckler`, and written into a new (or given) volume
node with the input's geometry (IJK-to-RAS: origin, spacing, directions), parent transform and
window/level. RGB(-like) vector volumes are despeckled on their luminance; ``keep_colour``
keeps coloured pixels (e.g. a Doppler overlay) unchanged in an RGB output. A sequence (a
cine loop) gives a new sequence with the same index name, unit, type and values, added to
the browser that plays the input so that both are browsed frame by frame; its uncertainty maps
(``uncertainty=True``) are one more such sequence, played beside it.

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
                    play_as_proxy, primary_sequence, read_pixels, read_sequence_items, resolve_sequence, scene_of,
                    stack_items, write_voxels)

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
    uncertainty_node: Any = None   # with uncertainty=True: vtkMRMLSequenceNode of one map per input item
    uncertainty_proxy_node: Any = None   # the volume showing the browser's current map


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
    """ValueError unless a volume's uncertainty map can be written: a scalar volume node (or None: a
    new one) that is neither the input nor the output nor a sequence's proxy, and one slice plane
    (not "three"). A sequence's maps: :func:`sequence_map_target`."""
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
    shown = find_sequence(uncertainty_node)
    if shown is not None:
        raise ValueError(f"{display_name(uncertainty_node)} shows a frame of sequence {display_name(shown[0])}: its "
                         "browser would replace the map at its next step; choose another volume or create a new one")


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


@dataclass
class MapTarget:
    """Where a sequence's uncertainty maps go: the map sequence to refill and the volume that shows
    its current item in the input's browser (each None: made new)."""

    sequence: Any = None
    proxy: Any = None


@dataclass
class SequenceMaps:
    """A sequence's uncertainty maps, one float32 (K, J, I) array per item, and where they go."""

    per_item: List[np.ndarray]
    target: MapTarget


def sequence_map_target(uncertainty_node, src: SequenceSource, output_node) -> MapTarget:
    """Where a sequence's maps go, checked before any work: ``uncertainty_node`` None (a new map
    sequence), a sequence node, or the volume that shows one in the browser playing the input (what
    the module remembers); never the input's, the output's or the browser's primary sequence."""
    if uncertainty_node is None:
        return MapTarget()
    target = _map_target_of(uncertainty_node, src.browser)
    shown = find_sequence(output_node) if output_node is not None else None
    primary = primary_sequence(src.browser) if src.browser is not None else None
    if uncertainty_node is output_node or any(target.sequence is node for node in
                                              (src.sequence, shown[0] if shown else None, primary)):
        raise ValueError(f"the uncertainty maps need their own sequence; {display_name(uncertainty_node)} is (or "
                         "shows) the input, the output or the browser's primary sequence: choose another node or "
                         "create a new one")
    if target.proxy is not None and target.proxy.GetClassName() != "vtkMRMLScalarVolumeNode":
        raise ValueError(f"sequence {display_name(target.sequence)} is shown by {display_name(target.proxy)}, a "
                         f"{target.proxy.GetClassName()}; the maps are scalar volumes: choose another node or create "
                         "a new one")
    return target


def _map_target_of(node, browser) -> MapTarget:
    """A sequence node (with its proxy where ``browser`` plays it), or a volume ``browser`` shows."""
    import slicer

    if isinstance(node, slicer.vtkMRMLSequenceNode):
        played = browser is not None and browser.IsSynchronizedSequenceNode(node, True)
        return MapTarget(node, browser.GetProxyNode(node) if played else None)
    found = find_sequence(node)
    if found is None:
        raise ValueError(f"a sequence's uncertainty maps go into a sequence; {display_name(node)} is a "
                         f"{node.GetClassName()} that no browser shows: choose a sequence (or its proxy volume) or "
                         "create a new one")
    if found[1] is not browser:
        raise ValueError(f"{display_name(node)} shows sequence {display_name(found[0])} in browser "
                         f"{display_name(found[1])}, not in the one playing the input; choose another node or "
                         "create a new one")
    return MapTarget(found[0], node)


def store_sequence(src: SequenceSource, output_node, per_item: List[np.ndarray], sequences_logic=None,
                   progress: ProgressFn = None, cancel: CancelFn = None,
                   maps: Optional[SequenceMaps] = None) -> SequenceOutput:
    """Output sequence + proxy volume, played by the input's browser (or a new one), and with
    ``maps`` the uncertainty map sequence + proxy played beside them: all of them, or none when
    this fails or is cancelled (``seconds`` of the result is the caller's to set)."""
    n = len(per_item)
    sequence, browser, input_proxy = src.sequence, src.browser, src.input_proxy
    target = maps.target if maps is not None else MapTarget()
    check_still_in_scene(src.scene, sequence=sequence, browser=browser, proxy=input_proxy, output=output_node,
                         uncertainty=target.sequence, uncertainty_proxy=target.proxy)
    if sequence.GetNumberOfDataNodes() != n:
        raise ValueError(f"sequence {display_name(sequence)} changed from {n} to {sequence.GetNumberOfDataNodes()} "
                         "frames while it was despeckled; nothing was added, run it again")
    with CreatedNodes(src.scene) as created:
        if output_node is None:    # made first so that it gets the plain "<input> despeckled" name
            output_node = created.add(_volume_class(src.colour_out),
                                      output_name(input_proxy if input_proxy is not None else sequence))
        out_sequence = created.add("vtkMRMLSequenceNode", output_name(sequence) + SEQUENCE_SUFFIX)
        _copy_index(out_sequence, sequence)
        out_sequence.SetAttribute(SOURCE_ATTRIBUTE, sequence.GetID() or "")
        _fill_items(out_sequence, sequence, per_item, _volume_class(src.colour_out), OUTPUT_SUFFIX, progress, cancel)
        current = browser_item_number(browser, sequence) if browser is not None else None
        current = min(max(current or 0, 0), n - 1)
        _show_item(output_node, per_item[current], src, current)
        copy_display(input_proxy if input_proxy is not None else sequence.GetNthDataNode(0), output_node)
        created.track_display(output_node)
        made_browser = browser is None
        if made_browser:
            browser = created.add("vtkMRMLSequenceBrowserNode", output_name(sequence) + " browser")
        if src.replaced is not None:   # a rerun into the same output: the new frames take the old one's place
            browser.RemoveSynchronizedSequenceNode(src.replaced.GetID())
        _synchronise(browser, out_sequence, output_node, made_browser)
        result = SequenceOutput(out_sequence, output_node, browser, n, 0.0, made_browser)
        staged = _stage_maps(created, src, maps) if maps is not None else None
        # from here on earlier results are replaced (a given map sequence refilled, the output's
        # earlier sequence removed): only once everything new is in place
        if maps is not None:
            result.uncertainty_node, result.uncertainty_proxy_node = _commit_maps(
                created, src, browser, maps, *staged, out_sequence, current)
        if src.replaced is not None:
            name = src.replaced.GetName()
            src.scene.RemoveNode(src.replaced)
            out_sequence.SetName(name)
        if sequences_logic is not None:
            sequences_logic.UpdateProxyNodesFromSequences(browser)
        return result


def _copy_index(target, sequence) -> None:
    target.SetIndexName(sequence.GetIndexName())
    target.SetIndexUnit(sequence.GetIndexUnit())
    target.SetIndexType(sequence.GetIndexType())


def _fill_items(target, sequence, per_item: List[np.ndarray], class_name: str, suffix: str,
                progress: ProgressFn = None, cancel: CancelFn = None) -> None:
    """One ``class_name`` volume per input item into ``target``, at the item's index value, with its
    geometry; ``progress`` counts the items stored after the N despeckled (of 2 N)."""
    import slicer

    from ..engine.inference import Cancelled, _is_cancelled

    n = len(per_item)
    for i, voxels in enumerate(per_item):
        if _is_cancelled(cancel):
            raise Cancelled("despeckling cancelled")
        item = sequence.GetNthDataNode(i)
        frame = getattr(slicer, class_name)()
        frame.SetName(base_name(item, "frame") + suffix)
        write_voxels(frame, voxels)
        copy_geometry(item, frame)
        target.SetDataNodeAtValue(frame, sequence.GetNthIndexValue(i))
        if progress is not None:
            progress(n + i + 1, 2 * n)


def _show_item(proxy, voxels: np.ndarray, src: SequenceSource, current: int) -> None:
    """``proxy`` shows item ``current`` of a result: its voxels, with the input item's geometry."""
    write_voxels(proxy, voxels)
    copy_geometry(src.sequence.GetNthDataNode(current), proxy)
    # Sequence items are copies without scene references (vtkMRMLSequenceNode::CopyContent):
    # the parent transform (e.g. ImageToReference of tracked ultrasound) is the input proxy's.
    transform = src.input_proxy.GetParentTransformNode() if src.input_proxy is not None else None
    proxy.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)


def _stage_maps(created: CreatedNodes, src: SequenceSource, maps: SequenceMaps):
    """(new map sequence, proxy): one scalar volume per input item with its geometry, in a new
    sequence ("<input> uncertainty", or the given one's name, which it refills at the end:
    :func:`_commit_maps`), and a new proxy where none is given. Touches no existing node."""
    given = maps.target.sequence
    sequence = created.add("vtkMRMLSequenceNode", (given.GetName() if given is not None
                                                   else base_name(src.sequence) + UNCERTAINTY_SUFFIX))
    _copy_index(sequence, src.sequence)
    _fill_items(sequence, src.sequence, maps.per_item, "vtkMRMLScalarVolumeNode", UNCERTAINTY_SUFFIX)
    proxy = maps.target.proxy
    if proxy is None:    # named as the sequence it shows, as the Sequences module names proxies
        proxy = created.add("vtkMRMLScalarVolumeNode", sequence.GetName())
        proxy.SetName(sequence.GetName())
    return sequence, proxy


def _commit_maps(created: CreatedNodes, src: SequenceSource, browser, maps: SequenceMaps, staged, proxy,
                 out_sequence, current: int):
    """(map sequence, proxy) played by ``browser`` beside the output: the staged sequence, or the
    given one refilled from it (the staged one then leaves the scene)."""
    sequence = staged
    if maps.target.sequence is not None:
        sequence = maps.target.sequence
        sequence.RemoveAllDataNodes()
        _copy_index(sequence, staged)
        for i in range(staged.GetNumberOfDataNodes()):
            sequence.SetDataNodeAtValue(staged.GetNthDataNode(i), staged.GetNthIndexValue(i))
        created.nodes.remove(staged)
        src.scene.RemoveNode(staged)
    sequence.SetAttribute(UNCERTAINTY_OF_ATTRIBUTE, out_sequence.GetID())
    _show_item(proxy, maps.per_item[current], src, current)
    play_as_proxy(browser, sequence, proxy)
    return sequence, proxy


def is_map_of(uncertainty_node, output_node) -> bool:
    """Whether ``uncertainty_node`` is the uncertainty map of ``output_node``: a volume's map by its
    attribute; the proxy of a map sequence when its sequence is the map of the sequence that
    ``output_node`` shows (a browser's step rewrites a proxy's attributes, not a sequence's)."""
    if uncertainty_node is None or output_node is None:
        return False
    if uncertainty_node.GetAttribute(UNCERTAINTY_OF_ATTRIBUTE) == output_node.GetID():
        return True
    maps, output = find_sequence(uncertainty_node), find_sequence(output_node)
    return maps is not None and output is not None and \
        maps[0].GetAttribute(UNCERTAINTY_OF_ATTRIBUTE) == output[0].GetID()


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
    """Play ``out_sequence`` in ``browser`` (its primary sequence when the browser was made for it)
    with ``proxy`` as the node that shows its current item."""
    modifying = browser.StartModify()
    try:
        if made_browser:
            set_primary = getattr(browser, "SetAndObservePrimarySequenceNodeID", None) or \
                browser.SetAndObserveMasterSequenceNodeID
            set_primary(out_sequence.GetID())
        play_as_proxy(browser, out_sequence, proxy)
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
        self._uncertainty = uncertainty             # also keep the uncertainty maps
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
    ``uncertainty``: also the uncertainty map, into ``uncertainty_node`` (new when None), kept as
    ``logic.last_uncertainty_node``: a volume for a volume, a sequence of maps played beside the
    output for a sequence (:func:`sequence_map_target` says which nodes can take it)."""
    from ..engine.volume_axes import check_slice_axis

    check_slice_axis(slice_axis)
    logic.last_uncertainty_node = None
    options = dict(model=model, device=device, batch_size=batch_size, gamma=gamma, blend=blend,
                   colour_threshold=colour_threshold, grey_levels=check_grey_levels(grey_levels),
                   refine=check_refine(refine), uncertainty=uncertainty)
    if means_sequence(source, all_frames):
        return _sequence_job(logic, source, output_node, keep_colour, uncertainty_node, options)
    if uncertainty:
        check_uncertainty_node(uncertainty_node, source, output_node, slice_axis)
    return _volume_job(logic, source, output_node, keep_colour, slice_axis, uncertainty_node, options)


def _sequence_job(logic, source, output_node, keep_colour: bool, uncertainty_node, options: dict) -> DespeckleJob:
    src = SequenceSource.read(source, output_node, keep_colour)
    uncertainty = options["uncertainty"]
    target = sequence_map_target(uncertainty_node, src, output_node) if uncertainty else None
    job: Optional[DespeckleJob] = None

    def store(result: np.ndarray) -> SequenceOutput:
        maps = SequenceMaps(np.split(job.uncertainty_maps, src.frames), target) if uncertainty else None
        out = store_sequence(src, output_node, np.split(result, src.frames), logic.sequences_logic, maps=maps)
        out.seconds = time.monotonic() - job.started
        logic.last_uncertainty_node = out.uncertainty_node
        return out

    job = DespeckleJob(logic, src.stacked, store, colour_out=src.colour_out, **options)
    return job


def _volume_job(logic, source, output_node, keep_colour: bool, slice_axis: str, uncertainty_node,
                options: dict) -> DespeckleJob:
    from ..engine.volume_axes import choose_volume_axis, record_on_node

    volume = VolumeSource.read(source, output_node, keep_colour)
    choice = choose_volume_axis(volume.pixels.grey, slice_axis)
    job: Optional[DespeckleJob] = None

    def store_both(result: np.ndarray):
        out = record_on_node(store_volume(volume, output_node, result), choice)
        if options["uncertainty"]:
            logic.last_uncertainty_node = store_uncertainty(volume, uncertainty_node, job.uncertainty_maps, out)
        return out

    job = DespeckleJob(logic, volume.pixels, store_both, colour_out=volume.colour_out, slice_choice=choice, **options)
    return job
