"""The Speckle2Self module's logic: everything the GUI does, without Qt (slicer-core's MRML only).

:class:`Speckle2SelfLogic` despeckles volume and sequence nodes (blocking, or as a background
job the GUI polls), segments the lumen from a seed point (likewise), lists and manages models
(bundled, user models from "Adapt model", model files) and starts adaptation. The Slicer module
(Speckle2Self.py) only wires it to widgets; it runs the same in Slicer's Python console::

    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic, despeckle_node
    out = despeckle_node(getNode('US'))                           # a volume -> "US despeckled"
    out = despeckle_node(getNode('US'), all_frames=True)          # every frame of US's sequence
    out = despeckle_node(getNode('Image_Image'), keep_colour=True)   # RGB with Doppler colours kept
    logic = Speckle2SelfLogic(device='cuda')                      # keeps the loaded model for reuse
    out = logic.despeckle_volume(getNode('US'), progress=lambda done, total: print(done, total))
    result = logic.despeckle_sequence(getNode('Sequence'))        # -> SequenceOutput
    result = logic.despeckle_sequence(getNode('Sequence'), uncertainty=True)   # + a map per frame
    lumen = logic.segment_lumen(getNode('US despeckled'), getNode('F'))   # seed: last point of F

The input node is never modified. When the work is cancelled or fails, every node the call
created is removed again, so the scene is left as it was. torch is imported only when a model runs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from ..engine.inference import check_grey_levels
from ..engine.refine import check_refine
from ..engine.volume_axes import SLICE_AXIS_LABELS  # noqa: F401 (the module's plane choice)
from ..segmentation import DEFAULT_METHOD
from .despeckle import (UNCERTAINTY_OF_ATTRIBUTE, CancelFn, DespeckleJob, ProgressFn, SequenceMaps, SequenceOutput,
                        SequenceSource, VolumeSource, check_uncertainty_node, despeckle_pixels, is_map_of,
                        prepare_job, scaled_progress, sequence_map_target, store_sequence, store_uncertainty,
                        store_volume, uncertainty_voxels)
from .nodes import COLOUR_THRESHOLD, display_name, find_sequence, means_sequence, resolve_sequence

#: The module's name: its parameter node's singleton tag and ``ModuleName`` attribute.
MODULE_NAME = "Speckle2Self"


@dataclass
class DespeckleRun:
    """What one despeckling produced: the output volume (the proxy, for a sequence) and timing."""

    output_node: Any
    frames: int
    seconds: float
    sequence_node: Any = None

    @classmethod
    def from_result(cls, result, seconds: float) -> "DespeckleRun":
        """From an output volume node, or a :class:`~Speckle2SelfLib.scene.despeckle.SequenceOutput`."""
        if isinstance(result, SequenceOutput):
            return cls(result.proxy_node, result.frames, result.seconds, result.sequence_node)
        return cls(result, result.GetImageData().GetDimensions()[2], seconds)


def runtime_installed(name: str) -> bool:
    """Whether an optional CPU runtime ("openvino", "onnxruntime") is installed (the module offers
    OpenVINO, which backend "auto" then runs; Speckle2SelfLib.engine.backends)."""
    from ..engine.backends import runtime_installed as installed

    return installed(name)


class Speckle2SelfLogic:
    """Despeckle and segment nodes, manage models; no GUI. Keeps the last loaded model for reuse.

    ``model``: None (the bundled default model), a bundled model's name, a model file path, or
    a :class:`~Speckle2SelfLib.engine.inference.Despeckler`. ``sequences_logic``: Slicer's
    vtkSlicerSequencesLogic, used to refresh proxy nodes after a sequence is added (optional:
    the output proxy is filled here as well).
    """

    def __init__(self, model=None, device: str = "auto", sequences_logic=None):
        self.model = model
        self.device = device
        self.sequences_logic = sequences_logic
        self.backend = "auto"        # CPU inference path (Speckle2SelfLib.engine.backends)
        self._despeckler: Optional[Tuple[Tuple[str, str, str], Any]] = None     # (key, Despeckler)
        self._despeckler_lock = threading.Lock()
        self.last_seconds = 0.0      # duration of the last successful call (despeckling + writing)
        self.last_uncertainty_node = None   # the last uncertainty=True run's map (a sequence, for a sequence)

    # ------------------------------------------------------------------ parameter node
    @staticmethod
    def parameter_node(scene):
        """The module's parameter node in ``scene``, made when there is none: the singleton
        vtkMRMLScriptedModuleNode that Slicer's ScriptedLoadableModuleLogic.getParameterNode
        gives (the module wraps it in its parameterNodeWrapper)."""
        node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)    # owned by the Python variable now
            node.SetSingletonTag(MODULE_NAME)
            node.SetName(scene.GenerateUniqueName(MODULE_NAME))
            node.SetAttribute("ModuleName", MODULE_NAME)
            node = scene.AddNode(node)
        elif node.GetAttribute("ModuleName") != MODULE_NAME:   # a closed scene drops the attribute
            node.SetAttribute("ModuleName", MODULE_NAME)
        return node

    # ------------------------------------------------------------------ models
    def despeckler(self, model=None, device: Optional[str] = None):
        """The Despeckler for ``model`` on ``device`` (defaults: the logic's), loaded once."""
        from ..engine.inference import Despeckler

        model = self.model if model is None else model
        if isinstance(model, Despeckler):
            return model
        device = device or self.device
        key = (str(model), device, self.backend)
        # Worker threads call this: a cancelled job's thread may still be loading when the next
        # job starts, so loads are serialised and the model is cached with its key in one step.
        with self._despeckler_lock:
            if self._despeckler is None or self._despeckler[0] != key:
                loaded = Despeckler.from_file(None if model is None else str(model), device, self.backend)
                self._despeckler = (key, loaded)
            return self._despeckler[1]

    def engine_description(self) -> str:
        """How the last loaded model runs, for the user: the network's path (e.g. "OpenVINO on the
        CPU", "CUDA") and whether its guided refinement ran; '' before any model was loaded."""
        with self._despeckler_lock:
            loaded = self._despeckler[1] if self._despeckler is not None else None
        if loaded is None:
            return ""
        names = {"fp32": "PyTorch fp32", "bf16": "PyTorch bf16", "openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}
        device = str(loaded.device)
        network = f"{names.get(loaded.backend, loaded.backend)} on the CPU" if device == "cpu" else device.upper()
        refinement = "guided refinement" if loaded.last_refine == "guided" else "network output"
        return f"{network}, {refinement}"

    @staticmethod
    def bundled_models() -> list:
        """The bundled models' manifest entries (name, file, version, default, ...)."""
        from ..engine.models import bundled_models

        return bundled_models()

    def has_bundled_model(self) -> bool:
        return bool(self.bundled_models())

    def model_metadata(self, model: Optional[str]) -> dict:
        """Metadata of a bundled model (None: the default) or model file, {} when there is none;
        read without torch."""
        from ..engine.models import MODELS_DIR, read_metadata

        if model and os.path.isfile(model):
            return read_metadata(model)
        entries = self.bundled_models()
        entry = next((e for e in entries if e["name"] == model), None) if model else \
            next((e for e in entries if e.get("default")), entries[0] if entries else None)
        return read_metadata(MODELS_DIR / entry["file"]) if entry else {}

    def describe_model(self, model: Optional[str]) -> str:
        """One line about a model (name, width, training), read without torch; '' when there is none."""
        from ..engine.models import describe_model

        metadata = self.model_metadata(model)
        return describe_model(metadata) if metadata else ""

    def recommends_guided_smoothing(self, model: Optional[str]) -> bool:
        """Whether the model recommends the guided refinement (what the CLI's --refine auto gives)."""
        from ..engine.refine import recommended_mode

        metadata = self.model_metadata(model)
        return bool(metadata) and recommended_mode(metadata) == "guided"

    # ------------------------------------------------------------------ user models (Adapt model)
    @staticmethod
    def use_user_models_directory(default: str) -> str:
        """Make ``default`` the user models folder unless $SPECKLE2SELF_USER_MODELS names one;
        returns the folder in use."""
        from ..engine import user_models

        user_models.set_default_directory(default)
        return str(user_models.user_models_dir())

    @staticmethod
    def user_models_directory() -> str:
        """Where "Adapt model" keeps its models (see :mod:`Speckle2SelfLib.engine.user_models`)."""
        from ..engine import user_models

        return str(user_models.user_models_dir())

    def user_models(self) -> list:
        """Usable user models; skipped (corrupt or altered) files are logged with the reason."""
        from ..engine import user_models

        models, messages = user_models.list_user_models(self.user_models_directory())
        for message in messages:
            logging.warning(message)
        return models

    def is_user_model(self, model: str) -> bool:
        from ..engine import user_models

        return bool(model) and os.path.isfile(model) and user_models.is_user_model(model, self.user_models_directory())

    def remove_user_model(self, model: str) -> None:
        from ..engine import user_models

        user_models.remove_user_model(model, self.user_models_directory())

    def start_adaptation(self, nodes, *, init=None, minutes=None, steps=None, crop: int = 128, device: str = "auto"):
        """Read ``nodes`` now (main thread) and fine-tune ``init`` on them in the background;
        returns the running :class:`~Speckle2SelfLib.engine.adapt.AdaptJob` (its model goes to
        the user models folder)."""
        from ..engine.adapt import AdaptJob
        from .adapt import frames_from_nodes

        data = frames_from_nodes(list(nodes))
        return AdaptJob(data, init=init, minutes=minutes, steps=steps, crop=crop, device=device,
                        directory=self.user_models_directory()).start()

    # ------------------------------------------------------------------ despeckling
    def despeckle_volume(self, input_node, output_node=None, *, model=None, device: Optional[str] = None,
                         batch_size: Optional[int] = None, gamma: Optional[float] = None, blend: float = 0.0,
                         keep_colour: bool = False, colour_threshold: float = COLOUR_THRESHOLD,
                         progress: ProgressFn = None, cancel: CancelFn = None, grey_levels: str = "auto",
                         refine: str = "auto", slice_axis: str = "auto", uncertainty: bool = False,
                         uncertainty_node=None):
        """Despeckle every slice (frame) of a volume into ``output_node`` (new when None).

        Returns the output volume node: grey scalar, or RGB vector with ``keep_colour`` for an
        RGB input. Raises Cancelled (scene unchanged) when ``cancel()`` turns true.
        ``slice_axis``: the plane of a 3D volume the network runs in: auto (the acquisition plane),
        i, j, k or three (Speckle2SelfLib.engine.volume_axes); recorded on the output node.
        ``uncertainty``: also write the map of where not to trust the output (float32, the expected
        absolute error in grey levels, Speckle2SelfLib.engine.uncertainty) into ``uncertainty_node``
        (new when None), kept as :attr:`last_uncertainty_node`; not with slice axis "three".
        """
        from ..engine.volume_axes import check_slice_axis, choose_volume_axis, record_on_node

        check_grey_levels(grey_levels)
        refine = check_refine(refine)
        check_slice_axis(slice_axis)
        self.last_uncertainty_node = None
        if uncertainty:
            check_uncertainty_node(uncertainty_node, input_node, output_node, slice_axis)
        source = VolumeSource.read(input_node, output_node, keep_colour)
        choice = choose_volume_axis(source.pixels.grey, slice_axis)
        despeckler = self.despeckler(model, device)
        if uncertainty:
            from ..engine.uncertainty import MapRecorder
            despeckler = MapRecorder(despeckler)
        started = time.monotonic()
        result = despeckle_pixels(despeckler, source.pixels, source.colour_out, colour_threshold, batch_size, gamma,
                                  blend, progress, cancel, grey_levels, refine, choice)
        if uncertainty:
            maps = uncertainty_voxels(despeckler, source.pixels, choice)
        output_node = record_on_node(store_volume(source, output_node, result), choice)
        if uncertainty:
            self.last_uncertainty_node = store_uncertainty(source, uncertainty_node, maps, output_node)
        self.last_seconds = time.monotonic() - started
        return output_node

    def despeckle_sequence(self, source, output_node=None, *, model=None, device: Optional[str] = None,
                           batch_size: Optional[int] = None, gamma: Optional[float] = None, blend: float = 0.0,
                           keep_colour: bool = False, colour_threshold: float = COLOUR_THRESHOLD,
                           progress: ProgressFn = None, cancel: CancelFn = None,
                           grey_levels: str = "auto", refine: str = "auto",
                           slice_axis: str = "auto", uncertainty: bool = False,
                           uncertainty_node=None) -> SequenceOutput:
        """Despeckle every item of a sequence of volumes into a new sequence node (``slice_axis``
        is accepted for :meth:`process`: a sequence's frames are its items, despeckled as they are).

        ``source``: a vtkMRMLSequenceNode, a vtkMRMLSequenceBrowserNode (its first sequence of
        volumes) or a proxy volume node shown by a browser. The output sequence has the input's
        index name, unit, type and values; it is added to the browser that plays the input (a
        new browser when none does), with ``output_node`` (new when None) as its proxy.
        ``progress(done, total)`` counts frames despeckled, then frames stored (total = 2 N).
        ``uncertainty``: also a sequence of maps, one float32 volume per item with its geometry, at
        the same index values, played by the same browser: ``uncertainty_node`` (a sequence, or the
        volume that shows one in that browser; a new "<input> uncertainty" when None), kept as
        :attr:`last_uncertainty_node` and in the result.
        """
        check_grey_levels(grey_levels)
        refine = check_refine(refine)
        self.last_uncertainty_node = None
        src = SequenceSource.read(source, output_node, keep_colour)
        target = sequence_map_target(uncertainty_node, src, output_node) if uncertainty else None
        n = src.frames
        despeckler = self.despeckler(model, device)
        if uncertainty:
            from ..engine.uncertainty import MapRecorder
            despeckler = MapRecorder(despeckler)
        started = time.monotonic()
        result = despeckle_pixels(despeckler, src.stacked, src.colour_out, colour_threshold, batch_size, gamma, blend,
                                  scaled_progress(progress, 2 * n, src.stacked.grey.shape[0], n), cancel, grey_levels,
                                  refine)
        maps = SequenceMaps(np.split(uncertainty_voxels(despeckler, src.stacked), n), target) if uncertainty else None
        out = store_sequence(src, output_node, np.split(result, n), self.sequences_logic, progress, cancel, maps)
        out.seconds = self.last_seconds = time.monotonic() - started
        self.last_uncertainty_node = out.uncertainty_node
        return out

    def prepare_job(self, source, output_node=None, **options) -> DespeckleJob:
        """Read ``source`` (a volume; with ``all_frames`` (default) a sequence proxy's whole
        sequence, or a sequence / browser node) now, on the main thread, for a
        :class:`~Speckle2SelfLib.scene.despeckle.DespeckleJob` that despeckles it in a worker
        thread. ``options``: all_frames, model, device, batch_size (the most frames per batch),
        gamma, blend, keep_colour, colour_threshold, grey_levels, refine, slice_axis, uncertainty,
        uncertainty_node."""
        return prepare_job(self, source, output_node, **options)

    def process(self, input_node, output_node=None, *, all_frames: bool = True, model=None, device: str = "auto",
                backend: str = "auto", batch_size=None, gamma: Optional[float] = None, blend: float = 0.0,
                keep_colour: bool = False, progress: ProgressFn = None, cancel: CancelFn = None,
                grey_levels: str = "auto", refine: str = "auto", slice_axis: str = "auto") -> DespeckleRun:
        """What the module's Apply does, blocking: despeckle ``input_node`` (all frames of its
        sequence when it is a proxy and ``all_frames``) into ``output_node`` when that can take
        the result (else a new volume). ``gamma`` 1 means none. ``grey_levels``, ``refine``: see
        :meth:`~Speckle2SelfLib.engine.inference.Despeckler.denoise`."""
        if input_node is None:
            raise ValueError("Select an input volume.")
        self.backend = backend
        options = dict(model=model, device=device, batch_size=batch_size, gamma=_gamma(gamma), blend=blend,
                       keep_colour=keep_colour, progress=progress, cancel=cancel, grey_levels=grey_levels,
                       refine=refine, slice_axis=slice_axis)
        whole_sequence = means_sequence(input_node, all_frames)
        output_node = _usable_output(output_node, keep_colour and is_rgb(input_node), whole_sequence)
        if whole_sequence:
            result = self.despeckle_sequence(input_node, output_node, **options)
        else:
            result = self.despeckle_volume(input_node, output_node, **options)
        return DespeckleRun.from_result(result, self.last_seconds)

    def start_process(self, input_node, output_node=None, *, all_frames: bool = True, model=None,
                      device: str = "auto", backend: str = "auto", batch_size=None, gamma: Optional[float] = None,
                      blend: float = 0.0, keep_colour: bool = False, grey_levels: str = "auto",
                      refine: str = "auto", slice_axis: str = "auto", uncertainty: bool = False,
                      uncertainty_node=None) -> DespeckleJob:
        """Like :meth:`process`, in the background: reads the frames now and returns the started
        :class:`~Speckle2SelfLib.scene.despeckle.DespeckleJob`; poll() it from the main thread
        (e.g. a QTimer) to get progress and, at the end, the result written into the scene
        (:meth:`DespeckleRun.from_result` of it); cancel() stops it. ``uncertainty``: also the
        uncertainty map into ``uncertainty_node`` when that can take it (else a new one), then
        :attr:`last_uncertainty_node` (for a sequence: a sequence of maps, played with the output)."""
        if input_node is None:
            raise ValueError("Select an input volume.")
        self.backend = backend
        whole_sequence = means_sequence(input_node, all_frames)
        output_node = _usable_output(output_node, keep_colour and is_rgb(input_node), whole_sequence)
        uncertainty_node = _usable_uncertainty(uncertainty_node, input_node, whole_sequence, output_node)
        job = self.prepare_job(input_node, output_node, all_frames=all_frames, model=model, device=device,
                               batch_size=batch_size, gamma=_gamma(gamma), blend=blend, keep_colour=keep_colour,
                               grey_levels=grey_levels, refine=refine, slice_axis=slice_axis,
                               uncertainty=uncertainty, uncertainty_node=uncertainty_node)
        job.start()
        return job

    # ------------------------------------------------------------------ live
    def start_live(self, input_node, output_node=None, *, model=None, device: str = "auto", backend: str = "auto"):
        """What the module's Live check box starts: a running
        :class:`~Speckle2SelfLib.scene.live.LiveVolumeDespeckler` of ``input_node`` into
        ``output_node`` when that can take a live result (else a new volume); call its capture()
        and apply() on the main thread (e.g. a QTimer), stop() it at the end."""
        from ..engine.inference import Despeckler
        from .live import LiveVolumeDespeckler

        if input_node is None:
            raise ValueError("Select an input volume to despeckle live.")
        despeckler = Despeckler.from_file(None if model is None else str(model), device, backend)
        return LiveVolumeDespeckler(despeckler, input_node, _usable_live_output(output_node, input_node))

    # ------------------------------------------------------------------ lumen
    def segment_lumen(self, volume_node, seed_node, *, method: str = DEFAULT_METHOD, tolerance: float = 1.0,
                      all_frames: bool = True, segmentation_node=None, table_node=None):
        """What the module's Segment does, blocking; returns a
        :class:`~Speckle2SelfLib.scene.lumen.LumenResult`. See :meth:`prepare_segmentation`."""
        return self.prepare_segmentation(volume_node, seed_node, method=method, tolerance=tolerance,
                                         all_frames=all_frames, segmentation_node=segmentation_node,
                                         table_node=table_node).run()

    def start_segmentation(self, volume_node, seed_node, **options):
        """Like :meth:`segment_lumen`, in the background: returns the started
        :class:`~Speckle2SelfLib.scene.lumen.SegmentJob` (poll() it from the main thread)."""
        job = self.prepare_segmentation(volume_node, seed_node, **options)
        job.start()
        return job

    def prepare_segmentation(self, volume_node, seed_node, *, method: str = DEFAULT_METHOD, tolerance: float = 1.0,
                             all_frames: bool = True, segmentation_node=None, table_node=None):
        """Seed = the last placed point of ``seed_node`` (world RAS). For a sequence proxy with
        ``all_frames``, every frame of the sequence is segmented starting at the frame the browser
        shows (matched by index value), under the proxy's parent transform. The frames are read
        now (main thread) for a :class:`~Speckle2SelfLib.scene.lumen.SegmentJob`."""
        from .lumen import last_seed_ras, prepare_segmentation
        from .nodes import browser_item_number

        if volume_node is None:
            raise ValueError("Select an image to segment.")
        seed = last_seed_ras(seed_node)
        if seed is None:
            raise ValueError(f"Place a seed point inside the lumen first ({display_name(seed_node)} has none).")
        target, frame = volume_node, None
        found = find_sequence(volume_node)
        if all_frames and found is not None:
            target, browser = found
            frame = browser_item_number(browser, target)
        return prepare_segmentation(target, seed, method=method, tolerance=tolerance, frame=frame,
                                    all_frames=all_frames, segmentation_node=segmentation_node, table_node=table_node)


def _gamma(gamma: Optional[float]) -> Optional[float]:
    return None if gamma is None or abs(gamma - 1.0) < 1e-6 else gamma


def _usable_output(output_node, colour: bool, whole_sequence: bool = False):
    """The remembered output (the module keeps the last result), or None for a new one where it
    cannot take this result: one of the other kind (grey vs RGB), or -- for a single volume --
    the proxy of an earlier sequence result, whose browser would replace the result with a frame
    of that sequence at its next step."""
    if output_node is None:
        return None
    if output_node.IsA("vtkMRMLVectorVolumeNode") != colour:
        logging.info(f"{display_name(output_node)} cannot hold this result type; creating a new output volume")
        return None
    if not whole_sequence and find_sequence(output_node) is not None:
        logging.info(f"{display_name(output_node)} shows a frame of a sequence; creating a new output volume")
        return None
    return output_node


def _usable_uncertainty(uncertainty_node, input_node, whole_sequence: bool, output_node=None):
    """The remembered map node, or None for a new one where it cannot take this map: a volume's map
    never goes into a sequence's frame (its browser would replace it); a sequence's maps need a
    sequence, or the volume that shows one in the browser playing the input; and a map of another
    output stays that output's (a new output gets a new map)."""
    if uncertainty_node is None:
        return None
    shown = find_sequence(uncertainty_node)
    if _describes_another_output(uncertainty_node, shown, output_node):
        logging.info(f"{display_name(uncertainty_node)} is the map of another output; creating a new one")
        return None
    if not whole_sequence:
        usable = shown is None and not uncertainty_node.IsA("vtkMRMLSequenceNode")
    else:
        usable = uncertainty_node.IsA("vtkMRMLSequenceNode") or \
            (shown is not None and shown[1] is resolve_sequence(input_node)[1])
    if not usable:
        logging.info(f"{display_name(uncertainty_node)} cannot hold this uncertainty map; creating a new one")
    return uncertainty_node if usable else None


def _describes_another_output(uncertainty_node, shown, output_node) -> bool:
    """Whether the node (or the sequence it shows) is already the map of an output other than
    ``output_node`` (None: a new output)."""
    holder = shown[0] if shown is not None else uncertainty_node
    described = holder.GetAttribute(UNCERTAINTY_OF_ATTRIBUTE) or uncertainty_node.GetAttribute(UNCERTAINTY_OF_ATTRIBUTE)
    return bool(described) and not is_map_of(uncertainty_node, output_node)


def _usable_live_output(output_node, input_node):
    """The remembered output, or None for a new one where it cannot take a live result: live
    output is grey, never the input itself, and never a frame of a sequence (its browser would
    overwrite it)."""
    if output_node is None or output_node is input_node:
        return None
    return _usable_output(output_node, colour=False, whole_sequence=False)


def is_rgb(volume_node) -> bool:
    """True for a volume whose voxels have three components (RGB)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    return bool(image is not None and image.GetNumberOfScalarComponents() == 3)


# ----------------------------------------------------------------------------- console API

def despeckle_node(node, output_node=None, *, all_frames: bool = False, model=None, device: str = "auto",
                   logic: Optional[Speckle2SelfLogic] = None, **options):
    """Despeckle a volume, a sequence, or (``all_frames``) every frame of a proxy volume's sequence.

    Returns the output volume node, or for a sequence the output sequence node (its proxy is
    in the scene as "<name> despeckled"). ``options``: batch_size, gamma, blend, keep_colour,
    colour_threshold, progress, cancel, uncertainty, uncertainty_node (see
    :meth:`Speckle2SelfLogic.despeckle_volume` and :meth:`~Speckle2SelfLogic.despeckle_sequence`; the
    map is then the given ``logic``'s ``last_uncertainty_node``).
    """
    logic = logic or Speckle2SelfLogic(model, device)
    if means_sequence(node, all_frames):
        return logic.despeckle_sequence(node, output_node, model=model, device=device, **options).sequence_node
    if all_frames:
        raise ValueError(f"{display_name(node)} is not shown by a sequence browser; all_frames needs a sequence proxy")
    return logic.despeckle_volume(node, output_node, model=model, device=device, **options)
