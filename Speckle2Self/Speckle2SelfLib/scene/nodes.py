"""MRML helpers that every scene adapter shares: node names and creation, sequence browsers, voxels.

* names: :func:`display_name` (a node as error messages name it), :func:`base_name` and
  :func:`add_node` (a new node under a name that is unique in its scene);
* browsers: :func:`find_sequence` (the sequence a proxy volume shows), :func:`resolve_sequence`
  (sequence, browser and proxy of a sequence, browser or proxy node), :func:`browser_item_number`,
  :func:`synchronized_sequences`, :func:`play_as_proxy`, :func:`volume_showing`, :func:`nodes_of_class`;
* voxels: :func:`read_pixels`, the one validator of input volume nodes (grey or RGB, finite,
  frames in the IJ plane), :func:`read_sequence_items` / :func:`read_input` for whole sequences,
  :func:`write_voxels`, :func:`copy_geometry` and :func:`copy_display` for outputs;
* bookkeeping: :class:`CreatedNodes` (nodes a call added are removed again when it fails) and
  :func:`check_still_in_scene`.

Needs slicer-core's MRML classes only (``import slicer``, ``vtk``, imported lazily); never Qt or
``slicer.app``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from ..fileio.imageio import to_luminance
from ..vtkimage import array_from_image, image_from_array

#: A pixel counts as coloured when max - min over its R, G, B exceeds this fraction of the
#: full grey range (255 for 8-bit); JPEG chroma noise on grey pixels stays well below it.
COLOUR_THRESHOLD = 0.08


@dataclass
class Pixels:
    """Voxels of one volume node as frames, and what is needed to write a result like it."""

    grey: np.ndarray                      # (K, J, I), the dtype the network sees
    rgb: Optional[np.ndarray] = None      # (K, J, I, 3) for colour input
    dtype: np.dtype = field(default_factory=lambda: np.dtype(np.float32))  # voxel dtype of the input


# ----------------------------------------------------------------------------- names

def display_name(node) -> str:
    """A node as messages name it: its quoted name, else its class (``None`` for no node)."""
    if node is None:
        return "None"
    get_name = getattr(node, "GetName", None)
    name = get_name() if get_name else None
    return f"'{name}'" if name else type(node).__name__


def base_name(node, default: str = "Volume") -> str:
    """The node's name, ``default`` when it has none: the stem of the names of its outputs."""
    return node.GetName() or default


def add_node(scene, class_name: str, name: str):
    """A new node of ``class_name`` in ``scene``, named ``name`` or, when taken, ``name_1``, ..."""
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


def scene_of(node):
    """The scene ``node`` is in; ValueError naming it when it is in none."""
    scene = node.GetScene() if node is not None and hasattr(node, "GetScene") else None
    if scene is None:
        raise ValueError(f"{display_name(node)} is not in an MRML scene; add it to a scene first")
    return scene


def nodes_of_class(scene, class_name: str, accept: Optional[Callable[[Any], bool]] = None) -> list:
    """Nodes of a class in ``scene`` (those that ``accept``, when given), in scene order."""
    if scene is None:
        return []
    collection = scene.GetNodesByClass(class_name)
    try:
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
    finally:
        collection.UnRegister(None)   # GetNodesByClass hands over a reference (as slicer.util.getNodesByClass does)
    return [node for node in nodes if accept is None or accept(node)]


# ----------------------------------------------------------------------------- sequence browsers

def first_browser(scene, accept: Callable[[Any], bool]):
    """The first sequence browser of ``scene`` that ``accept``, None when there is none."""
    found = nodes_of_class(scene, "vtkMRMLSequenceBrowserNode", accept)
    return found[0] if found else None


def find_sequence(volume_node) -> Optional[Tuple[Any, Any]]:
    """(sequence, browser) when ``volume_node`` is the proxy of a sequence of volumes, else None."""
    import slicer

    scene = volume_node.GetScene() if volume_node is not None else None
    if scene is None or not isinstance(volume_node, slicer.vtkMRMLVolumeNode):
        return None
    browser = first_browser(scene, lambda b: b.GetSequenceNode(volume_node) is not None)
    return None if browser is None else (browser.GetSequenceNode(volume_node), browser)


def browser_showing(node):
    """The sequence browser that shows ``node`` (any node class: volumes, segmentations) as the
    proxy of one of its sequences, else None."""
    scene = node.GetScene() if node is not None else None
    if scene is None:
        return None
    return first_browser(scene, lambda b: b.GetSequenceNode(node) is not None)


