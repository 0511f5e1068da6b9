"""Seed point -> "Carotid lumen" segmentation node and measurement table in an MRML scene.

:func:`segment_lumen` takes a volume node (one 2D frame, or a multi-slice volume whose slices
are frames, e.g. a PLUS cine loop loaded as a volume) or a sequence node of 2D volume frames,
and a seed in RAS (as a markup point gives it) or IJK. It runs
:mod:`Speckle2SelfLib.segmentation` on the frame(s) and writes the result into the scene:

* a ``vtkMRMLSegmentationNode`` whose reference geometry is the volume's and whose segment
  "Carotid lumen" is imported from a labelmap in the volume's exact IJK-to-RAS geometry
  (for a sequence: one segmentation per frame in a ``vtkMRMLSequenceNode``, and the seed
  frame's one in the scene);
* a ``vtkMRMLTableNode`` with one row per segmented frame: frame, area_mm2, diameter_mm
  (equivalent), major_diameter_mm / minor_diameter_mm (moment ellipse), flagged, note (why a
  frame was flagged: do not trust it);
* for several frames, a diameter-over-frames plot (``vtkMRMLPlotSeriesNode`` + chart).

:func:`prepare_segmentation` reads the frames and places the seed on the main thread and gives
a :class:`SegmentJob` (:mod:`.jobs`): it segments frame by frame in a worker thread that never
touches MRML (progress per frame, cancel within a frame), and writes all outputs into the
scene when polled on the main thread, or none when it is cancelled or fails.

Needs slicer-core's MRML classes only (``import slicer``, ``vtk``); never Qt or slicer.app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..segmentation import (DEFAULT_METHOD, DEFAULT_TOLERANCE, MAX_AREA_CHANGE, Measurement, SequenceResult,
                            segment_sequence)
from ..vtkimage import image_from_array
from .jobs import BackgroundJob
from .nodes import (CreatedNodes, base_name, browser_item_number, browser_showing, check_still_in_scene, display_name,
                    find_sequence, nodes_of_class, play_as_proxy, read_pixels, read_sequence_items,
                    remove_with_display_nodes, resolve_sequence, synchronized_sequences)

LUMEN_SEGMENT_NAME = "Carotid lumen"
LUMEN_COLOR = (0.85, 0.15, 0.15)
#: Attribute marking the diameter plot series made here (reused by a rerun).
PLOT_ATTRIBUTE = "Speckle2Self.LumenPlot"
#: Attribute of a lumen segmentation sequence naming the input sequence's node ID (a rerun refills it).
LUMEN_SOURCE_ATTRIBUTE = "Speckle2Self.LumenSource"
TABLE_COLUMNS = ("frame", "area_mm2", "diameter_mm", "major_diameter_mm", "minor_diameter_mm", "flagged", "note")


@dataclass
class LumenResult:
    """What :func:`segment_lumen` added to (or updated in) the scene, and the numbers."""

    segmentation_node: object                 # vtkMRMLSegmentationNode (the seed frame's, for a sequence)
    table_node: object                        # vtkMRMLTableNode, one row per segmented frame
    segment_id: str                           # id of the "Carotid lumen" segment
    seed_ijk: Tuple[int, int, int]            # (i=column, j=row, k=frame) the seed fell on
    frames: List[int]                         # frames segmented, in table order
    sequence: SequenceResult                  # masks (N, rows, cols), measurements, flags for all frames
    segmentation_sequence_node: Optional[object] = None   # vtkMRMLSequenceNode of segmentations
    plot_chart_node: Optional[object] = None
    plot_series_node: Optional[object] = None

    @property
    def measurements(self) -> List[Measurement]:
        return [self.sequence.measurements[k] for k in self.frames]


@dataclass
class _Frames:
    """Grey frames of the input and the volume node giving each frame's geometry."""

    pixels: np.ndarray                        # (N, rows, cols)
    geometry_nodes: list                      # a volume node per frame (same node for slices of a volume)
    slice_frames: bool                        # frames are the k slices of one volume
    sequence_node: Optional[object] = None
    index_values: List[str] = field(default_factory=list)
    transform_node: Optional[object] = None   # parent transform of the volume (of the proxy, for a sequence)
    browser_node: Optional[object] = None     # browser playing the sequence (its proxy gives the transform)

    def geometry(self, k: int):
        """The volume node whose IJKToRAS places frame k."""
        return self.geometry_nodes[0] if self.slice_frames else self.geometry_nodes[k]


