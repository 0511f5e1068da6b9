"""Despeckle volume and sequence nodes of an MRML scene (the Slicer side of the engine).

Volume node <-> numpy: a volume's voxels are read as a (K, J, I) stack, one 2D frame per
slice K (a single 2D image is K = 1), despeckled frame by frame by
:class:`~Speckle2SelfLib.inference.Despeckler`, and written into a new (or given) volume node
with the input's geometry (IJK-to-RAS: origin, spacing, directions), parent transform and
window/level. RGB(-like) vector volumes are despeckled on their luminance; ``keep_colour``
keeps coloured pixels (e.g. a Doppler overlay) unchanged in an RGB output. A sequence (a
cine loop) gives a new sequence with the same index name, unit, type and values, added to
the browser that plays the input so that both are browsed frame by frame.

Console API (Slicer's Python console)::

    from Speckle2SelfLib.mrml import despeckle_node
    out = despeckle_node(slicer.util.getNode('US'))                  # a volume -> "US despeckled"
    out = despeckle_node(getNode('US'), all_frames=True)              # every frame of US's sequence
    out = despeckle_node(getNode('Image_Image'), keep_colour=True)   # RGB with Doppler colours kept
    out = despeckle_node(getNode('US'), model='/path/model.pt', device='cpu', blend=0.2)

For repeated calls keep one :class:`DespeckleLogic` (it keeps the loaded model)::

    from Speckle2SelfLib.mrml import DespeckleLogic
    logic = DespeckleLogic(device='cuda')
    out = logic.despeckle_volume(getNode('US'), progress=lambda done, total: print(done, total))
    result = logic.despeckle_sequence(getNode('Sequence'))   # -> SequenceOutput

The input node is never modified. When the work is cancelled or fails, every node the call
created is removed again, so the scene is left as it was. This module needs slicer-core's
MRML classes (``import slicer``, ``vtk``) only; it never imports Qt or ``slicer.app``, so it
runs headless. To keep a GUI responsive, :meth:`DespeckleLogic.prepare_job` reads the frames
on the main thread and gives a :class:`DespeckleJob` that despeckles them in a worker thread
(numpy/torch only) in batches of about half a second; the Slicer module polls it from a
QTimer, which writes the result into the scene on the main thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .imageio import to_luminance

OUTPUT_SUFFIX = " despeckled"
SEQUENCE_SUFFIX = " sequence"
#: Attribute of an output sequence naming the input sequence's node ID (a rerun replaces it).
SOURCE_ATTRIBUTE = "Speckle2Self.SourceSequence"
#: A pixel counts as coloured when max - min over its R, G, B exceeds this fraction of the
#: full grey range (255 for 8-bit); JPEG chroma noise on grey pixels stays well below it.
COLOUR_THRESHOLD = 0.08

ProgressFn = Optional[Callable[[int, int], None]]
CancelFn = Optional[Callable[[], bool]]


@dataclass
class SequenceOutput:
    """What :meth:`DespeckleLogic.despeckle_sequence` added to the scene."""

    sequence_node: Any            # vtkMRMLSequenceNode with one despeckled volume per input item
    proxy_node: Any               # volume node showing the browser's current output frame
    browser_node: Any             # vtkMRMLSequenceBrowserNode playing input and output together
    frames: int
    seconds: float
    created_browser: bool = False  # no browser played the input, so a new one was made


@dataclass
class _Pixels:
    """Voxels of one volume node as frames, and what is needed to write a result like it."""

    grey: np.ndarray                      # (K, J, I), the dtype the network sees
    rgb: Optional[np.ndarray] = None      # (K, J, I, 3) for colour input
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))  # voxel dtype of the input


# ----------------------------------------------------------------------------- volume <-> numpy

def volume_to_array(volume_node) -> np.ndarray:
    """(K, J, I) grey copy of a scalar volume, or (K, J, I, 3) of an RGB vector volume."""
    pixels = _read_pixels(volume_node)
    return pixels.rgb.copy() if pixels.rgb is not None else pixels.grey.copy()


def array_to_volume(array: np.ndarray, like_node, output_node=None, name: Optional[str] = None):
    """Write (K, J, I) grey or (K, J, I, 3) colour voxels into ``output_node`` (a new volume in
    ``like_node``'s scene when None) with ``like_node``'s geometry and display settings."""
    array = np.asarray(array)
    colour = array.ndim == 4
    if array.ndim not in (3, 4) or (colour and array.shape[-1] != 3):
        raise ValueError(f"expected (K, J, I) grey or (K, J, I, 3) RGB voxels, got shape {array.shape}")
    scene = like_node.GetScene()
    created = output_node is None
    if created:
        output_node = _add_node(scene, _volume_class(colour), name or _output_name(like_node))
    _check_output_class(output_node, colour)
    _write_voxels(output_node, array)
    _copy_geometry(like_node, output_node)
    if output_node.GetScene() is not None:
        _copy_display(like_node, output_node)
    return output_node


def _read_pixels(node) -> _Pixels:
    """Validate a volume node and read its voxels (a copy: the input is never touched)."""
    from vtk.util import numpy_support

    _check_volume_node(node)
    image = node.GetImageData()
    dims = image.GetDimensions()
    if min(dims) <= 0 or image.GetNumberOfPoints() == 0:
        raise ValueError(f"{_name(node)} is an empty image ({dims[0]}x{dims[1]}x{dims[2]} voxels); "
                         "load an image into it first")
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise ValueError(f"{_name(node)} has no voxel values; load an image into it first")
    if dims[2] > 1 and min(dims[:2]) == 1:
        raise ValueError(f"{_name(node)} is {dims[0]}x{dims[1]}x{dims[2]} voxels: its image plane is not the IJ "
                         "plane that frames are read from; reslice it (Resample Scalar/Vector/DWI Volume) first")
    components = scalars.GetNumberOfComponents()
    if scalars.GetNumberOfTuples() != dims[0] * dims[1] * dims[2]:
        raise ValueError(f"{_name(node)} has {scalars.GetNumberOfTuples()} voxel values for {dims[0]}x{dims[1]}x"
                         f"{dims[2]} voxels; its image data is inconsistent, reload it")
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0], components).copy()
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise ValueError(f"{_name(node)} has NaN or infinite voxel values; replace them first (e.g. with "
                         "Threshold Scalar Volume or numpy.nan_to_num)")
    if voxels.dtype.kind not in "uif":
        raise ValueError(f"{_name(node)} has voxels of type {voxels.dtype}; only integer or float intensities")
    if components == 1:
        return _Pixels(voxels[..., 0], None, voxels.dtype)
    if components == 3:
        return _Pixels(to_luminance(voxels), voxels, voxels.dtype)
    raise ValueError(f"{_name(node)} has {components}-component voxels; only grey (1) or RGB (3) volumes can "
                     "be despeckled. Convert it first (Vector to Scalar Volume module, or drop the alpha "
                     "channel of RGBA)")


def check_still_in_scene(scene, **nodes) -> None:
    """Refuse to store results when a node of the call left the scene while it ran (the user
    deleted it, or closed the scene): nothing is added, the scene stays as the user left it."""
    for role, node in nodes.items():
        if node is not None and (node.GetScene() is not scene or not scene.IsNodePresent(node)):
            raise ValueError(f"the {role} node {_name(node)} was removed from the scene while it was despeckled; "
                             "nothing was added to the scene")


def _check_volume_node(node) -> None:
    import slicer

    if node is None:
        raise ValueError("no input volume given; select a grey or RGB volume node")
    if isinstance(node, slicer.vtkMRMLLabelMapVolumeNode):
        raise ValueError(f"{_name(node)} is a label map (segment labels, not an image); despeckle the "
                         "ultrasound image it was made from")
    if not isinstance(node, slicer.vtkMRMLVolumeNode):
        raise ValueError(f"{_name(node)} is a {node.GetClassName()}, not a volume; give a scalar or RGB "
                         "vector volume node (or a sequence node to despeckle every frame)")
    if node.GetImageData() is None:
        raise ValueError(f"{_name(node)} has no image data; load an image into it first")


def _write_voxels(volume_node, array: np.ndarray) -> None:
    import vtk
    from vtk.util import numpy_support

    k, j, i = array.shape[:3]
    components = array.shape[3] if array.ndim == 4 else 1
    flat = np.ascontiguousarray(array).reshape(-1, components)
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    volume_node.SetAndObserveImageData(image)


def _copy_geometry(source, target) -> None:
    """IJK-to-RAS (origin, spacing, directions) and the parent transform."""
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(ijk_to_ras)
    target.SetIJKToRASMatrix(ijk_to_ras)
    parent = source.GetParentTransformNode() if source.GetScene() is not None else None
    if parent is not None and target.GetScene() is not None:
        target.SetAndObserveTransformNodeID(parent.GetID())


def _copy_display(source, target) -> None:
    """Give ``target`` a display node that shows it like ``source`` (window/level, colours)."""
    import slicer

    if target.GetDisplayNode() is None:
        target.CreateDefaultDisplayNodes()
    shown, display = source.GetDisplayNode(), target.GetDisplayNode()
    if display is None or shown is None:
        return
    display.SetInterpolate(shown.GetInterpolate())
    if isinstance(display, slicer.vtkMRMLVectorVolumeDisplayNode):
        return    # RGB output is shown as colours, like the input
    if isinstance(shown, slicer.vtkMRMLVectorVolumeDisplayNode):
        # The RGB input is shown unscaled, so show its grey version over the full 8-bit range.
        low, high = _dtype_range(target)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(low, high)
        return
    if shown.GetColorNodeID():
        display.SetAndObserveColorNodeID(shown.GetColorNodeID())
    if shown.GetAutoWindowLevel() or shown.GetWindow() <= 0:
        display.AutoWindowLevelOn()
    else:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(shown.GetWindow(), shown.GetLevel())


def _dtype_range(volume_node) -> Tuple[float, float]:
    image = volume_node.GetImageData()
    if image.GetScalarType() in (3, 15):          # VTK_UNSIGNED_CHAR, VTK_SIGNED_CHAR
        return (0.0, 255.0) if image.GetScalarType() == 3 else (-128.0, 127.0)
    return tuple(image.GetScalarRange())


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Float results back to the input's voxel type (rounded and clipped for integers)."""
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


def _keep_colour(rgb: np.ndarray, grey: np.ndarray, threshold: float) -> np.ndarray:
    """RGB output: despeckled grey everywhere except coloured input pixels (Doppler, annotations)."""
    spread = rgb.max(axis=-1).astype(np.float64) - rgb.min(axis=-1)
    full_scale = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else float(np.ptp(rgb)) or 1.0
    coloured = spread > threshold * full_scale
    out = np.repeat(grey[..., None], 3, axis=-1)
    out[coloured] = rgb[coloured]
    return out


# ----------------------------------------------------------------------------- the logic

class DespeckleLogic:
    """Despeckle volume and sequence nodes; no GUI. Keeps the last loaded model for reuse.

    ``model``: None (the bundled default model), a bundled model's name, a model file path, or
    a :class:`~Speckle2SelfLib.inference.Despeckler`. ``sequences_logic``: Slicer's
    vtkSlicerSequencesLogic, used to refresh proxy nodes after a sequence is added (optional:
    the output proxy is filled here as well).
    """

    def __init__(self, model=None, device: str = "auto", sequences_logic=None):
        self.model = model
        self.device = device
        self.sequences_logic = sequences_logic
        self.backend = "auto"        # CPU inference path (Speckle2SelfLib.backends)
        self._despeckler = None
        self._despeckler_key: Optional[Tuple[str, str, str]] = None
        self.last_seconds = 0.0      # duration of the last successful call (despeckling + writing)

    def despeckler(self, model=None, device: Optional[str] = None):
        """The Despeckler for ``model`` on ``device`` (defaults: the logic's), loaded once."""
        from .inference import Despeckler

        model = self.model if model is None else model
        if isinstance(model, Despeckler):
            return model
        device = device or self.device
        key = (str(model), device, self.backend)
        if self._despeckler is None or self._despeckler_key != key:
            self._despeckler = Despeckler.from_file(None if model is None else str(model), device, self.backend)
            self._despeckler_key = key
        return self._despeckler

    # ------------------------------------------------------------------ volumes
    def despeckle_volume(self, input_node, output_node=None, *, model=None, device: Optional[str] = None,
                         batch_size: Optional[int] = None, gamma: Optional[float] = None, blend: float = 0.0,
                         keep_colour: bool = False, colour_threshold: float = COLOUR_THRESHOLD,
                         progress: ProgressFn = None, cancel: CancelFn = None):
        """Despeckle every slice (frame) of a volume into ``output_node`` (new when None).

        Returns the output volume node: grey scalar, or RGB vector with ``keep_colour`` for an
        RGB input. Raises Cancelled (scene unchanged) when ``cancel()`` turns true.
        """
        scene = _scene_of(input_node)
        pixels = _read_pixels(input_node)
        colour_out = keep_colour and pixels.rgb is not None
        _check_output_node(output_node, input_node, colour_out)
        despeckler = self.despeckler(model, device)
        started = time.monotonic()
        result = self._despeckle_pixels(despeckler, pixels, colour_out, colour_threshold, batch_size, gamma, blend,
                                        progress, cancel)
        output_node = self._store_volume(scene, input_node, output_node, result, colour_out)
        self.last_seconds = time.monotonic() - started
        return output_node

    @staticmethod
    def _store_volume(scene, input_node, output_node, result: np.ndarray, colour_out: bool):
        """Write despeckled voxels into ``output_node`` (new when None) like ``input_node``."""
        check_still_in_scene(scene, input=input_node, output=output_node)
        with _CreatedNodes(scene) as created:
            if output_node is None:
                output_node = created.add(_volume_class(colour_out), _output_name(input_node))
            _write_voxels(output_node, result)
            _copy_geometry(input_node, output_node)
            _copy_display(input_node, output_node)
            created.track_display(output_node)
        return output_node

    @staticmethod
    def _despeckle_pixels(despeckler, pixels: _Pixels, colour_out: bool, colour_threshold: float, batch_size,
                          gamma, blend, progress: ProgressFn, cancel: CancelFn) -> np.ndarray:
        grey = despeckler.denoise(pixels.grey, batch_size=batch_size, progress=progress, cancel=cancel,
                                  gamma=gamma, blend=blend)
        grey = _cast_like(grey, pixels.dtype)
        if colour_out:
            return _keep_colour(pixels.rgb, grey, colour_threshold)
        return grey

    def prepare_job(self, source, output_node=None, **options) -> "DespeckleJob":
        """Read ``source`` (a volume; with ``all_frames`` (default) a sequence proxy's whole
        sequence, or a sequence / browser node) now, on the main thread, for a
        :class:`DespeckleJob` that despeckles it in a worker thread. ``options``: all_frames,
        model, device, batch_size (the most frames per batch), gamma, blend, keep_colour,
        colour_threshold."""
        return _prepare_job(self, source, output_node, **options)

    # ------------------------------------------------------------------ sequences
    def despeckle_sequence(self, source, output_node=None, *, model=None, device: Optional[str] = None,
                           batch_size: Optional[int] = None, gamma: Optional[float] = None, blend: float = 0.0,
                           keep_colour: bool = False, colour_threshold: float = COLOUR_THRESHOLD,
                           progress: ProgressFn = None, cancel: CancelFn = None) -> SequenceOutput:
        """Despeckle every item of a sequence of volumes into a new sequence node.

        ``source``: a vtkMRMLSequenceNode, a vtkMRMLSequenceBrowserNode (its first sequence of
        volumes) or a proxy volume node shown by a browser. The output sequence has the input's
        index name, unit, type and values; it is added to the browser that plays the input (a
        new browser when none does), with ``output_node`` (new when None) as its proxy.
        ``progress(done, total)`` counts frames despeckled, then frames stored (total = 2 N).
        """
        src = _SequenceSource.read(source, output_node, keep_colour)
        scene, sequence, browser, input_proxy = src.scene, src.sequence, src.browser, src.input_proxy
        colour_out, replaced, n, stacked = src.colour_out, src.replaced, src.frames, src.stacked
        despeckler = self.despeckler(model, device)
        started = time.monotonic()
        result = self._despeckle_pixels(despeckler, stacked, colour_out, colour_threshold, batch_size, gamma, blend,
                                        _scaled_progress(progress, 2 * n, stacked.grey.shape[0], n), cancel)
        output_node, out_sequence, browser, made_browser = self._store_checked_sequence(
            scene, sequence, browser, input_proxy, output_node, replaced, np.split(result, n), colour_out,
            progress, cancel)
        seconds = time.monotonic() - started
        self.last_seconds = seconds
        return SequenceOutput(out_sequence, output_node, browser, n, seconds, made_browser)

    def _store_checked_sequence(self, scene, sequence, browser, input_proxy, output_node, replaced,
                                per_item: List[np.ndarray], colour_out: bool, progress: ProgressFn, cancel: CancelFn):
        n = len(per_item)
        check_still_in_scene(scene, sequence=sequence, browser=browser, proxy=input_proxy, output=output_node)
        if sequence.GetNumberOfDataNodes() != n:
            raise ValueError(f"sequence {_name(sequence)} changed from {n} to {sequence.GetNumberOfDataNodes()} "
                             "frames while it was despeckled; nothing was added, run it again")
        with _CreatedNodes(scene) as created:
            return self._store_sequence(created, sequence, browser, input_proxy, output_node, replaced, per_item,
                                        colour_out, progress, cancel)

    def _store_sequence(self, created: "_CreatedNodes", sequence, browser, input_proxy, output_node, replaced,
                        per_item: List[np.ndarray], colour_out: bool, progress: ProgressFn, cancel: CancelFn):
        """Output sequence + proxy volume, played by the input's browser (or a new one)."""
        scene, n = created.scene, len(per_item)
        if output_node is None:    # made first so that it gets the plain "<input> despeckled" name
            named_after = input_proxy if input_proxy is not None else sequence
            output_node = created.add(_volume_class(colour_out), _output_name(named_after))
        out_sequence = created.add("vtkMRMLSequenceNode", _output_name(sequence) + SEQUENCE_SUFFIX)
        _fill_sequence(out_sequence, sequence, per_item, colour_out, progress, cancel, n)
        current = browser_item_number(browser, sequence) if browser is not None else None
        current = min(max(current or 0, 0), n - 1)
        _write_voxels(output_node, per_item[current])
        _copy_geometry(sequence.GetNthDataNode(current), output_node)
        # Sequence items are copies without scene references (vtkMRMLSequenceNode::CopyContent):
        # the parent transform (e.g. ImageToReference of tracked ultrasound) is the input proxy's.
        transform = input_proxy.GetParentTransformNode() if input_proxy is not None else None
        if transform is not None:
            output_node.SetAndObserveTransformNodeID(transform.GetID())
        _copy_display(input_proxy if input_proxy is not None else sequence.GetNthDataNode(0), output_node)
        created.track_display(output_node)
        made_browser = browser is None
        if made_browser:
            browser = created.add("vtkMRMLSequenceBrowserNode", _output_name(sequence) + " browser")
        if replaced is not None:   # a rerun into the same output: the new frames take the old one's place
            browser.RemoveSynchronizedSequenceNode(replaced.GetID())
        _synchronise(browser, out_sequence, output_node, made_browser)
        if replaced is not None:
            name = replaced.GetName()
            scene.RemoveNode(replaced)
            out_sequence.SetName(name)
        if self.sequences_logic is not None:
            self.sequences_logic.UpdateProxyNodesFromSequences(browser)
        return output_node, out_sequence, browser, made_browser


# ----------------------------------------------------------------------------- background job

@dataclass
class JobState:
    """What :meth:`DespeckleJob.poll` reports: frames done of total, and how the job ended."""

    done: int
    total: int
    running: bool                      # the worker thread is still computing
    finished: bool = False             # results were written into the scene (``result``)
    cancelled: bool = False            # cancelled: nothing was added to the scene
    error: Optional[BaseException] = None
    result: Any = None                 # output volume node, or SequenceOutput for a sequence


class DespeckleJob:
    """Despeckle in a worker thread that never touches MRML (GUI: poll from a QTimer).

    Made by :meth:`DespeckleLogic.prepare_job` on the main thread, which reads the voxels to
    numpy. :meth:`start` runs the model (loading included) in a Python thread, in batches of
    about :attr:`seconds_per_batch` of work each (the first is a single frame that times the
    model), so progress moves and :meth:`cancel` takes effect within about that time.
    :meth:`poll`, called on the main thread, reports progress and, once the thread is done,
    writes the result into the scene (so MRML is only ever used on the caller's thread)::

        job = logic.prepare_job(volume_node)     # main thread: read frames
        job.start()                              # worker thread: despeckle
        state = job.poll()                       # main thread, e.g. every 100 ms
    """

    seconds_per_batch = 0.5

    def __init__(self, logic: "DespeckleLogic", pixels: _Pixels, store: Callable[[np.ndarray], Any], *,
                 colour_out: bool, colour_threshold: float, model, device, batch_size, gamma, blend):
        import threading

        self._logic, self._pixels, self._store = logic, pixels, store
        self._colour_out, self._colour_threshold = colour_out, colour_threshold
        self._model, self._device, self._batch_size = model, device, batch_size
        self._gamma, self._blend = gamma, blend
        self._cancel = threading.Event()
        self._thread = None
        self._done, self._total = 0, int(pixels.grey.shape[0])
        self._output: Optional[np.ndarray] = None
        self._error: Optional[BaseException] = None
        self._state: Optional[JobState] = None      # the final state, once reported
        self.batches: List[int] = []                # frames per batch, in order (for tests and logs)
        self.started = 0.0

    @property
    def total(self) -> int:
        return self._total

    def start(self):
        """Start the worker thread (once); returns it."""
        import threading

        if self._thread is not None:
            raise RuntimeError("this despeckling job was started already")
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="Speckle2Self despeckling", daemon=True)
        self._thread.start()
        return self._thread

    def cancel(self) -> None:
        """Stop after the current batch; the scene is left as it was."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the worker thread (tests, scripts); True when it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is not None and not self._thread.is_alive()

    def poll(self) -> JobState:
        """Progress now; once the worker is done, store the result in the scene (call this on the
        thread that owns the scene). The final state is reported again on later calls."""
        from .inference import Cancelled

        if self._state is not None:
            return self._state
        if self._thread is None or self._thread.is_alive():
            return JobState(self._done, self._total, self._thread is not None)
        if self._error is None and self._cancel.is_set():
            self._error = Cancelled("despeckling cancelled")
        if self._error is not None:
            self._state = JobState(self._done, self._total, False, cancelled=isinstance(self._error, Cancelled),
                                   error=None if isinstance(self._error, Cancelled) else self._error)
            return self._state
        try:
            result = self._store(self._output)
        except Exception as err:       # e.g. the input was deleted meanwhile: nothing was added
            self._state = JobState(self._done, self._total, False, error=err)
            return self._state
        self._logic.last_seconds = time.monotonic() - self.started
        self._state = JobState(self._total, self._total, False, finished=True, result=result)
        return self._state

    def _work(self) -> None:
        """Worker thread: numpy and torch only."""
        from .inference import Cancelled

        try:
            despeckler = self._logic.despeckler(self._model, self._device)
            grey = self._pixels.grey
            scale = despeckler.resolve_working_scale(grey, "auto")   # one factor for all frames, as one call
            limit = self._batch_size or len(grey)
            out, size = None, 1
            while self._done < len(grey):
                if self._cancel.is_set():
                    raise Cancelled("despeckling cancelled")
                chunk = grey[self._done:self._done + size]
                tic = time.monotonic()
                denoised = despeckler.denoise(chunk, batch_size=len(chunk), gamma=self._gamma, blend=self._blend,
                                              working_scale=scale)
                if out is None:
                    out = np.empty(grey.shape, dtype=denoised.dtype)
                out[self._done:self._done + len(chunk)] = denoised
                per_frame = max(time.monotonic() - tic, 1e-4) / len(chunk)
                self.batches.append(len(chunk))
                self._done += len(chunk)
                size = int(max(1, min(limit, self.seconds_per_batch / per_frame)))
            result = _cast_like(out, self._pixels.dtype)
            if self._colour_out:
                result = _keep_colour(self._pixels.rgb, result, self._colour_threshold)
            self._output = result
        except BaseException as err:      # reported by poll() on the main thread
            self._error = err


def _prepare_job(logic: "DespeckleLogic", source, output_node=None, *, all_frames: bool = True, model=None,
                 device: Optional[str] = None, batch_size: Optional[int] = None, gamma: Optional[float] = None,
                 blend: float = 0.0, keep_colour: bool = False,
                 colour_threshold: float = COLOUR_THRESHOLD) -> DespeckleJob:
    import slicer

    options = dict(model=model, device=device, batch_size=batch_size, gamma=gamma, blend=blend,
                   colour_threshold=colour_threshold)
    is_sequence = isinstance(source, (slicer.vtkMRMLSequenceNode, slicer.vtkMRMLSequenceBrowserNode))
    if is_sequence or (all_frames and find_sequence(source) is not None):
        src = _SequenceSource.read(source, output_node, keep_colour)
        job: Optional[DespeckleJob] = None

        def store_sequence(result: np.ndarray) -> SequenceOutput:
            out = logic._store_checked_sequence(src.scene, src.sequence, src.browser, src.input_proxy, output_node,
                                                src.replaced, np.split(result, src.frames), src.colour_out, None, None)
            return SequenceOutput(out[1], out[0], out[2], src.frames, time.monotonic() - job.started, out[3])

        job = DespeckleJob(logic, src.stacked, store_sequence, colour_out=src.colour_out, **options)
        return job
    scene = _scene_of(source)
    pixels = _read_pixels(source)
    colour_out = keep_colour and pixels.rgb is not None
    _check_output_node(output_node, source, colour_out)
    return DespeckleJob(logic, pixels,
                        lambda result: logic._store_volume(scene, source, output_node, result, colour_out),
                        colour_out=colour_out, **options)


# ----------------------------------------------------------------------------- sequence helpers

@dataclass
class _SequenceSource:
    """A sequence input read on the main thread and checked against the output node: what both
    the blocking call and the background job need before any computation."""
    scene: Any
    sequence: Any
    browser: Any
    input_proxy: Any
    colour_out: bool
    replaced: Any
    frames: int
    stacked: "_Pixels"

    @classmethod
    def read(cls, source, output_node, keep_colour: bool) -> "_SequenceSource":
        sequence, browser, input_proxy = resolve_sequence(source)
        scene = _scene_of(sequence)
        items = _read_sequence_items(sequence)
        colour_out = keep_colour and items[0].rgb is not None
        _check_output_node(output_node, input_proxy, colour_out)
        replaced = _earlier_result(output_node, browser, sequence)
        stacked = _Pixels(np.concatenate([p.grey for p in items]),
                          None if items[0].rgb is None else np.concatenate([p.rgb for p in items]), items[0].dtype)
        return cls(scene, sequence, browser, input_proxy, colour_out, replaced, len(items), stacked)


def resolve_sequence(source) -> Tuple[Any, Any, Any]:
    """(sequence node, browser node or None, proxy volume or None) for a sequence, browser or proxy."""
    import slicer

    if source is None:
        raise ValueError("no input given; select a sequence, a sequence browser or a volume shown by one")
    scene = source.GetScene()
    if isinstance(source, slicer.vtkMRMLSequenceNode):
        browser = _first_browser(scene, lambda b: b.IsSynchronizedSequenceNode(source, True))
        return source, browser, browser.GetProxyNode(source) if browser is not None else None
    if isinstance(source, slicer.vtkMRMLSequenceBrowserNode):
        sequence = _volume_sequence_of_browser(source)
        return sequence, source, source.GetProxyNode(sequence)
    found = find_sequence(source)
    if found is None:
        raise ValueError(f"{_name(source)} is not shown by a sequence browser (not a sequence proxy); "
                         "despeckle it as a single volume, or give its sequence node")
    sequence, browser = found
    return sequence, browser, source


def browser_item_number(browser, sequence) -> Optional[int]:
    """Item number of ``sequence`` that ``browser`` shows now: matched by the index value of
    the browser's primary sequence (the selected item number counts the primary sequence's
    items, which need not be ``sequence``'s), None when ``sequence`` has no such item."""
    if browser is None or sequence is None or sequence.GetNumberOfDataNodes() == 0:
        return None
    get_primary = getattr(browser, "GetPrimarySequenceNode", None) or browser.GetMasterSequenceNode
    primary, selected = get_primary(), browser.GetSelectedItemNumber()
    if primary is None or not 0 <= selected < primary.GetNumberOfDataNodes():
        return None
    if primary is sequence:
        return selected
    value = primary.GetNthIndexValue(selected)
    numeric = sequence.GetIndexType() == sequence.NumericIndex and primary.GetIndexType() == primary.NumericIndex
    item = sequence.GetItemNumberFromIndexValue(value, not numeric)   # numeric: the item at or before it
    return item if 0 <= item < sequence.GetNumberOfDataNodes() else None


