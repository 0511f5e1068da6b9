"""Seed -> "Carotid lumen" segmentation node and measurement table, on real MRML nodes (slicer-core).

The scene is set up as a headless Slicer app sets it up: an MRML scene, the application logic
and the Segmentations module logic observing it. Frames are a smoothed speckled phantom
(dark lumen disk in a bright wall ring in grey tissue), in volumes with non-unit spacing and
rotated/flipped axes so that any mix-up of i/j, rows/columns or RAS/IJK shows.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
vtk = pytest.importorskip("vtk")

from benchlib.lumen_evaluation import iou  # noqa: E402
from test_mrml_despeckle import node_ids, run_job  # noqa: E402
from Speckle2SelfLib.scene import lumen as scene_lumen  # noqa: E402
from Speckle2SelfLib.segmentation import measure  # noqa: E402

ROWS, COLS = 90, 110
RADIUS = 14
SPACING = (0.2, 0.1, 1.5)                  # (i, j, k) mm: columns 0.2 mm, rows 0.1 mm
ORIGIN = (12.0, -30.0, 7.0)
# IJK -> RAS directions (columns of the matrix): i -> -A, j -> +R, k -> -S (rotated and flipped)
DIRECTIONS = ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
TOLERANCE = 80.0


def lumen_frame(center_rc, seed=0, radius=RADIUS):
    """(uint8 frame, true mask): dark disk, bright ring, grey tissue, smoothed speckle."""
    rng = np.random.default_rng(seed)
    rr, cc = np.ogrid[:ROWS, :COLS]
    distance = np.hypot(rr - center_rc[0], cc - center_rc[1])
    echo = np.full((ROWS, COLS), 90.0)
    echo[distance <= radius + 4] = 220.0
    echo[distance <= radius] = 15.0
    speckle = ndimage.gaussian_filter(rng.rayleigh(1.0, echo.shape), 1.0)
    image = ndimage.gaussian_filter(echo * speckle / speckle.mean(), 2.0)
    return np.clip(image, 0, 255).astype(np.uint8), distance <= radius


def make_volume(scene, frames, name="Carotid"):
    """Scalar volume node of (k, j, i) frames with the test geometry."""
    from vtk.util import numpy_support

    frames = np.ascontiguousarray(frames)
    image = vtk.vtkImageData()
    image.SetDimensions(frames.shape[2], frames.shape[1], frames.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(frames.ravel(), deep=True))
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetAndObserveImageData(image)
    volume.SetSpacing(*SPACING)
    volume.SetOrigin(*ORIGIN)
    volume.SetIJKToRASDirections(*[DIRECTIONS[col][row] for row in range(3) for col in range(3)])
    return volume


def ijk_to_ras(volume, ijk):
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix.MultiplyPoint((*map(float, ijk), 1.0))[:3]


def segment_array(segmentation_node, segment_id, shape):
    """The segment's labelmap as a (k, j, i) bool array in the reference volume's index space."""
    from vtk.util import numpy_support

    labelmap = segmentation_node.GetBinaryLabelmapInternalRepresentation(segment_id)
    extent = labelmap.GetExtent()
    full = np.zeros(shape, bool)
    if extent[1] < extent[0]:
        return full
    dims = labelmap.GetDimensions()
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    full[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1] = values == label
    return full


def assert_same_geometry(labelmap, volume):
    directions = [[0.0] * 3 for _ in range(3)]
    volume.GetIJKToRASDirections(directions)
    label_directions = [[0.0] * 3 for _ in range(3)]
    labelmap.GetDirections(label_directions)
    np.testing.assert_allclose(labelmap.GetSpacing(), volume.GetSpacing())
    np.testing.assert_allclose(labelmap.GetOrigin(), volume.GetOrigin())
    np.testing.assert_allclose(label_directions, directions)


def table_column(table_node, name):
    column = table_node.GetTable().GetColumnByName(name)
    assert column is not None, f"table has no column {name!r}"
    return [column.GetValue(i) for i in range(column.GetNumberOfTuples())]


def test_single_frame_from_ras_seed(scene):
    frame, truth = lumen_frame((40, 60))
    volume = make_volume(scene, frame[None])
    result = scene_lumen.segment_lumen(volume, ijk_to_ras(volume, (60, 40, 0)), tolerance=TOLERANCE)

    assert result.seed_ijk == (60, 40, 0)
    segmentation = result.segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    assert segmentation.GetSegment(result.segment_id).GetName() == "Carotid lumen"
    reference = slicer.vtkMRMLSegmentationNode()
    reference.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    geometry = "Reference image geometry"
    assert segmentation.GetConversionParameter(geometry) == reference.GetSegmentation().GetConversionParameter(geometry)
    assert_same_geometry(result.segmentation_node.GetBinaryLabelmapInternalRepresentation(result.segment_id), volume)

    mask = segment_array(result.segmentation_node, result.segment_id, (1, ROWS, COLS))
    np.testing.assert_array_equal(mask, result.sequence.masks)
    print(f"MRML single frame IoU {iou(mask[0], truth):.3f}")
    assert iou(mask[0], truth) > 0.8

    expected = measure(mask[0], (SPACING[1], SPACING[0]))      # (row, column) spacing
    assert table_column(result.table_node, "frame") == [0]
    assert table_column(result.table_node, "area_mm2") == [pytest.approx(expected.area_mm2)]
    assert table_column(result.table_node, "diameter_mm") == [pytest.approx(expected.equivalent_diameter_mm)]
    assert table_column(result.table_node, "flagged") == [0]
    assert expected.area_mm2 == pytest.approx(truth.sum() * 0.02, rel=0.15)
    # ellipse diameters in mm (rows 0.1 mm, columns 0.2 mm: the round lumen is 2.8 x 5.6 mm)
    assert table_column(result.table_node, "major_diameter_mm") == [pytest.approx(expected.major_diameter_mm)]
    assert table_column(result.table_node, "minor_diameter_mm") == [pytest.approx(expected.minor_diameter_mm)]
    assert expected.major_diameter_mm == pytest.approx(2 * RADIUS * SPACING[0], rel=0.15)
    assert expected.minor_diameter_mm == pytest.approx(2 * RADIUS * SPACING[1], rel=0.15)


def test_seed_ijk_and_reuse_of_the_segmentation_node(scene):
    frame, _ = lumen_frame((40, 60))
    volume = make_volume(scene, frame[None])
    first = scene_lumen.segment_lumen(volume, seed_ijk=(60, 40, 0), tolerance=TOLERANCE)
    first.segmentation_node.GetSegmentation().AddEmptySegment("", "Other")
    again = scene_lumen.segment_lumen(volume, seed_ijk=(60, 40, 0), method="growcut", tolerance=TOLERANCE,
                                     segmentation_node=first.segmentation_node, table_node=first.table_node)
    segmentation = again.segmentation_node.GetSegmentation()
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
    assert names == ["Carotid lumen", "Other"]
    assert again.table_node is first.table_node and again.table_node.GetNumberOfRows() == 1
    mask = segment_array(again.segmentation_node, again.segment_id, (1, ROWS, COLS))
    np.testing.assert_array_equal(mask, again.sequence.masks)


def test_table_flags_implausible_frames_with_a_note(scene):
    frames, _ = moving_frames(4)
    frames[2] = 235                          # the lumen is lost: a bright frame
    frames[2, ::3, ::3] = 30
    volume = make_volume(scene, frames, "Cine")
    result = scene_lumen.segment_lumen(volume, seed_ijk=(45, 35, 0))
    table = result.table_node.GetTable()
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == list(scene_lumen.TABLE_COLUMNS)
    assert table_column(result.table_node, "flagged") == [0, 0, 1, 0]
    notes = table_column(result.table_node, "note")
    assert notes[2] and not notes[0] and not notes[3]
    for column in ("major_diameter_mm", "minor_diameter_mm"):
        expected = [getattr(measure(m, (SPACING[1], SPACING[0])), column) for m in result.sequence.masks]
        np.testing.assert_allclose(table_column(result.table_node, column), expected)


def test_seed_on_the_wall_is_refused_with_a_message(scene):
    from Speckle2SelfLib.segmentation import SeedNotInLumenError

    volume = make_volume(scene, lumen_frame((40, 60))[0][None])
    with pytest.raises(SeedNotInLumenError, match="bright tissue"):
        scene_lumen.segment_lumen(volume, seed_ijk=(60, 40 + RADIUS + 2, 0))
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


def test_seed_outside_volume_is_an_error(scene):
    volume = make_volume(scene, lumen_frame((40, 60))[0][None])
    with pytest.raises(ValueError, match="outside the volume"):
        scene_lumen.segment_lumen(volume, ijk_to_ras(volume, (200, 40, 0)))
    with pytest.raises(ValueError, match="exactly one"):
        scene_lumen.segment_lumen(volume)


def test_seed_in_world_coordinates_under_a_transform(scene):
    frame, _ = lumen_frame((40, 60))
    volume = make_volume(scene, frame[None])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 25.0)
    transform.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    local = ijk_to_ras(volume, (60, 40, 0))
    result = scene_lumen.segment_lumen(volume, (local[0] + 25.0, local[1], local[2]), tolerance=TOLERANCE)
    assert result.seed_ijk == (60, 40, 0)
    assert result.segmentation_node.GetParentTransformNode() is transform


def moving_frames(count=4):
    pairs = [lumen_frame((35 + 3 * k, 45 + 4 * k), seed=k) for k in range(count)]
    return np.stack([f for f, _ in pairs]), np.stack([t for _, t in pairs])


def test_multi_slice_volume_segments_every_frame(scene):
    frames, truths = moving_frames()
    volume = make_volume(scene, frames, "Cine")
    result = scene_lumen.segment_lumen(volume, ijk_to_ras(volume, (45, 35, 0)), tolerance=TOLERANCE)

    mask = segment_array(result.segmentation_node, result.segment_id, frames.shape)
    np.testing.assert_array_equal(mask, result.sequence.masks)
    assert all(iou(m, t) > 0.8 for m, t in zip(mask, truths))
    assert_same_geometry(result.segmentation_node.GetBinaryLabelmapInternalRepresentation(result.segment_id), volume)
    assert table_column(result.table_node, "frame") == [0, 1, 2, 3]
    expected = [measure(m, (SPACING[1], SPACING[0])).area_mm2 for m in mask]
    np.testing.assert_allclose(table_column(result.table_node, "area_mm2"), expected)
    assert result.plot_chart_node.GetNumberOfPlotSeriesNodes() == 1
    assert result.plot_series_node.GetYColumnName() == "diameter_mm"


def test_only_the_seed_frame_when_not_all_frames(scene):
    frames, _ = moving_frames(3)
    volume = make_volume(scene, frames, "Cine")
    result = scene_lumen.segment_lumen(volume, seed_ijk=(49, 38, 1), all_frames=False, tolerance=TOLERANCE)
    assert result.frames == [1]
    mask = segment_array(result.segmentation_node, result.segment_id, frames.shape)
    assert mask[1].any() and not mask[0].any() and not mask[2].any()
    assert result.plot_chart_node is None


def test_sequence_node_gets_a_segmentation_per_frame(scene):
    frames, truths = moving_frames(3)
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Loop")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    for k, frame in enumerate(frames):
        item = make_volume(scene, frame[None], f"frame {k}")
        sequence.SetDataNodeAtValue(item, f"{0.05 * k:.2f}")
        scene.RemoveNode(item)           # the sequence keeps its own copy
    result = scene_lumen.segment_lumen(sequence, seed_ijk=(45, 35, 0), tolerance=TOLERANCE)

    segmentations = result.segmentation_sequence_node
    assert segmentations.GetNumberOfDataNodes() == 3
    assert segmentations.GetNthIndexValue(2) == "0.10" and segmentations.GetIndexName() == "time"
    for k in range(3):
        node = segmentations.GetNthDataNode(k)
        segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("Carotid lumen")
        mask = segment_array(node, segment_id, (1, ROWS, COLS))[0]
        assert_same_geometry(node.GetBinaryLabelmapInternalRepresentation(segment_id), sequence.GetNthDataNode(k))
        assert iou(mask, truths[k]) > 0.8
    assert table_column(result.table_node, "flagged") == [0, 0, 0]
    assert result.segmentation_node.GetScene() is scene


# ----------------------------------------------------------------------------- sequences in a browser (issue #11)

def nodes_of_class(scene, class_name):
    collection = scene.GetNodesByClass(class_name)
    collection.UnRegister(None)
    return [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]


def tracked_loop(scene, frames, shift_r=25.0):
    """A PLUS-like recording: image frames (every 0.05 s) browsed with a denser primary clock
    sequence (every 0.025 s), the image proxy under an ImageToReference transform."""
    image = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Image")
    clock = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Clock")
    for sequence in (image, clock):
        sequence.SetIndexName("time")
        sequence.SetIndexUnit("s")
    for k, frame in enumerate(frames):
        item = make_volume(scene, frame[None], f"frame {k}")
        image.SetDataNodeAtValue(item, f"{0.05 * k:.3f}")
        scene.RemoveNode(item)
    tick = make_volume(scene, frames[0][None, :4, :4], "tick")
    for k in range(2 * len(frames) - 1):
        clock.SetDataNodeAtValue(tick, f"{0.025 * k:.3f}")
    scene.RemoveNode(tick)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "Recording")
    browser.SetAndObserveMasterSequenceNodeID(clock.GetID())
    browser.AddSynchronizedSequenceNode(image)
    scene.sequences_logic.UpdateProxyNodesFromSequences(browser)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToReference")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, shift_r)
    transform.SetMatrixTransformToParent(shift)
    proxy = browser.GetProxyNode(image)
    proxy.SetAndObserveTransformNodeID(transform.GetID())
    return image, browser, proxy, transform


def test_tracked_sequence_seed_frame_transform_and_proxy_segmentation(scene):
    frames, truths = moving_frames(3)
    image, browser, proxy, transform = tracked_loop(scene, frames)
    browser.SetSelectedItemNumber(2)      # clock 0.050 s = image item 1 (not image item 2)
    local = ijk_to_ras(image.GetNthDataNode(1), (49, 38, 0))     # frame 1's lumen centre
    seed_world = (local[0] + 25.0, local[1], local[2])

    result = scene_lumen.segment_lumen(image, seed_world, tolerance=TOLERANCE)

    assert result.seed_ijk == (49, 38, 1), "seed frame by index value, seed through the proxy's transform"
    assert result.segmentation_node.GetParentTransformNode() is transform
    segmentations = result.segmentation_sequence_node
    assert browser.GetProxyNode(segmentations) is result.segmentation_node
    assert browser.GetSequenceNode(result.segmentation_node) is segmentations
    assert len(nodes_of_class(scene, "vtkMRMLSegmentationNode")) == 1, "no proxy copy beside the result"
    for k in range(3):
        node = segmentations.GetNthDataNode(k)
        segment_id = node.GetSegmentation().GetSegmentIdBySegmentName("Carotid lumen")
        assert iou(segment_array(node, segment_id, (1, ROWS, COLS))[0], truths[k]) > 0.8
    browser.SetSelectedItemNumber(4)      # clock 0.100 s: the proxy shows image item 2's lumen
    shown = result.segmentation_node
    mask = segment_array(shown, shown.GetSegmentation().GetSegmentIdBySegmentName("Carotid lumen"), (1, ROWS, COLS))
    np.testing.assert_array_equal(mask[0], result.sequence.masks[2])
    assert shown.GetParentTransformNode() is transform

    counts = {c: len(nodes_of_class(scene, c)) for c in
              ("vtkMRMLSequenceNode", "vtkMRMLSegmentationNode", "vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode",
               "vtkMRMLTableNode", "vtkMRMLSegmentationDisplayNode")}
    browser.SetSelectedItemNumber(0)
    local = ijk_to_ras(image.GetNthDataNode(0), (45, 35, 0))
    again = scene_lumen.segment_lumen(image, (local[0] + 25.0, local[1], local[2]), tolerance=TOLERANCE,
                                     segmentation_node=result.segmentation_node, table_node=result.table_node)
    assert again.seed_ijk == (45, 35, 0)
    assert again.segmentation_sequence_node is segmentations and again.segmentation_node is result.segmentation_node
    assert again.plot_series_node is result.plot_series_node and again.plot_chart_node is result.plot_chart_node
    assert result.plot_chart_node.GetNumberOfPlotSeriesNodes() == 1
    assert segmentations.GetNumberOfDataNodes() == 3
    assert {c: len(nodes_of_class(scene, c)) for c in counts} == counts, "a rerun adds no nodes"
    assert browser.GetNumberOfSynchronizedSequenceNodes() == 2      # image + lumen (the clock is primary)


def test_a_single_image_is_never_segmented_into_an_earlier_sequence_results_proxy(scene):
    """The module remembers the last segmentation; after an all-frames run that is the proxy of
    the lumen sequence, whose browser would replace a single result written there."""
    frames, truths = moving_frames(3)
    image, browser, proxy, _transform = tracked_loop(scene, frames)
    local = ijk_to_ras(image.GetNthDataNode(0), (45, 35, 0))
    earlier = scene_lumen.segment_lumen(image, (local[0] + 25.0, local[1], local[2]), tolerance=TOLERANCE)
    shown = earlier.segmentation_node
    assert browser.GetSequenceNode(shown) is earlier.segmentation_sequence_node
    assert shown.GetName() == "Image lumen", "named after the sequence, not one frame's item"
    assert earlier.segmentation_sequence_node.GetName() == "Image lumen sequence"

    frame, truth = lumen_frame((40, 50), seed=7)
    other = make_volume(scene, frame[None], "Other")
    single = scene_lumen.segment_lumen(other, ijk_to_ras(other, (50, 40, 0)), tolerance=TOLERANCE,
                                       segmentation_node=shown)
    assert single.segmentation_node is not shown and browser.GetSequenceNode(single.segmentation_node) is None
    assert single.segmentation_node.GetName() == "Other lumen"
    browser.SetSelectedItemNumber(2)                 # browsing leaves the single result alone
    node = single.segmentation_node
    mask = segment_array(node, node.GetSegmentation().GetSegmentIdBySegmentName("Carotid lumen"), (1, ROWS, COLS))
    assert iou(mask[0], truth) > 0.8

    # another recording's all-frames run does not take over this browser's proxy either
    second, second_browser, _proxy, _t = tracked_loop(scene, frames)
    again = scene_lumen.segment_lumen(second, (local[0] + 25.0, local[1], local[2]), tolerance=TOLERANCE,
                                      segmentation_node=shown)
    assert again.segmentation_node is not shown
    assert browser.GetSequenceNode(shown) is earlier.segmentation_sequence_node
    assert second_browser.GetSequenceNode(again.segmentation_node) is again.segmentation_sequence_node


def test_seed_is_the_last_placed_point_of_the_list(scene):
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Seed")
    assert scene_lumen.last_seed_ras(points) is None and scene_lumen.last_seed_ras(None) is None
    points.AddControlPointWorld(vtk.vtkVector3d(1.0, 2.0, 3.0))
    points.AddControlPointWorld(vtk.vtkVector3d(4.0, 5.0, 6.0))      # re-placed seed
    assert scene_lumen.last_seed_ras(points) == (4.0, 5.0, 6.0)
    points.UnsetNthControlPointPosition(1)         # being placed again: not yet a seed
    assert scene_lumen.last_seed_ras(points) == (1.0, 2.0, 3.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(2, 3, 10.0)
    transform.SetMatrixTransformToParent(shift)
    points.SetAndObserveTransformNodeID(transform.GetID())
    assert scene_lumen.last_seed_ras(points) == (1.0, 2.0, 13.0)            # world coordinates


# ----------------------------------------------------------------------------- background job (defect 7)

def slowed_segmentation(monkeypatch, seconds_per_frame):
    """Every frame's segmentation takes ``seconds_per_frame`` longer (a long loop on a slow machine)."""
    import time

    from Speckle2SelfLib.segmentation import lumen as lumen_module

    original = lumen_module._segment_checked

    def slow(*args, **kwargs):
        time.sleep(seconds_per_frame)
        return original(*args, **kwargs)

    monkeypatch.setattr(lumen_module, "_segment_checked", slow)