def segment_lumen(volume_node, seed_ras: Optional[Sequence[float]] = None, *,
                  seed_ijk: Optional[Sequence[float]] = None, method: str = DEFAULT_METHOD,
                  tolerance: float = DEFAULT_TOLERANCE, frame: Optional[int] = None,
                  all_frames: bool = True, segmentation_node=None, table_node=None,
                  max_area_change: float = MAX_AREA_CHANGE, plot: bool = True, **options) -> LumenResult:
    """Segment the carotid lumen around a seed and put the result into the volume's scene.

    ``volume_node``: a scalar (or RGB, used as luminance) volume node, or a
    ``vtkMRMLSequenceNode`` of 2D volume nodes (it must be in a scene). Give ``seed_ras``
    (world RAS, mapped through the volume's RASToIJK and any parent transform) or ``seed_ijk``
    (i=column, j=row, k=slice). ``frame``: the frame the seed is in (default: the seed's k
    slice for a volume; for a sequence the item its browser shows, matched by index value,
    else item 0). A sequence's items carry no parent transform (they are copies), so the
    transform of the browser's proxy volume is used for the seed and given to the output
    segmentation; the per-frame segmentations go into one sequence that the browser plays with
    ``segmentation_node`` as its proxy (reused on the next call). With ``all_frames`` every frame is segmented,
    the seed following the lumen (see :func:`~Speckle2SelfLib.segmentation.segment_sequence`),
    else only ``frame``. ``segmentation_node`` / ``table_node`` are reused when given (the
    "Carotid lumen" segment and the table rows are replaced). ``method``: "radial" (default,
    robust to wall gaps), "flood" or "growcut" (Slicer's effects, with ``tolerance``);
    ``options`` go to the segmentation method (e.g. ``neighborhood_radius_px`` for flood).
    Implausible frames are kept but flagged (table columns ``flagged`` and ``note``); a radial
    seed on bright tissue raises :class:`~Speckle2SelfLib.segmentation.SeedNotInLumenError`.
    Blocks until done: :func:`prepare_segmentation` gives the same as a background job.
    """
    return prepare_segmentation(volume_node, seed_ras, seed_ijk=seed_ijk, method=method, tolerance=tolerance,
                                frame=frame, all_frames=all_frames, segmentation_node=segmentation_node,
                                table_node=table_node, max_area_change=max_area_change, plot=plot, **options).run()


def prepare_segmentation(volume_node, seed_ras: Optional[Sequence[float]] = None, *,
                         seed_ijk: Optional[Sequence[float]] = None, method: str = DEFAULT_METHOD,
                         tolerance: float = DEFAULT_TOLERANCE, frame: Optional[int] = None,
                         all_frames: bool = True, segmentation_node=None, table_node=None,
                         max_area_change: float = MAX_AREA_CHANGE, plot: bool = True,
                         **options) -> "SegmentJob":
    """:func:`segment_lumen` as a :class:`SegmentJob`: the frames are read, the seed placed and the
    output nodes checked now (call on the main thread); ``start()`` segments in a worker thread
    and ``poll()`` writes the result into the scene on the main thread."""
    if volume_node is None or volume_node.GetScene() is None:
        raise ValueError("volume_node must be a volume or sequence node that is in an MRML scene")
    _check_output_nodes(segmentation_node, table_node)
    frames = _read_frames(volume_node)
    if segmentation_node is not None and frames.slice_frames and browser_showing(segmentation_node) is not None:
        # the proxy of an earlier sequence result: its browser would replace this result with a
        # frame of that sequence at its next step (the module remembers the last segmentation)
        segmentation_node = None
    start = _start_frame(frames, frame, seed_ras, seed_ijk)
    i, j, _ = _seed_ijk(frames.geometry(start), seed_ras, seed_ijk, frames.transform_node)
    return SegmentJob(volume_node.GetScene(), volume_node, frames, (i, j, start), range(len(frames.pixels)) if all_frames else [start],
                      dict(method=method, tolerance=tolerance, spacing_mm=_frame_spacing_rc(frames.geometry(start)),
                           max_area_change=max_area_change, **options),
                      segmentation_node, table_node, plot)