def find_sequence(volume_node) -> Optional[Tuple[Any, Any]]:
    """(sequence, browser) when ``volume_node`` is the proxy of a sequence of volumes, else None."""
    import slicer

    scene = volume_node.GetScene() if volume_node is not None else None
    if scene is None or not isinstance(volume_node, slicer.vtkMRMLVolumeNode):
        return None
    browser = _first_browser(scene, lambda b: b.GetSequenceNode(volume_node) is not None)
    return None if browser is None else (browser.GetSequenceNode(volume_node), browser)


def _first_browser(scene, accept):
    if scene is None:
        return None
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    browsers.UnRegister(None)   # GetNodesByClass hands over a reference (as slicer.util.getNodesByClass does)
    for i in range(browsers.GetNumberOfItems()):
        browser = browsers.GetItemAsObject(i)
        if accept(browser):
            return browser
    return None


def _volume_sequence_of_browser(browser):
    import vtk

    found = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(found, True)
    sequences = [found.GetItemAsObject(i) for i in range(found.GetNumberOfItems())]
    for sequence in sequences:
        item = sequence.GetNthDataNode(0) if sequence.GetNumberOfDataNodes() else None
        if item is not None and item.IsA("vtkMRMLVolumeNode") and not item.IsA("vtkMRMLLabelMapVolumeNode"):
            return sequence
    raise ValueError(f"browser {_name(browser)} plays no sequence of image volumes; give a sequence of volumes")