def test_job_segments_in_a_thread_and_writes_everything_only_when_polled(scene):
    frames, truths = moving_frames(4)
    volume = make_volume(scene, frames, "Cine")
    seed = ijk_to_ras(volume, (45, 35, 0))
    ids = node_ids(scene)
    job = scene_lumen.prepare_segmentation(volume, seed, tolerance=TOLERANCE)
    assert node_ids(scene) == ids and job.total == 4, "preparing reads the frames and adds nothing"
    job.start()
    assert job.wait(60) and node_ids(scene) == ids, "the worker thread added nothing to the scene"
    state = job.poll()
    assert state.finished and state.error is None and (state.done, state.total) == (4, 4)
    result = state.result
    mask = segment_array(result.segmentation_node, result.segment_id, frames.shape)
    np.testing.assert_array_equal(mask, result.sequence.masks)
    assert all(iou(m, t) > 0.8 for m, t in zip(mask, truths))
    assert table_column(result.table_node, "frame") == [0, 1, 2, 3] and result.plot_chart_node is not None
    added = len(node_ids(scene)) - len(ids)
    assert added > 0 and job.poll() is state and len(node_ids(scene)) - len(ids) == added, "stored once"
    blocking = scene_lumen.segment_lumen(volume, seed, tolerance=TOLERANCE)   # the same as the blocking call
    np.testing.assert_array_equal(blocking.sequence.masks, result.sequence.masks)