class SegmentJob(BackgroundJob):
    """Lumen segmentation of frames read on the main thread, in a worker thread that never
    touches MRML; progress counts segmented frames and :meth:`cancel` takes effect after the
    current frame. :meth:`poll` (main thread) writes the table, segmentation(s) and plot, all
    of them or, when the job was cancelled or failed, none (nodes it made are removed again)."""

    what = "lumen segmentation"

    def __init__(self, scene, volume_node, frames: _Frames, seed_ijk: Tuple[int, int, int], wanted, options: dict,
                 segmentation_node=None, table_node=None, plot: bool = True):
        super().__init__(len(wanted))
        self.scene, self.volume_node, self.frames = scene, volume_node, frames
        self.seed_ijk = tuple(int(v) for v in seed_ijk)
        self.wanted, self.options = list(wanted), options
        self.segmentation_node, self.table_node, self.plot = segmentation_node, table_node, plot

    def compute(self) -> SequenceResult:
        """Worker thread: numpy, scipy and VTK filters only."""
        self.check_cancel()
        i, j, start = self.seed_ijk
        return segment_sequence(self.frames.pixels, (j, i), start_frame=start, frames_to_segment=self.wanted,
                                progress=self._progress, **self.options)

    def _progress(self, done: int, _total: int) -> None:
        self.done = done
        self.check_cancel()

    def store(self, result: SequenceResult) -> LumenResult:
        """Main thread: the outputs, all or none."""
        scene, frames = self.scene, self.frames
        check_still_in_scene(scene, "segmented", input=self.volume_node, browser=frames.browser_node,
                             segmentation=self.segmentation_node, table=self.table_node)
        segmented = sorted(self.wanted)
        name = base_name(self.volume_node)
        with CreatedNodes(scene) as created:
            table_node = _fill_table(created, self.table_node, name, result, segmented)
            lumen = LumenResult(None, table_node, "", self.seed_ijk, segmented, result)
            if frames.slice_frames:
                lumen.segmentation_node, lumen.segment_id = _write_segmentation(
                    created, self.segmentation_node, self.volume_node, result.masks, frames.transform_node)
            else:
                _write_sequence_segmentations(created, lumen, frames, self.segmentation_node, self.seed_ijk[2])
            if self.plot and len(segmented) > 1:
                lumen.plot_series_node, lumen.plot_chart_node = _add_plot(created, table_node, name)
        return lumen


def last_seed_ras(markups_node) -> Optional[Tuple[float, float, float]]:
    """World RAS of the last placed point of a point list (the seed the user placed most
    recently; earlier points are ignored), None when no point is placed."""
    if markups_node is None:
        return None
    defined = getattr(markups_node, "PositionDefined", None)
    for n in reversed(range(markups_node.GetNumberOfControlPoints())):
        if defined is not None and markups_node.GetNthControlPointPositionStatus(n) != defined:
            continue     # a point being placed, or a preview without a position
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, position)
        return tuple(position)
    return None



# ----------------------------------------------------------------------------- reading

def _check_output_nodes(segmentation_node, table_node) -> None:
    """Before any work: given output nodes must be of the right class."""
    import slicer

    if segmentation_node is not None and not isinstance(segmentation_node, slicer.vtkMRMLSegmentationNode):
        raise ValueError(f"segmentation_node {display_name(segmentation_node)} is not a vtkMRMLSegmentationNode")
    if table_node is not None and not isinstance(table_node, slicer.vtkMRMLTableNode):
        raise ValueError(f"table_node {display_name(table_node)} is not a vtkMRMLTableNode")


def _read_frames(node) -> _Frames:
    import slicer

    if isinstance(node, slicer.vtkMRMLSequenceNode):
        return _read_sequence(node)
    return _Frames(read_pixels(node).grey, [node], True, transform_node=node.GetParentTransformNode())


def _read_sequence(sequence_node) -> _Frames:
    items = read_sequence_items(sequence_node)
    for i, item in enumerate(items):
        if item.grey.shape[0] != 1:
            raise ValueError(f"sequence {display_name(sequence_node)} item {i} has {item.grey.shape[0]} slices; "
                             "each item must be one 2D frame")
    count = len(items)
    nodes = [sequence_node.GetNthDataNode(i) for i in range(count)]
    values = [sequence_node.GetNthIndexValue(i) for i in range(count)]
    _sequence, browser, proxy = resolve_sequence(sequence_node)
    transform = proxy.GetParentTransformNode() if proxy is not None else None
    return _Frames(np.concatenate([item.grey for item in items]), nodes, False, sequence_node, values, transform,
                   browser)