def _read_sequence_items(sequence) -> List[_Pixels]:
    count = sequence.GetNumberOfDataNodes()
    if count == 0:
        raise ValueError(f"sequence {_name(sequence)} has no frames; record or load frames first")
    items: List[_Pixels] = []
    for i in range(count):
        node = sequence.GetNthDataNode(i)
        try:
            pixels = _read_pixels(node)
        except ValueError as err:
            raise ValueError(f"sequence {_name(sequence)} item {i}: {err}") from err
        if items and (pixels.grey.shape != items[0].grey.shape or (pixels.rgb is None) != (items[0].rgb is None)):
            raise ValueError(f"sequence {_name(sequence)} mixes frame sizes or types: item {i} is "
                             f"{_describe(pixels)}, item 0 is {_describe(items[0])}; despeckle such frames as "
                             "separate volumes or resample them to one size first")
        items.append(pixels)
    return items


def _describe(pixels: _Pixels) -> str:
    k, j, i = pixels.grey.shape
    kind = "RGB" if pixels.rgb is not None else "grey"
    return f"{i}x{j}" + (f"x{k}" if k > 1 else "") + f" {kind}"


def _fill_sequence(out_sequence, sequence, per_item: List[np.ndarray], colour_out: bool,
                   progress: ProgressFn, cancel: CancelFn, n: int) -> None:
    """One output volume per input item, at the same index value, with the item's geometry."""
    import slicer

    from .inference import Cancelled, _is_cancelled

    out_sequence.SetIndexName(sequence.GetIndexName())
    out_sequence.SetIndexUnit(sequence.GetIndexUnit())
    out_sequence.SetIndexType(sequence.GetIndexType())
    out_sequence.SetAttribute(SOURCE_ATTRIBUTE, sequence.GetID() or "")
    for i, voxels in enumerate(per_item):
        if _is_cancelled(cancel):
            raise Cancelled("despeckling cancelled")
        item = sequence.GetNthDataNode(i)
        frame = getattr(slicer, _volume_class(colour_out))()
        frame.SetName((item.GetName() or "frame") + OUTPUT_SUFFIX)
        _write_voxels(frame, voxels)
        _copy_geometry(item, frame)
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
        raise ValueError(f"{_name(output_node)} already shows sequence {_name(shown)}; choose a new output volume")
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