def means_sequence(node, all_frames: bool) -> bool:
    """True when ``node`` stands for a whole sequence: a sequence or sequence browser node, or
    (``all_frames``) a volume that a browser shows (a sequence proxy)."""
    import slicer

    if isinstance(node, (slicer.vtkMRMLSequenceNode, slicer.vtkMRMLSequenceBrowserNode)):
        return True
    return all_frames and find_sequence(node) is not None


def resolve_sequence(source) -> Tuple[Any, Any, Any]:
    """(sequence node, browser node or None, proxy volume or None) for a sequence, browser or proxy."""
    import slicer

    if source is None:
        raise ValueError("no input given; select a sequence, a sequence browser or a volume shown by one")
    scene = source.GetScene()
    if isinstance(source, slicer.vtkMRMLSequenceNode):
        browser = first_browser(scene, lambda b: b.IsSynchronizedSequenceNode(source, True))
        return source, browser, browser.GetProxyNode(source) if browser is not None else None
    if isinstance(source, slicer.vtkMRMLSequenceBrowserNode):
        sequence = _volume_sequence_of_browser(source)
        return sequence, source, source.GetProxyNode(sequence)
    found = find_sequence(source)
    if found is None:
        raise ValueError(f"{display_name(source)} is not shown by a sequence browser (not a sequence proxy); "
                         "despeckle it as a single volume, or give its sequence node")
    sequence, browser = found
    return sequence, browser, source


def play_as_proxy(browser, sequence, proxy) -> None:
    """Browse ``sequence`` with ``browser``, shown by ``proxy`` (registered in one modification,
    so that the Sequences logic does not make a proxy copy of its own); edits of the shown item
    never rewrite the sequence (it holds results)."""
    modifying = browser.StartModify()
    try:
        if not browser.IsSynchronizedSequenceNode(sequence, True):
            browser.AddSynchronizedSequenceNode(sequence)
        if browser.GetProxyNode(sequence) is not proxy:
            browser.AddProxyNode(proxy, sequence, False)
        browser.SetSaveChanges(sequence, False)
    finally:
        browser.EndModify(modifying)


def volume_showing(node):
    """The volume node that shows ``node``: ``node`` itself for a volume; for a sequence, its proxy
    in the first browser that plays it (None when none does)."""
    import slicer

    if not isinstance(node, slicer.vtkMRMLSequenceNode):
        return node
    browser = first_browser(node.GetScene(), lambda b: b.IsSynchronizedSequenceNode(node, True))
    return browser.GetProxyNode(node) if browser is not None else None


def synchronized_sequences(browser) -> list:
    """The sequences ``browser`` plays (its primary sequence included)."""
    import vtk

    found = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(found, True)
    return [found.GetItemAsObject(i) for i in range(found.GetNumberOfItems())]


def primary_sequence(browser):
    """The sequence whose items ``browser`` steps through (Slicer < 5.4 calls it the master)."""
    get_primary = getattr(browser, "GetPrimarySequenceNode", None) or browser.GetMasterSequenceNode
    return get_primary()


def browser_item_number(browser, sequence) -> Optional[int]:
    """Item number of ``sequence`` that ``browser`` shows now: matched by the index value of
    the browser's primary sequence (the selected item number counts the primary sequence's
    items, which need not be ``sequence``'s), None when ``sequence`` has no such item."""
    if browser is None or sequence is None or sequence.GetNumberOfDataNodes() == 0:
        return None
    primary, selected = primary_sequence(browser), browser.GetSelectedItemNumber()
    if primary is None or not 0 <= selected < primary.GetNumberOfDataNodes():
        return None
    if primary is sequence:
        return selected
    value = primary.GetNthIndexValue(selected)
    numeric = sequence.GetIndexType() == sequence.NumericIndex and primary.GetIndexType() == primary.NumericIndex
    item = sequence.GetItemNumberFromIndexValue(value, not numeric)   # numeric: the item at or before it
    return item if 0 <= item < sequence.GetNumberOfDataNodes() else None


def _volume_sequence_of_browser(browser):
    for sequence in synchronized_sequences(browser):
        item = sequence.GetNthDataNode(0) if sequence.GetNumberOfDataNodes() else None
        if item is not None and item.IsA("vtkMRMLVolumeNode") and not item.IsA("vtkMRMLLabelMapVolumeNode"):
            return sequence
    raise ValueError(f"browser {display_name(browser)} plays no sequence of image volumes; give a sequence of "
                     "volumes")