def _start_frame(frames: _Frames, frame: Optional[int], seed_ras, seed_ijk) -> int:
    n = len(frames.pixels)
    if frame is None:
        if not frames.slice_frames:
            shown = browser_item_number(frames.browser_node, frames.sequence_node)
            frame = 0 if shown is None else shown
        else:
            frame = _seed_ijk(frames.geometry(0), seed_ras, seed_ijk, frames.transform_node)[2]
    if not 0 <= int(frame) < n:
        raise ValueError(f"frame {frame} is outside the input's {n} frames (0..{n - 1})")
    return int(frame)


def _seed_ijk(volume_node, seed_ras, seed_ijk, transform_node=None) -> Tuple[int, int, int]:
    """Seed as integer (i, j, k): seed_ijk rounded, or seed_ras through the volume's RASToIJK
    (after undoing ``transform_node``, the parent transform the volume is shown under, so a
    point picked in a view lands on the voxel shown)."""
    import vtk

    if (seed_ras is None) == (seed_ijk is None):
        raise ValueError("give exactly one of seed_ras (R, A, S) and seed_ijk (i, j, k)")
    if seed_ijk is not None:
        ijk = _three_floats(seed_ijk, "seed_ijk")
    else:
        ras = _three_floats(seed_ras, "seed_ras")
        ras = _world_to_local(transform_node, ras)
        ras_to_ijk = vtk.vtkMatrix4x4()
        volume_node.GetRASToIJKMatrix(ras_to_ijk)
        ijk = ras_to_ijk.MultiplyPoint((*ras, 1.0))[:3]
    dims = volume_node.GetImageData().GetDimensions()
    rounded = tuple(int(round(v)) for v in ijk)
    if not all(0 <= v < d for v, d in zip(rounded, dims)):
        where = f"RAS {tuple(seed_ras)}" if seed_ras is not None else "IJK"
        raise ValueError(f"seed {where} -> IJK {tuple(round(v, 2) for v in ijk)} is outside the volume "
                         f"{display_name(volume_node)} of {dims[0]}x{dims[1]}x{dims[2]} voxels; "
                         "place the seed inside the image")
    return rounded


def _world_to_local(parent, ras: Tuple[float, float, float]) -> Tuple[float, float, float]:
    import slicer
    import vtk

    if parent is None:
        return ras
    world_to_local = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, world_to_local)
    return tuple(world_to_local.TransformPoint(ras))


def _three_floats(values, name: str) -> Tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be three numbers, got {values!r}") from err
    if len(out) != 3 or not all(np.isfinite(out)):
        raise ValueError(f"{name} must be three finite numbers, got {values!r}")
    return out


def _frame_spacing_rc(volume_node) -> Tuple[float, float]:
    """(row, column) spacing in mm: IJK j is the row axis, i the column axis."""
    spacing = volume_node.GetSpacing()
    return float(spacing[1]), float(spacing[0])


# ----------------------------------------------------------------------------- writing

def _write_segmentation(created: CreatedNodes, segmentation_node, volume_node, masks: np.ndarray,
                        transform_node=None, stem: Optional[str] = None):
    """Put (k, j, i) masks as the "Carotid lumen" segment of a segmentation in the volume's
    geometry, under ``transform_node`` (the volume's parent transform); a new node is named
    "``stem`` lumen" (default: the volume's name)."""
    if segmentation_node is None:
        segmentation_node = created.add("vtkMRMLSegmentationNode", f"{stem or base_name(volume_node)} lumen")
        segmentation_node.CreateDefaultDisplayNodes()
        created.track_display(segmentation_node)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetAndObserveTransformNodeID(transform_node.GetID() if transform_node is not None else None)
    segment_id = _import_lumen(segmentation_node, _oriented_labelmap(masks, volume_node))
    return segmentation_node, segment_id