def _scaled_progress(progress: ProgressFn, total: int, frames: int, n: int) -> ProgressFn:
    """Map the engine's (done, frames) onto the first half of a 2N-step progress (N items)."""
    if progress is None:
        return None
    return lambda done, _frames: progress(int(round(done * n / frames)), total)


# ----------------------------------------------------------------------------- scene bookkeeping

class _CreatedNodes:
    """Nodes added by one call; on any exception they are removed again (scene as it was)."""

    def __init__(self, scene):
        self.scene = scene
        self.nodes: list = []

    def add(self, class_name: str, name: str):
        node = _add_node(self.scene, class_name, name)
        self.nodes.append(node)
        return node

    def track_display(self, node) -> None:
        if node in self.nodes:
            self.nodes.extend(node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes()))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        for node in reversed(self.nodes):
            if node is not None and node.GetScene() is self.scene:
                display_nodes = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
                    if hasattr(node, "GetNumberOfDisplayNodes") else []
                self.scene.RemoveNode(node)
                for display in display_nodes:
                    if display is not None and display.GetScene() is self.scene:
                        self.scene.RemoveNode(display)
        return False


def _add_node(scene, class_name: str, name: str):
    import slicer

    if scene is None:
        raise ValueError("the input node is not in an MRML scene; add it to a scene first")
    unique = scene.GenerateUniqueName(name)
    node = scene.AddNewNodeByClass(class_name, unique)
    if node is None:      # class not registered in this scene (e.g. no Sequences logic): add it directly
        node = getattr(slicer, class_name)()
        node.SetName(unique)
        scene.AddNode(node)
    return node