# ----------------------------------------------------------------------------- reading voxels

def check_volume_node(node) -> None:
    """ValueError naming the node unless it is a grey or RGB image volume with image data."""
    import slicer

    if node is None:
        raise ValueError("no input volume given; select a grey or RGB volume node")
    if isinstance(node, slicer.vtkMRMLLabelMapVolumeNode):
        raise ValueError(f"{display_name(node)} is a label map (segment labels, not an image); use the "
                         "ultrasound image it was made from")
    if not isinstance(node, slicer.vtkMRMLVolumeNode):
        raise ValueError(f"{display_name(node)} is a {node.GetClassName()}, not a volume; give a scalar or RGB "
                         "vector volume node (or a sequence node for every frame)")
    if node.GetImageData() is None:
        raise ValueError(f"{display_name(node)} has no image data; load an image into it first")


def read_pixels(node) -> Pixels:
    """Validate a volume node and read its voxels (a copy: the input is never touched)."""
    check_volume_node(node)
    name = display_name(node)
    image = node.GetImageData()
    dims = image.GetDimensions()
    if min(dims) <= 0 or image.GetNumberOfPoints() == 0:
        raise ValueError(f"{name} is an empty image ({dims[0]}x{dims[1]}x{dims[2]} voxels); "
                         "load an image into it first")
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise ValueError(f"{name} has no voxel values; load an image into it first")
    if dims[2] > 1 and min(dims[:2]) == 1:
        raise ValueError(f"{name} is {dims[0]}x{dims[1]}x{dims[2]} voxels: its image plane is not the IJ "
                         "plane that frames are read from; reslice it (Resample Scalar/Vector/DWI Volume) first")
    components = scalars.GetNumberOfComponents()
    if scalars.GetNumberOfTuples() != dims[0] * dims[1] * dims[2]:
        raise ValueError(f"{name} has {scalars.GetNumberOfTuples()} voxel values for {dims[0]}x{dims[1]}x"
                         f"{dims[2]} voxels; its image data is inconsistent, reload it")
    voxels = array_from_image(image)
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise ValueError(f"{name} has NaN or infinite voxel values; replace them first (e.g. with "
                         "Threshold Scalar Volume or numpy.nan_to_num)")
    if voxels.dtype.kind not in "uif":
        raise ValueError(f"{name} has voxels of type {voxels.dtype}; only integer or float intensities")
    if components == 1:
        return Pixels(voxels[..., 0], None, voxels.dtype)
    if components == 3:
        return Pixels(to_luminance(voxels), voxels, voxels.dtype)
    raise ValueError(f"{name} has {components}-component voxels; only grey (1) or RGB (3) volumes can "
                     "be despeckled. Convert it first (Vector to Scalar Volume module, or drop the alpha "
                     "channel of RGBA)")


def read_sequence_items(sequence) -> List[Pixels]:
    """Every item of a sequence of volumes, validated (:func:`read_pixels`), all of one size and type."""
    count = sequence.GetNumberOfDataNodes()
    if count == 0:
        raise ValueError(f"sequence {display_name(sequence)} has no frames; record or load frames first")
    items: List[Pixels] = []
    for i in range(count):
        node = sequence.GetNthDataNode(i)
        try:
            pixels = read_pixels(node)
        except ValueError as err:
            raise ValueError(f"sequence {display_name(sequence)} item {i}: {err}") from err
        if items and (pixels.grey.shape != items[0].grey.shape or (pixels.rgb is None) != (items[0].rgb is None)):
            raise ValueError(f"sequence {display_name(sequence)} mixes frame sizes or types: item {i} is "
                             f"{_describe(pixels)}, item 0 is {_describe(items[0])}; despeckle such frames as "
                             "separate volumes or resample them to one size first")
        items.append(pixels)
    return items


def read_input(node, all_frames: bool = True) -> Tuple[Any, List[Pixels], Any]:
    """(the node that names the input, its validated pixels, the node whose geometry they have):
    every item of the sequence for a sequence, a sequence browser or (``all_frames``) a sequence
    proxy; the volume's own slices otherwise."""
    if means_sequence(node, all_frames):
        sequence, _browser, _proxy = resolve_sequence(node)
        return sequence, read_sequence_items(sequence), sequence.GetNthDataNode(0)
    return node, [read_pixels(node)], node