def _import_lumen(segmentation_node, labelmap) -> str:
    """Replace the "Carotid lumen" segment by the labelmap's label 1 (import of a labelmap, as
    Segmentations' "Import labelmap" does); an empty mask gives an empty segment."""
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    old_id = segmentation.GetSegmentIdBySegmentName(LUMEN_SEGMENT_NAME)
    if old_id:
        segmentation.RemoveSegment(old_id)
    before = set(_segment_ids(segmentation))
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap, segmentation_node, LUMEN_SEGMENT_NAME)
    if not ok:
        raise RuntimeError(f"importing the lumen labelmap into {display_name(segmentation_node)} failed")
    new_ids = [sid for sid in _segment_ids(segmentation) if sid not in before]
    if new_ids:
        segment_id = new_ids[0]
    else:   # an all-zero labelmap imports no segment: keep an empty one so the name is there
        segment_id = segmentation.AddEmptySegment("", LUMEN_SEGMENT_NAME)
    segment = segmentation.GetSegment(segment_id)
    segment.SetName(LUMEN_SEGMENT_NAME)     # the import appends the label value to the name
    segment.SetColor(*LUMEN_COLOR)
    return segment_id


def _segment_ids(segmentation) -> List[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _oriented_labelmap(masks: np.ndarray, volume_node):
    """(k, j, i) bool -> vtkOrientedImageData with the volume's IJKToRAS (label 1 = lumen)."""
    import slicer
    import vtk

    image = image_from_array(masks.astype(np.uint8), slicer.vtkOrientedImageData())
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    image.SetImageToWorldMatrix(ijk_to_ras)
    return image


def _write_sequence_segmentations(created: CreatedNodes, lumen: LumenResult, frames: _Frames, segmentation_node,
                                  start: int) -> None:
    """One segmentation per frame into the sequence of an earlier run (else a new one); the
    browser playing the input plays it with the scene's segmentation node as its proxy."""
    scene, source, browser = created.scene, frames.sequence_node, frames.browser_node
    stem = base_name(source, "Sequence")
    sequence, segmentation_node = _earlier_lumen_sequence(browser, segmentation_node, source)
    if sequence is None:     # "<input> lumen sequence", shown by "<input> lumen" (as despeckling names its output)
        sequence = created.add("vtkMRMLSequenceNode", f"{stem} lumen sequence")
    else:
        sequence.RemoveAllDataNodes()
    sequence.SetIndexName(source.GetIndexName())
    sequence.SetIndexUnit(source.GetIndexUnit())
    sequence.SetIndexType(source.GetIndexType())
    sequence.SetAttribute(LUMEN_SOURCE_ATTRIBUTE, source.GetID() or "")
    # Each frame's segmentation is built in the scene (the import makes display nodes there),
    # copied into the sequence, then removed with its display nodes: the usual way to record items.
    frame_segmentation = created.add("vtkMRMLSegmentationNode", "__lumen frame__")
    try:
        for k in lumen.frames:
            frame_segmentation.SetReferenceImageGeometryParameterFromVolumeNode(frames.geometry(k))
            _import_lumen(frame_segmentation, _oriented_labelmap(lumen.sequence.masks[k][None], frames.geometry(k)))
            frame_segmentation.SetName(f"{stem} lumen {k}")
            sequence.SetDataNodeAtValue(frame_segmentation, frames.index_values[k])
    finally:
        remove_with_display_nodes(scene, frame_segmentation)
    lumen.segmentation_sequence_node = sequence
    lumen.segmentation_node, lumen.segment_id = _write_segmentation(
        created, segmentation_node, frames.geometry(start), lumen.sequence.masks[start][None], frames.transform_node,
        stem)      # named as the lumen sequence it shows, not after one frame's item
    if browser is not None:
        play_as_proxy(browser, sequence, lumen.segmentation_node)
        lumen.segment_id = lumen.segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(
            LUMEN_SEGMENT_NAME) or lumen.segment_id


def _earlier_lumen_sequence(browser, segmentation_node, source):
    """(lumen sequence of an earlier run on ``source`` played by ``browser``, the segmentation
    node to use as its proxy). A given segmentation node that is the proxy of another sequence
    is not taken over: a new one is made (None)."""
    if browser is None:
        return None, (segmentation_node if browser_showing(segmentation_node) is None else None)
    if segmentation_node is not None:
        shown = browser.GetSequenceNode(segmentation_node)
        if shown is None:     # free, unless another browser shows it: not taken over
            return None, (segmentation_node if browser_showing(segmentation_node) is None else None)
        if shown.GetAttribute(LUMEN_SOURCE_ATTRIBUTE) == source.GetID():
            return shown, segmentation_node
        return None, None
    for sequence in synchronized_sequences(browser):
        proxy = browser.GetProxyNode(sequence)
        if sequence.GetAttribute(LUMEN_SOURCE_ATTRIBUTE) == source.GetID() and proxy is not None and \
                proxy.IsA("vtkMRMLSegmentationNode"):
            return sequence, proxy
    return None, None


def _fill_table(created: CreatedNodes, table_node, name: str, result: SequenceResult, frames: List[int]):
    """(Re)fill a table: the :data:`TABLE_COLUMNS`, one row per frame."""
    import vtk

    if table_node is None:
        table_node = created.add("vtkMRMLTableNode", f"{name} lumen measurements")
    columns = (vtk.vtkIntArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray(), vtk.vtkDoubleArray(),
               vtk.vtkDoubleArray(), vtk.vtkIntArray(), vtk.vtkStringArray())
    for column, column_name in zip(columns, TABLE_COLUMNS):
        column.SetName(column_name)
    for k in frames:
        m = result.measurements[k]
        columns[0].InsertNextValue(k)
        columns[1].InsertNextValue(m.area_mm2)
        columns[2].InsertNextValue(m.equivalent_diameter_mm)
        columns[3].InsertNextValue(m.major_diameter_mm)
        columns[4].InsertNextValue(m.minor_diameter_mm)
        columns[5].InsertNextValue(int(result.flagged[k]))
        columns[6].InsertNextValue(result.flag_reasons[k])
    table = vtk.vtkTable()
    for column in columns:
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)
    table_node.SetColumnUnitLabel("area_mm2", "mm2")
    table_node.SetColumnUnitLabel("diameter_mm", "mm")
    table_node.SetColumnDescription("diameter_mm", "equivalent diameter 2*sqrt(area/pi)")
    for axis in ("major", "minor"):
        table_node.SetColumnUnitLabel(f"{axis}_diameter_mm", "mm")
        table_node.SetColumnDescription(f"{axis}_diameter_mm",
                                        f"{axis} axis of the ellipse with the lumen's area moments")
    table_node.SetColumnDescription("flagged", "1: implausible (leak, weak boundary, not a dark lumen, area jump, "
                                               "empty); do not trust, see note")
    return table_node