def _scene_of(node):
    scene = node.GetScene() if node is not None and hasattr(node, "GetScene") else None
    if scene is None:
        raise ValueError(f"{_name(node)} is not in an MRML scene; add it to a scene first")
    return scene


def _volume_class(colour: bool) -> str:
    return "vtkMRMLVectorVolumeNode" if colour else "vtkMRMLScalarVolumeNode"


def _check_output_class(output_node, colour: bool) -> None:
    import slicer

    if output_node is None:
        return
    if isinstance(output_node, slicer.vtkMRMLLabelMapVolumeNode) or \
            not isinstance(output_node, slicer.vtkMRMLScalarVolumeNode):
        raise ValueError(f"output {_name(output_node)} is a {output_node.GetClassName()}; choose a scalar volume "
                         "or create a new volume")
    is_vector = isinstance(output_node, slicer.vtkMRMLVectorVolumeNode)
    if colour and not is_vector:
        raise ValueError(f"output {_name(output_node)} is a grey (scalar) volume but 'keep colour' gives RGB; "
                         "create a new output volume or a vector volume")
    if not colour and is_vector:
        raise ValueError(f"output {_name(output_node)} is an RGB (vector) volume but the result is grey; "
                         "create a new output volume or choose a scalar volume")


def _check_output_node(output_node, input_node, colour: bool) -> None:
    if output_node is None:
        return
    if input_node is not None and output_node is input_node:
        raise ValueError(f"output {_name(output_node)} is the input; the input is never overwritten, "
                         "choose another output or create a new volume")
    _check_output_class(output_node, colour)