def test_job_progress_counts_frames_and_cancel_takes_effect_within_a_second(scene, monkeypatch):
    import time

    frames, _ = moving_frames(4)
    volume = make_volume(scene, np.concatenate([frames] * 10), "Long loop")      # 40 frames
    slowed_segmentation(monkeypatch, 0.05)                                        # 2 s of work
    ids = node_ids(scene)
    job = scene_lumen.prepare_segmentation(volume, ijk_to_ras(volume, (45, 35, 0)), tolerance=TOLERANCE)
    job.start()
    seen = []
    while len(seen) < 200 and (not seen or seen[-1] < 5):
        seen.append(job.poll().done)
        time.sleep(0.01)
    assert seen == sorted(seen) and 5 <= seen[-1] < 40, "progress moves frame by frame"
    asked = time.monotonic()
    job.cancel()
    assert job.wait(5)
    assert time.monotonic() - asked < 1.0, "cancel took effect after the current frame"
    state = job.poll()
    assert state.cancelled and not state.finished and state.error is None and state.done < 40
    assert node_ids(scene) == ids, "a cancelled job adds nothing"


def test_job_on_a_tracked_sequence_through_the_logic_with_a_seed_list(scene):
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    frames, truths = moving_frames(3)
    image, browser, proxy, transform = tracked_loop(scene, frames)
    browser.SetSelectedItemNumber(2)      # clock 0.050 s = image item 1
    local = ijk_to_ras(image.GetNthDataNode(1), (49, 38, 0))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Seed")
    points.AddControlPointWorld(vtk.vtkVector3d(local[0] + 25.0, local[1], local[2]))
    logic = Speckle2SelfLogic(sequences_logic=scene.sequences_logic)
    states = run_job(logic.prepare_segmentation(proxy, points, method="radial"))
    done = [s.done for s in states]
    assert done == sorted(done) and states[-1].finished, "progress only grows"
    result = states[-1].result
    assert result.seed_ijk == (49, 38, 1) and result.segmentation_node.GetParentTransformNode() is transform
    assert browser.GetProxyNode(result.segmentation_sequence_node) is result.segmentation_node
    assert all(iou(result.sequence.masks[k], truths[k]) > 0.8 for k in range(3))
    with pytest.raises(ValueError, match="Place a seed point"):
        logic.prepare_segmentation(proxy, scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Empty"))


def test_job_whose_input_left_the_scene_reports_an_error_and_adds_nothing(scene):
    frames, _ = moving_frames(2)
    volume = make_volume(scene, frames, "Cine")
    job = scene_lumen.prepare_segmentation(volume, ijk_to_ras(volume, (45, 35, 0)), tolerance=TOLERANCE)
    job.start()
    assert job.wait(60)
    scene.RemoveNode(volume)
    ids = node_ids(scene)
    state = job.poll()
    assert isinstance(state.error, ValueError) and "removed from the scene" in str(state.error)
    assert node_ids(scene) == ids


def test_job_that_fails_in_the_worker_adds_nothing(scene):
    from Speckle2SelfLib.segmentation import SeedNotInLumenError

    volume = make_volume(scene, lumen_frame((40, 60))[0][None])
    ids = node_ids(scene)
    states = run_job(scene_lumen.prepare_segmentation(volume, seed_ijk=(60, 40 + RADIUS + 2, 0)))
    assert isinstance(states[-1].error, SeedNotInLumenError) and not states[-1].finished
    assert node_ids(scene) == ids


def test_a_failure_while_writing_removes_the_nodes_the_job_made(scene, monkeypatch):
    frames, _ = moving_frames(3)
    volume = make_volume(scene, frames, "Cine")
    job = scene_lumen.prepare_segmentation(volume, ijk_to_ras(volume, (45, 35, 0)), tolerance=TOLERANCE)
    ids = node_ids(scene)

    def broken_plot(*_args):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(scene_lumen, "_add_plot", broken_plot)     # after the table and the segmentation
    states = run_job(job)
    assert isinstance(states[-1].error, RuntimeError) and node_ids(scene) == ids, "outputs whole or not at all"


def test_wrong_output_nodes_are_refused_before_any_work(scene):
    volume = make_volume(scene, lumen_frame((40, 60))[0][None])
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "Table")
    with pytest.raises(ValueError, match="is not a vtkMRMLSegmentationNode"):
        scene_lumen.prepare_segmentation(volume, seed_ijk=(60, 40, 0), segmentation_node=table)
    with pytest.raises(ValueError, match="is not a vtkMRMLTableNode"):
        scene_lumen.prepare_segmentation(volume, seed_ijk=(60, 40, 0), table_node=volume)


def test_logic_gives_the_module_its_one_parameter_node(scene):
    from Speckle2SelfLib.scene.logic import MODULE_NAME, Speckle2SelfLogic

    node = Speckle2SelfLogic.parameter_node(scene)
    assert node.IsA("vtkMRMLScriptedModuleNode") and node.GetAttribute("ModuleName") == MODULE_NAME
    assert Speckle2SelfLogic.parameter_node(scene) is node and node.GetSingletonTag() == MODULE_NAME
    node.RemoveAttribute("ModuleName")
    assert Speckle2SelfLogic.parameter_node(scene) is node and node.GetAttribute("ModuleName") == MODULE_NAME