def _add_plot(created: CreatedNodes, table_node, name: str):
    """Equivalent diameter over frames, as a plot series and chart (shown by Slicer's Plots)."""
    import slicer

    scene = created.scene
    series = _plot_series_of(scene, table_node)      # reused: a rerun must not add series and charts
    if series is None:
        series = created.add("vtkMRMLPlotSeriesNode", f"{name} lumen diameter")
        series.SetAttribute(PLOT_ATTRIBUTE, "diameter")
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName("frame")
    series.SetYColumnName("diameter_mm")
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    chart = nodes_of_class(scene, "vtkMRMLPlotChartNode", lambda c: c.HasPlotSeriesNodeID(series.GetID()))
    chart = chart[0] if chart else created.add("vtkMRMLPlotChartNode", f"{name} lumen diameter chart")
    if not chart.HasPlotSeriesNodeID(series.GetID()):
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle("Carotid lumen diameter")
    chart.SetXAxisTitle("frame")
    chart.SetYAxisTitle("equivalent diameter (mm)")
    return series, chart


def _plot_series_of(scene, table_node):
    """The diameter series an earlier run made for ``table_node``, None when there is none."""
    found = nodes_of_class(scene, "vtkMRMLPlotSeriesNode", lambda n: n.GetAttribute(PLOT_ATTRIBUTE) == "diameter"
                           and n.GetTableNodeID() == table_node.GetID())
    return found[0] if found else None


#: Table column :func:`add_boundary_uncertainty` adds: the share of each frame's contour whose
#: position the despeckler's uncertainty map leaves uncertain by more than a pixel.
BOUNDARY_UNCERTAINTY_COLUMN = "boundary_uncertain_share"