def _output_name(node) -> str:
    return (node.GetName() or "Volume") + OUTPUT_SUFFIX


def _name(node) -> str:
    if node is None:
        return "None"
    get_name = getattr(node, "GetName", None)
    name = get_name() if get_name else None
    return f"'{name}'" if name else type(node).__name__


# ----------------------------------------------------------------------------- console API

def despeckle_node(node, output_node=None, *, all_frames: bool = False, model=None, device: str = "auto",
                   logic: Optional[DespeckleLogic] = None, **options):
    """Despeckle a volume, a sequence, or (``all_frames``) every frame of a proxy volume's sequence.

    Returns the output volume node, or for a sequence the output sequence node (its proxy is
    in the scene as "<name> despeckled"). ``options``: batch_size, gamma, blend, keep_colour,
    colour_threshold, progress, cancel (see :meth:`DespeckleLogic.despeckle_volume`).
    """
    import slicer

    logic = logic or DespeckleLogic(model, device)
    is_sequence = isinstance(node, (slicer.vtkMRMLSequenceNode, slicer.vtkMRMLSequenceBrowserNode))
    if is_sequence or (all_frames and find_sequence(node) is not None):
        return logic.despeckle_sequence(node, output_node, model=model, device=device, **options).sequence_node
    if all_frames:
        raise ValueError(f"{_name(node)} is not shown by a sequence browser; all_frames needs a sequence proxy")
    return logic.despeckle_volume(node, output_node, model=model, device=device, **options)