def stack_items(items: List[Pixels]) -> Pixels:
    """The frames of several items (e.g. of a sequence) as one stack."""
    rgb = None if items[0].rgb is None else np.concatenate([p.rgb for p in items])
    return Pixels(np.concatenate([p.grey for p in items]), rgb, items[0].dtype)


def _describe(pixels: Pixels) -> str:
    k, j, i = pixels.grey.shape
    kind = "RGB" if pixels.rgb is not None else "grey"
    return f"{i}x{j}" + (f"x{k}" if k > 1 else "") + f" {kind}"


def volume_to_array(volume_node) -> np.ndarray:
    """(K, J, I) grey copy of a scalar volume, or (K, J, I, 3) of an RGB vector volume."""
    pixels = read_pixels(volume_node)
    return pixels.rgb.copy() if pixels.rgb is not None else pixels.grey.copy()


def coloured_pixels(rgb: np.ndarray, threshold: float = COLOUR_THRESHOLD) -> np.ndarray:
    """Boolean mask of the coloured pixels of (..., 3) RGB voxels (Doppler, annotations): their
    max - min over R, G, B exceeds ``threshold`` of the full grey range."""
    spread = rgb.max(axis=-1).astype(np.float64) - rgb.min(axis=-1)
    full_scale = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else float(np.ptp(rgb)) or 1.0
    return spread > threshold * full_scale


# ----------------------------------------------------------------------------- writing voxels

def write_voxels(volume_node, array: np.ndarray) -> None:
    """(K, J, I) grey or (K, J, I, 3) RGB voxels as the node's (new) image data."""
    volume_node.SetAndObserveImageData(image_from_array(array))


def copy_geometry(source, target) -> None:
    """IJK-to-RAS (origin, spacing, directions) and the parent transform."""
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(ijk_to_ras)
    target.SetIJKToRASMatrix(ijk_to_ras)
    if source.GetScene() is not None and target.GetScene() is not None:
        # also none: a reused output must not keep the transform of what it showed before
        parent = source.GetParentTransformNode()
        target.SetAndObserveTransformNodeID(parent.GetID() if parent is not None else None)


def copy_display(source, target) -> None:
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


# ----------------------------------------------------------------------------- bookkeeping

def display_nodes_of(node) -> list:
    return [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
        if hasattr(node, "GetNumberOfDisplayNodes") else []


def remove_with_display_nodes(scene, node) -> None:
    """Remove ``node`` and its display nodes (a removed node leaves them behind otherwise)."""
    displays = display_nodes_of(node)
    scene.RemoveNode(node)
    for display in displays:
        if display is not None and display.GetScene() is scene:
            scene.RemoveNode(display)


class CreatedNodes:
    """Nodes added by one call; on any exception they are removed again (scene as it was)."""

    def __init__(self, scene):
        self.scene = scene
        self.nodes: list = []

    def add(self, class_name: str, name: str):
        node = add_node(self.scene, class_name, name)
        self.nodes.append(node)
        return node

    def track_display(self, node) -> None:
        if node in self.nodes:
            self.nodes.extend(display_nodes_of(node))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        self._stop_playing_sequences()
        for node in reversed(self.nodes):
            if node is not None and node.GetScene() is self.scene:
                remove_with_display_nodes(self.scene, node)
        return False

    def _stop_playing_sequences(self) -> None:
        """Browsers stop playing the created sequences first: a browser that still plays one when
        its proxy is removed makes a proxy of its own for it (Sequences logic), which would stay."""
        created = [node for node in self.nodes if node is not None and node.GetScene() is self.scene
                   and node.IsA("vtkMRMLSequenceNode")]
        for browser in nodes_of_class(self.scene, "vtkMRMLSequenceBrowserNode") if created else []:
            for sequence in created:
                if browser.IsSynchronizedSequenceNode(sequence, False):
                    browser.RemoveSynchronizedSequenceNode(sequence.GetID())


def check_still_in_scene(scene, doing: str = "despeckled", **nodes) -> None:
    """Refuse to store results when a node of the call left the scene while it ran (the user
    deleted it, or closed the scene): nothing is added, the scene stays as the user left it."""
    for role, node in nodes.items():
        if node is not None and (node.GetScene() is not scene or not scene.IsNodePresent(node)):
            raise ValueError(f"the {role} node {display_name(node)} was removed from the scene while it was "
                             f"{doing}; nothing was added to the scene")