def add_boundary_uncertainty(lumen: LumenResult, uncertainty_node, segmented_node) -> List[float]:
    """Add each segmented frame's boundary uncertainty to ``lumen``'s table (column
    :data:`BOUNDARY_UNCERTAINTY_COLUMN`, replaced on a rerun) and return it in table order:
    :func:`~Speckle2SelfLib.segmentation.uncertain_boundary_share` of the frame's mask, from
    ``uncertainty_node`` (the map ``Speckle2SelfLogic.despeckle_volume(..., uncertainty=True)``
    wrote, ``last_uncertainty_node``) and ``segmented_node`` (the volume that was segmented: the
    despeckled one). For a lumen measured on every frame of a sequence, both are sequences (or the
    volumes that show them: the proxies): the map sequence of ``despeckle_sequence(...,
    uncertainty=True)`` and the segmented sequence, whose frames the map's items match by index value."""
    from ..segmentation import uncertain_boundary_share

    if lumen.segmentation_sequence_node is None:
        maps, frames = _volume_map_and_frames(uncertainty_node, segmented_node)
    else:
        maps, frames = _sequence_map_and_frames(lumen, uncertainty_node, segmented_node)
    masks = lumen.sequence.masks
    if maps.shape != masks.shape or frames.shape != masks.shape:
        raise ValueError(f"the uncertainty map {maps.shape} and the segmented volume {frames.shape} must have the "
                         f"lumen's voxel grid {masks.shape}; pass the map of the volume that was segmented")
    shares = [uncertain_boundary_share(masks[k], maps[k], frames[k]) for k in lumen.frames]
    _write_share_column(lumen.table_node, shares)
    return shares


def _volume_map_and_frames(uncertainty_node, segmented_node) -> Tuple[np.ndarray, np.ndarray]:
    """The map and the segmented frames of a lumen measured on one volume (its slices are the frames)."""
    from .nodes import volume_to_array

    for role, node in (("uncertainty", uncertainty_node), ("segmented", segmented_node)):
        if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(f"the lumen was measured on one volume, so the {role} node must be a scalar volume node; "
                             "despeckle the volume with uncertainty=True and pass its nodes")
    return volume_to_array(uncertainty_node), volume_to_array(segmented_node)


def _sequence_map_and_frames(lumen: LumenResult, uncertainty_node, segmented_node) -> Tuple[np.ndarray, np.ndarray]:
    """The maps and the segmented frames of a lumen measured on every frame of a sequence, one per
    segmented item in item order (the order of the lumen's masks)."""
    maps, segmented = _sequence_of(uncertainty_node, "uncertainty"), _sequence_of(segmented_node, "segmented")
    if lumen.segmentation_sequence_node.GetAttribute(LUMEN_SOURCE_ATTRIBUTE) != segmented.GetID():
        raise ValueError(f"the lumen was not measured on sequence {display_name(segmented)}; pass the sequence (or "
                         "its proxy) that was segmented")
    return _items_at_values_of(maps, segmented), _items_at_values_of(segmented, segmented)


def _sequence_of(node, role: str):
    """``node`` when it is a sequence, the sequence it shows when it is a proxy volume."""
    import slicer

    if isinstance(node, slicer.vtkMRMLSequenceNode):
        return node
    found = find_sequence(node)
    if found is None:
        raise ValueError(f"the lumen was measured on every frame of a sequence, so the {role} node must be a sequence "
                         f"(or its proxy volume), not {display_name(node)}; pass the sequences despeckle_sequence("
                         "uncertainty=True) gave")
    return found[0]


def _items_at_values_of(sequence, segmented) -> np.ndarray:
    """(N, rows, cols) grey frames of ``sequence``: its item at each index value of ``segmented``."""
    frames = []
    for k in range(segmented.GetNumberOfDataNodes()):
        value = segmented.GetNthIndexValue(k)
        item = sequence.GetItemNumberFromIndexValue(value, True)
        if item < 0:
            raise ValueError(f"sequence {display_name(sequence)} has no item at {segmented.GetIndexName()} {value} of "
                             f"the segmented sequence {display_name(segmented)}; pass the map made with it")
        frames.append(read_pixels(sequence.GetNthDataNode(item)).grey)
    return np.concatenate(frames)


def _write_share_column(table_node, shares: List[float]) -> None:
    """(Re)place the :data:`BOUNDARY_UNCERTAINTY_COLUMN` of ``table_node`` (one value per row)."""
    import vtk

    table = table_node.GetTable()
    if table.GetColumnByName(BOUNDARY_UNCERTAINTY_COLUMN) is not None:
        table.RemoveColumnByName(BOUNDARY_UNCERTAINTY_COLUMN)
    column = vtk.vtkDoubleArray()
    column.SetName(BOUNDARY_UNCERTAINTY_COLUMN)
    for share in shares:
        column.InsertNextValue(share)
    table.AddColumn(column)
    table_node.SetColumnDescription(
        BOUNDARY_UNCERTAINTY_COLUMN, "share (0-1) of the contour where the despeckled image's uncertainty exceeds "
                                     "the wall's contrast per pixel: higher, less trustworthy boundary")
    table_node.Modified()