def model_card(path) -> Dict[str, Any]:
    """A model file's metadata without torch (for showing it in the GUI); ValueError if it has none."""
    from .models import read_metadata

    return read_metadata(path)


def grey_frames(volume_node) -> np.ndarray:
    """(K, J, I) grey copy of a volume's voxels (RGB reduced to luminance), validated."""
    return _read_pixels(volume_node).grey


def describe_model(metadata: Dict[str, Any]) -> str:
    """One-paragraph summary of model metadata: name, width, training steps and data."""
    training = metadata.get("training") or {}
    data = training.get("data") or {}
    data_text = ", ".join(f"{k}: {v}" for k, v in data.items()) if isinstance(data, dict) else str(data)
    parts = [f"{metadata.get('name', '?')}",
             f"width {metadata.get('width', '?')}",
             f"scales {metadata.get('scales', '?')}",
             f"{training.get('steps_done', '?')} training steps"]
    if metadata.get("working_view_difference"):
        parts.append(f"grain-adaptive (view difference {metadata['working_view_difference']:.3f} "
                     f"at working scale {metadata.get('working_scale', 1.0):g})")
    elif metadata.get("working_scale", 1.0) != 1.0:
        parts.append(f"working scale {metadata['working_scale']:g}")
    if training.get("minutes_done") is not None:
        parts.append(f"{training['minutes_done']} min on {training.get('device_used', '?')}")
    if data_text:
        parts.append(f"data: {data_text}")
    if metadata.get("created"):
        parts.append(f"created {metadata['created']}")
    return "; ".join(parts)
