"""Despeckling volume and sequence nodes in a real (headless) MRML scene, via Speckle2SelfLib.scene
(Speckle2SelfLogic and its helpers).

The scene is set up as a headless Slicer app sets it up: an MRML scene, the application logic,
the colour logic (default colour tables for display nodes) and the Sequences and Segmentations
module logics observing it. Volumes get non-unit spacing, an origin and rotated/flipped axes so
that any loss of geometry shows. Speckle is simulated (Speckle2SelfLib.simulation); real PLUS
sequences and a real RGB Doppler DICOM from ../shared are used when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
vtk = pytest.importorskip("vtk")

from conftest import SHARED  # noqa: E402
from Speckle2SelfLib.scene import nodes  # noqa: E402
from Speckle2SelfLib.scene.logic import Speckle2SelfLogic, despeckle_node  # noqa: E402
from Speckle2SelfLib.engine.inference import Cancelled, Despeckler  # noqa: E402
from Speckle2SelfLib.engine import refine  # noqa: E402
from Speckle2SelfLib.engine.models import describe_model, read_metadata, resolve_model_path  # noqa: E402
from Speckle2SelfLib.fileio.imageio import to_luminance  # noqa: E402
from Speckle2SelfLib.simulation import simulate_phantom, speckle_contrast  # noqa: E402

SPACING = (0.3, 0.2, 1.5)
ORIGIN = (12.0, -30.0, 7.0)
# IJK -> RAS directions (columns): i -> -A, j -> +R, k -> -S
DIRECTIONS = ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0))
SIZE = (96, 112)     # (rows J, columns I)


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def fast(untrained_model):
    """An untrained model: for geometry, bookkeeping and error tests (not for quality)."""
    return Despeckler.from_file(untrained_model, device="cpu")


@pytest.fixture(scope="module")
def trained(trained_model):
    return Despeckler.from_file(trained_model, device="cpu")


@pytest.fixture(scope="module")
def phantoms():
    """Speckled uint8 B-mode frames of simulated phantoms and their homogeneous-region masks."""
    frames, masks = [], []
    for i, kind in enumerate(["layers", "carotid", "thyroid", "layers"]):
        phantom, sim = simulate_phantom(kind, seed=40 + i, size=SIZE)
        frames.append(np.round(sim.bmode * 255).astype(np.uint8))
        masks.append(phantom.homogeneous_mask)
    return np.stack(frames), np.stack(masks)


def set_geometry(volume):
    volume.SetSpacing(*SPACING)
    volume.SetOrigin(*ORIGIN)
    volume.SetIJKToRASDirections(*[DIRECTIONS[col][row] for row in range(3) for col in range(3)])


def make_image(voxels: np.ndarray):
    """vtkImageData of (k, j, i) or (k, j, i, c) voxels."""
    from vtk.util import numpy_support

    voxels = np.ascontiguousarray(voxels)
    components = voxels.shape[3] if voxels.ndim == 4 else 1
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.reshape(-1, components), deep=True))
    return image


def make_volume(scene, voxels, name="US", class_name="vtkMRMLScalarVolumeNode", window_level=(180.0, 100.0)):
    volume = scene.AddNewNodeByClass(class_name, name)
    volume.SetAndObserveImageData(make_image(voxels))
    set_geometry(volume)
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    if window_level and not isinstance(display, slicer.vtkMRMLVectorVolumeDisplayNode):
        display.AutoWindowLevelOff()
        display.SetWindowLevel(*window_level)
    return volume


def make_sequence(scene, frames, name="Cine", values=None, browser=True, index_type="NumericIndex"):
    """A sequence of 2D volumes (time in s), a browser playing it and its proxy volume."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    sequence.SetIndexType(getattr(slicer.vtkMRMLSequenceNode, index_type))
    values = values or [f"{0.04 * k + 1.5:.2f}" for k in range(len(frames))]
    for frame, value in zip(frames, values):
        item = slicer.vtkMRMLScalarVolumeNode()
        item.SetAndObserveImageData(make_image(frame[None] if frame.ndim == 2 else frame))
        set_geometry(item)
        sequence.SetDataNodeAtValue(item, value)
    if not browser:
        return sequence, None, None
    browser_node = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name + " browser")
    browser_node.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    scene.sequences_logic.UpdateProxyNodesFromSequences(browser_node)
    proxy = browser_node.GetProxyNode(sequence)
    proxy.CreateDefaultDisplayNodes()
    return sequence, browser_node, proxy


def matrix_of(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def tile_speckle_contrast(frame: np.ndarray, inside: np.ndarray, tile: int = 16) -> float:
    """Median std/mean over tiles that lie fully inside ``inside`` (real images have no masks)."""
    values = []
    for r in range(0, frame.shape[0] - tile + 1, tile):
        for c in range(0, frame.shape[1] - tile + 1, tile):
            if inside[r:r + tile, c:c + tile].all():
                patch = frame[r:r + tile, c:c + tile].astype(np.float64)
                values.append(patch.std() / patch.mean())
    assert len(values) >= 10, "too few tiles inside the image to measure speckle"
    return float(np.median(values))


# ----------------------------------------------------------------------------- volumes

def test_2d_volume_keeps_geometry_transform_display_and_input(scene, fast, phantoms):
    frames, _ = phantoms
    volume = make_volume(scene, frames[:1])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ProbeToReference")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    before = nodes.volume_to_array(volume)
    mtime, image_mtime = volume.GetMTime(), volume.GetImageData().GetMTime()

    out = Speckle2SelfLogic(fast).despeckle_volume(volume)

    assert out.GetName() == "US despeckled" and out.GetClassName() == "vtkMRMLScalarVolumeNode"
    result = nodes.volume_to_array(out)
    assert result.shape == (1, *SIZE) and result.dtype == np.uint8
    assert not np.array_equal(result, before)
    np.testing.assert_allclose(matrix_of(out), matrix_of(volume))
    np.testing.assert_allclose(out.GetSpacing(), SPACING)
    np.testing.assert_allclose(out.GetOrigin(), ORIGIN)
    assert out.GetParentTransformNode() is transform
    display = out.GetDisplayNode()
    assert not display.GetAutoWindowLevel() and (display.GetWindow(), display.GetLevel()) == (180.0, 100.0)
    np.testing.assert_array_equal(nodes.volume_to_array(volume), before)
    assert volume.GetMTime() == mtime and volume.GetImageData().GetMTime() == image_mtime


def test_despeckled_volume_is_less_speckled_in_homogeneous_region(scene, trained, phantoms):
    frames, masks = phantoms
    volume = make_volume(scene, frames[:1])
    out = Speckle2SelfLogic(trained).despeckle_volume(volume)
    before = speckle_contrast(frames[0], masks[0])
    after = speckle_contrast(nodes.volume_to_array(out)[0], masks[0])
    print(f"speckle contrast in the homogeneous region: {before:.3f} -> {after:.3f}")
    assert after < 0.6 * before


def test_3d_volume_is_despeckled_slice_by_slice_along_k(scene, fast, phantoms):
    frames, _ = phantoms
    volume = make_volume(scene, frames[:3])
    progress = []
    out = Speckle2SelfLogic(fast).despeckle_volume(volume, batch_size=1,
                                                     progress=lambda done, total: progress.append((done, total)))
    result = nodes.volume_to_array(out)
    assert result.shape == (3, *SIZE)
    for k in range(3):   # each K slice is an independent 2D frame
        np.testing.assert_array_equal(result[k], fast.denoise(frames[k]))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    np.testing.assert_allclose(matrix_of(out), matrix_of(volume))


def test_given_output_volume_is_filled_and_reused(scene, fast, phantoms):
    frames, _ = phantoms
    volume = make_volume(scene, frames[:1])
    output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Mine")
    count = scene.GetNumberOfNodes()
    out = Speckle2SelfLogic(fast).despeckle_volume(volume, output, blend=0.5)
    assert out is output and out.GetName() == "Mine"
    assert scene.GetNumberOfNodes() == count + 1      # only the output's display node is new
    np.testing.assert_array_equal(nodes.volume_to_array(out)[0], fast.denoise(frames[0], blend=0.5))


def rgb_with_colour_blob(grey: np.ndarray):
    """(1, J, I, 3) uint8 grey image with a red/yellow 'Doppler' blob, and the blob mask."""
    rgb = np.repeat(grey[None, ..., None], 3, axis=-1).copy()
    rr, cc = np.ogrid[:grey.shape[0], :grey.shape[1]]
    blob = np.hypot(rr - 40, cc - 60) < 12
    rgb[0][blob] = (230, 180, 20)
    return rgb, blob


def test_rgb_volume_gives_grey_output_of_its_luminance(scene, fast, phantoms):
    frames, _ = phantoms
    rgb, _ = rgb_with_colour_blob(frames[0])
    volume = make_volume(scene, rgb, "Capture", "vtkMRMLVectorVolumeNode")
    out = Speckle2SelfLogic(fast).despeckle_volume(volume)
    assert out.GetClassName() == "vtkMRMLScalarVolumeNode"
    result = nodes.volume_to_array(out)
    assert result.shape == (1, *SIZE) and result.dtype == np.uint8
    expected = fast.denoise(to_luminance(rgb)[0])
    np.testing.assert_array_equal(result[0], np.clip(np.rint(expected), 0, 255).astype(np.uint8))
    assert out.GetDisplayNode().GetWindow() == 255.0        # shown over the RGB input's 8-bit range
    np.testing.assert_array_equal(nodes.volume_to_array(volume), rgb)


def test_keep_colour_keeps_coloured_pixels_in_rgb_output(scene, fast, phantoms):
    frames, _ = phantoms
    rgb, blob = rgb_with_colour_blob(frames[0])
    volume = make_volume(scene, rgb, "Doppler", "vtkMRMLVectorVolumeNode")
    logic = Speckle2SelfLogic(fast)
    out = logic.despeckle_volume(volume, keep_colour=True)
    grey = nodes.volume_to_array(logic.despeckle_volume(volume))[0]
    assert out.GetClassName() == "vtkMRMLVectorVolumeNode"
    result = nodes.volume_to_array(out)[0]
    assert result.shape == (*SIZE, 3)
    np.testing.assert_array_equal(result[blob], rgb[0][blob])
    for channel in range(3):
        np.testing.assert_array_equal(result[~blob][:, channel], grey[~blob])
    np.testing.assert_allclose(matrix_of(out), matrix_of(volume))


# ----------------------------------------------------------------------------- sequences

def test_sequence_output_is_synchronised_and_keeps_index(scene, trained, phantoms):
    frames, masks = phantoms
    sequence, browser, proxy = make_sequence(scene, frames)
    browser.SetSelectedItemNumber(2)
    items_before = [nodes.volume_to_array(sequence.GetNthDataNode(i)) for i in range(4)]
    item_mtimes = [sequence.GetNthDataNode(i).GetMTime() for i in range(4)]

    result = Speckle2SelfLogic(trained, sequences_logic=scene.sequences_logic).despeckle_sequence(proxy)

    out_sequence = result.sequence_node
    assert result.browser_node is browser and not result.created_browser and result.frames == 4
    assert out_sequence.GetName() == "Cine despeckled sequence" and result.proxy_node.GetName() == "Cine despeckled"
    assert (out_sequence.GetIndexName(), out_sequence.GetIndexUnit(), out_sequence.GetIndexType()) == \
        ("time", "s", slicer.vtkMRMLSequenceNode.NumericIndex)
    assert [out_sequence.GetNthIndexValue(i) for i in range(4)] == [sequence.GetNthIndexValue(i) for i in range(4)]
    assert browser.IsSynchronizedSequenceNode(out_sequence, False)
    assert browser.GetProxyNode(out_sequence) is result.proxy_node
    for k in range(4):       # browsing shows input and output frame by frame
        browser.SetSelectedItemNumber(k)
        shown = nodes.volume_to_array(result.proxy_node)
        np.testing.assert_array_equal(shown, nodes.volume_to_array(out_sequence.GetNthDataNode(k)))
        np.testing.assert_array_equal(nodes.volume_to_array(proxy), frames[k][None])
        np.testing.assert_allclose(matrix_of(out_sequence.GetNthDataNode(k)), matrix_of(sequence.GetNthDataNode(k)))
        before, after = speckle_contrast(frames[k], masks[k]), speckle_contrast(shown[0], masks[k])
        assert after < 0.7 * before, f"frame {k}: speckle contrast {before:.3f} -> {after:.3f}"
    for i in range(4):
        np.testing.assert_array_equal(nodes.volume_to_array(sequence.GetNthDataNode(i)), items_before[i])
        assert sequence.GetNthDataNode(i).GetMTime() == item_mtimes[i]


def test_sequence_without_browser_gets_its_own_browser(scene, fast, phantoms):
    frames, _ = phantoms
    sequence, _, _ = make_sequence(scene, frames[:2], values=["a", "b"], browser=False, index_type="TextIndex")
    result = Speckle2SelfLogic(fast).despeckle_sequence(sequence)
    assert result.created_browser and result.browser_node.GetProxyNode(result.sequence_node) is result.proxy_node
    assert result.sequence_node.GetIndexType() == slicer.vtkMRMLSequenceNode.TextIndex
    assert [result.sequence_node.GetNthIndexValue(i) for i in range(2)] == ["a", "b"]


def test_rerun_into_the_same_output_replaces_the_earlier_sequence(scene, fast, phantoms):
    frames, _ = phantoms
    sequence, browser, proxy = make_sequence(scene, frames[:2])
    logic = Speckle2SelfLogic(fast, sequences_logic=scene.sequences_logic)
    first = logic.despeckle_sequence(proxy)
    ids = node_ids(scene)
    second = logic.despeckle_sequence(proxy, first.proxy_node, blend=0.5)
    assert second.proxy_node is first.proxy_node and second.sequence_node is not first.sequence_node
    assert first.sequence_node.GetScene() is None, "the earlier result left the scene"
    assert second.sequence_node.GetName() == "Cine despeckled sequence"
    assert len(node_ids(scene)) == len(ids)
    assert browser.GetSequenceNode(second.proxy_node) is second.sequence_node
    np.testing.assert_array_equal(nodes.volume_to_array(second.sequence_node.GetNthDataNode(1))[0],
                                  fast.denoise(frames[:2], blend=0.5)[1])   # same batch as the run
    other, _, _ = make_sequence(scene, frames[:2], name="Other", browser=False)
    with pytest.raises(ValueError, match="already shows sequence 'Cine despeckled sequence'"):
        logic.despeckle_sequence(other, second.proxy_node)


def test_a_single_volume_result_never_goes_into_an_earlier_sequence_results_proxy(scene, fast, phantoms):
    """The module remembers the last output; after a sequence run that is a proxy, and its
    browser would replace a single volume written there with a frame at its next step."""
    frames, _ = phantoms
    sequence, browser, proxy = make_sequence(scene, frames[:2])
    logic = Speckle2SelfLogic(fast, sequences_logic=scene.sequences_logic)
    earlier = logic.process(proxy, None).output_node
    assert browser.GetSequenceNode(earlier) is not None
    before = nodes.volume_to_array(earlier)
    other = make_volume(scene, frames[2:3], name="Other")
    for source, all_frames in ((other, True), (proxy, False)):      # Apply with another image / one frame
        run = logic.process(source, earlier, all_frames=all_frames)
        assert run.output_node is not earlier and browser.GetSequenceNode(run.output_node) is None
        np.testing.assert_array_equal(nodes.volume_to_array(earlier), before)
    # the console API, given such a node explicitly, says why instead of losing the result
    with pytest.raises(ValueError, match="shows a frame of sequence 'Cine despeckled sequence'"):
        logic.despeckle_volume(other, earlier)


def test_a_reused_output_takes_the_inputs_transform_or_none(scene, fast, phantoms):
    frames, _ = phantoms
    volume = make_volume(scene, frames[:1])
    probe = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Probe")
    volume.SetAndObserveTransformNodeID(probe.GetID())
    logic = Speckle2SelfLogic(fast, sequences_logic=scene.sequences_logic)
    out = logic.despeckle_volume(volume)
    assert out.GetParentTransformNode() is probe
    volume.SetAndObserveTransformNodeID(None)          # the input left the transform: so does the output
    assert logic.despeckle_volume(volume, out) is out and out.GetParentTransformNode() is None
    # a sequence result into a remembered output under a transform: the input proxy's (none)
    _sequence, _browser, proxy = make_sequence(scene, frames[:2])
    mine = make_volume(scene, frames[:1], name="Mine")
    mine.SetAndObserveTransformNodeID(probe.GetID())
    assert logic.despeckle_sequence(proxy, mine).proxy_node.GetParentTransformNode() is None


def test_console_api_despeckles_a_proxy_volume_or_all_its_frames(scene, fast, phantoms):
    frames, _ = phantoms
    sequence, browser, proxy = make_sequence(scene, frames[:2])
    single = despeckle_node(proxy, model=fast)
    assert single.IsA("vtkMRMLScalarVolumeNode") and single.GetName() == "Cine despeckled"
    assert browser.GetSequenceNode(single) is None          # one frame, not browsed
    out_sequence = despeckle_node(proxy, all_frames=True, model=fast)
    assert out_sequence.IsA("vtkMRMLSequenceNode") and out_sequence.GetNumberOfDataNodes() == 2
    assert browser.IsSynchronizedSequenceNode(out_sequence, False)
    assert nodes.find_sequence(proxy) == (sequence, browser) and nodes.find_sequence(single) is None


# ----------------------------------------------------------------------------- cancel

def test_cancel_while_despeckling_leaves_scene_as_it_was(scene, fast, phantoms):
    frames, _ = phantoms
    volume = make_volume(scene, frames[:3])
    ids = node_ids(scene)
    with pytest.raises(Cancelled):
        Speckle2SelfLogic(fast).despeckle_volume(volume, batch_size=1, cancel=lambda: True)
    assert node_ids(scene) == ids


def test_cancel_while_storing_sequence_removes_every_created_node(scene, fast, phantoms):
    frames, _ = phantoms
    sequence, browser, proxy = make_sequence(scene, frames)
    ids, synchronised = node_ids(scene), browser.GetNumberOfSynchronizedSequenceNodes()
    steps = []

    def cancel_after_two_stored_frames():   # denoising is done; the output sequence is half written
        return len(steps) >= 2 and steps[-1][0] >= 6

    with pytest.raises(Cancelled):
        Speckle2SelfLogic(fast).despeckle_sequence(
            sequence, batch_size=2, progress=lambda done, total: steps.append((done, total)),
            cancel=cancel_after_two_stored_frames)
    assert steps[-1] == (6, 8), "cancelled while storing frames"
    assert node_ids(scene) == ids
    assert browser.GetNumberOfSynchronizedSequenceNodes() == synchronised


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs_get_clear_errors(scene, fast, phantoms):
    frames, _ = phantoms
    logic = Speckle2SelfLogic(fast)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    empty.SetAndObserveImageData(vtk.vtkImageData())
    with pytest.raises(ValueError, match="'Empty' is an empty image"):
        logic.despeckle_volume(empty)
    no_image = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Blank")
    with pytest.raises(ValueError, match="'Blank' has no image data"):
        logic.despeckle_volume(no_image)
    labels = make_volume(scene, (frames[:1] > 128).astype(np.uint8), "Mask", "vtkMRMLLabelMapVolumeNode",
                         window_level=None)
    with pytest.raises(ValueError, match="'Mask' is a label map"):
        logic.despeckle_volume(labels)
    rgba = make_volume(scene, np.zeros((1, *SIZE, 4), np.uint8), "RGBA", "vtkMRMLVectorVolumeNode")
    with pytest.raises(ValueError, match="4-component voxels; only grey .* or RGB"):
        logic.despeckle_volume(rgba)
    grey = make_volume(scene, frames[:1], "Grey")
    with pytest.raises(ValueError, match="is the input; the input is never overwritten"):
        logic.despeckle_volume(grey, grey)
    rgb = make_volume(scene, np.repeat(frames[:1, ..., None], 3, axis=-1), "RGB", "vtkMRMLVectorVolumeNode")
    with pytest.raises(ValueError, match="'keep colour' gives RGB"):
        logic.despeckle_volume(rgb, grey, keep_colour=True)
    tiny = make_volume(scene, frames[:1, :4, :4], "Tiny")
    with pytest.raises(ValueError, match="too small"):
        logic.despeckle_volume(tiny)
    sagittal = make_volume(scene, np.ascontiguousarray(frames[0][:, :, None]), "Sagittal")   # K=96, J=112, I=1
    with pytest.raises(ValueError, match="'Sagittal' is 1x112x96 voxels: its image plane is not the IJ plane"):
        logic.despeckle_volume(sagittal)
    assert scene.GetFirstNodeByName("Tiny despeckled") is None


def test_sequence_of_mixed_frame_sizes_is_refused_without_touching_the_scene(scene, fast, phantoms):
    frames, _ = phantoms
    sequence, browser, _ = make_sequence(scene, [frames[0], frames[1][:80, :100]])
    ids = node_ids(scene)
    with pytest.raises(ValueError, match=r"mixes frame sizes.*item 1 is 100x80 grey, item 0 is 112x96 grey"):
        Speckle2SelfLogic(fast).despeckle_sequence(browser)
    assert node_ids(scene) == ids
    lone = make_volume(scene, frames[:1], "Lone")
    with pytest.raises(ValueError, match="not shown by a sequence browser"):
        Speckle2SelfLogic(fast).despeckle_sequence(lone)


def test_model_card_is_read_without_loading_the_model(trained_model):
    card = read_metadata(trained_model)
    assert card["name"] == "trained-test" and card["width"] == 8
    text = describe_model(card)
    assert "trained-test" in text and "width 8" in text and f"{card['training']['steps_done']} training steps" in text
    assert "guided smoothing" not in text and refine.recommended_mode(card) == "none"
    # the bundled default recommends the guided smoothing: the card says so and the module's
    # checkbox follows it when the model is chosen (refine.recommended_mode)
    default = read_metadata(resolve_model_path(None))
    assert refine.recommended_mode(default) == "guided"
    assert "recommends guided smoothing (sigma 12 px, range 0.06 on guide levels ^ 0.5)" in describe_model(default)
    wide = describe_model({**default, "refine_sigma_px": 14.0, "refine_range": 0.08, "refine_range_power": 1.0})
    assert "sigma 14 px, range 0.08)" in wide
    plain = describe_model({k: v for k, v in default.items() if not k.startswith("refine_")})
    assert "recommends guided smoothing (sigma 7 px, range 0.04)" in plain
    assert "not numbers" in describe_model({**default, "refine_sigma_px": "wide"})
    with pytest.raises(ValueError, match="cannot read model metadata"):
        read_metadata(Path(__file__))


# ----------------------------------------------------------------------------- real data (../shared)

def load_plus_sequence(scene, path: Path, frames: int):
    """A PLUS .igs.mha as a sequence of 2D volumes indexed by the frames' timestamps."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    voxels = sitk.GetArrayFromImage(image)[:frames]
    stamps = [image.GetMetaData(f"Seq_Frame{k:04d}_Timestamp") for k in range(len(voxels))]
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Image")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    for frame, stamp in zip(voxels, stamps):
        item = slicer.vtkMRMLScalarVolumeNode()
        item.SetAndObserveImageData(make_image(frame[None]))
        item.SetSpacing(*image.GetSpacing()[:2], 1.0)
        sequence.SetDataNodeAtValue(item, f"{float(stamp):.6f}")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "ImageBrowser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    scene.sequences_logic.UpdateProxyNodesFromSequences(browser)
    return sequence, browser, voxels


def test_real_plus_sequence_is_despeckled_frame_by_frame(scene, trained):
    path = SHARED / "sequences" / "UltrasonixCurvilinearScanConvertedData.igs.mha"
    if not path.is_file():
        pytest.skip(f"real PLUS sequence not available ({path} is absent; ../shared ships beside the checkout)")
    sequence, browser, voxels = load_plus_sequence(scene, path, frames=2)
    result = Speckle2SelfLogic(trained, sequences_logic=scene.sequences_logic).despeckle_sequence(browser)
    assert [result.sequence_node.GetNthIndexValue(i) for i in range(2)] == \
        [sequence.GetNthIndexValue(i) for i in range(2)]
    from scipy import ndimage
    inside_fan = ndimage.binary_erosion(voxels[0] > 20, iterations=8)
    for k in range(2):
        out = nodes.volume_to_array(result.sequence_node.GetNthDataNode(k))[0]
        assert out.shape == voxels[k].shape and out.dtype == np.uint8
        before, after = tile_speckle_contrast(voxels[k], inside_fan), tile_speckle_contrast(out, inside_fan)
        print(f"real frame {k}: median tile speckle contrast {before:.3f} -> {after:.3f}")
        assert after < 0.8 * before


def test_real_rgb_doppler_dicom_keeps_its_colour_overlay(scene, fast):
    path = SHARED / "dicom" / "US1_UNCR.dcm"
    if not path.is_file():
        pytest.skip(f"real DICOM not available ({path} is absent; ../shared ships beside the checkout)")
    import pydicom

    dataset = pydicom.dcmread(str(path))
    assert dataset.PhotometricInterpretation == "RGB"
    rgb = dataset.pixel_array[None]                       # (1, rows, cols, 3): DICOM rows are J
    volume = make_volume(scene, rgb, "US1", "vtkMRMLVectorVolumeNode")
    out = Speckle2SelfLogic(fast).despeckle_volume(volume, keep_colour=True)
    result = nodes.volume_to_array(out)
    spread = rgb.max(-1).astype(int) - rgb.min(-1)
    coloured = spread > nodes.COLOUR_THRESHOLD * 255
    assert 0.01 < coloured.mean() < 0.2, "the image has a colour Doppler overlay"
    np.testing.assert_array_equal(result[coloured], rgb[coloured])
    grey = result[~coloured]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()
    assert not np.array_equal(grey, rgb[~coloured])


# ----------------------------------------------------------------------------- tracked sequences (issue #11)

def test_sequence_output_proxy_is_under_the_input_proxys_transform(scene, fast, phantoms):
    """Sequence items carry no parent transform (they are copies): the output proxy takes the
    input proxy's (ImageToReference of tracked ultrasound), also after browsing."""
    frames, _ = phantoms
    sequence, browser, proxy = make_sequence(scene, frames[:3])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToReference")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(1, 3, -40.0)
    transform.SetMatrixTransformToParent(shift)
    proxy.SetAndObserveTransformNodeID(transform.GetID())
    browser.SetSelectedItemNumber(1)

    result = Speckle2SelfLogic(fast, sequences_logic=scene.sequences_logic).despeckle_sequence(proxy)

    assert result.proxy_node.GetParentTransformNode() is transform
    np.testing.assert_array_equal(nodes.volume_to_array(result.proxy_node),
                                  nodes.volume_to_array(result.sequence_node.GetNthDataNode(1)))
    browser.SetSelectedItemNumber(2)
    assert result.proxy_node.GetParentTransformNode() is transform
    np.testing.assert_array_equal(nodes.volume_to_array(result.proxy_node),
                                  nodes.volume_to_array(result.sequence_node.GetNthDataNode(2)))


def test_browser_item_number_matches_by_index_value_not_item_number(scene, phantoms):
    frames, _ = phantoms
    clock, browser, _ = make_sequence(scene, frames[:1].repeat(5, axis=0), name="Clock",
                                      values=[f"{0.025 * k:.3f}" for k in range(5)])
    image, _, _ = make_sequence(scene, frames[:3], name="Image", values=[f"{0.05 * k:.3f}" for k in range(3)],
                                browser=False)
    text, _, _ = make_sequence(scene, frames[:2], name="Text", values=["a", "b"], browser=False,
                               index_type="TextIndex")
    browser.AddSynchronizedSequenceNode(image)
    browser.SetSelectedItemNumber(2)                       # 0.050 s
    assert nodes.browser_item_number(browser, clock) == 2
    assert nodes.browser_item_number(browser, image) == 1
    browser.SetSelectedItemNumber(3)                       # 0.075 s: the image item shown is the one before
    assert nodes.browser_item_number(browser, image) == 1
    browser.SetSelectedItemNumber(4)
    assert nodes.browser_item_number(browser, image) == 2
    assert nodes.browser_item_number(browser, text) is None  # no item at that index value
    assert nodes.browser_item_number(None, image) is None


# ----------------------------------------------------------------------------- background job (issue #11)

def run_job(job, timeout=60.0, start=True):
    """Poll as the GUI's QTimer does, until the job has ended; returns the states seen."""
    import time

    states, deadline = [], time.monotonic() + timeout
    if start:
        job.start()
    while time.monotonic() < deadline:
        states.append(job.poll())
        if not states[-1].running:
            return states
        time.sleep(0.01)
    raise AssertionError("the job did not end")


def slowed(despeckler, seconds_per_frame):
    """The same model, taking ``seconds_per_frame`` longer per frame (a big model on a slow device)."""
    import copy
    import time

    slow = copy.copy(despeckler)

    def denoise(frames, *args, **kwargs):
        time.sleep(seconds_per_frame * len(frames))
        return Despeckler.denoise(slow, frames, *args, **kwargs)

    slow.denoise = denoise
    return slow


def test_job_despeckles_in_a_thread_and_writes_only_when_polled(scene, fast, phantoms):
    frames, _ = phantoms
    volume = make_volume(scene, frames[:3])
    logic = Speckle2SelfLogic(fast)
    expected = nodes.volume_to_array(logic.despeckle_volume(volume, batch_size=1))
    ids = node_ids(scene)

    job = logic.prepare_job(volume)
    job.start()
    assert job.wait(30) and node_ids(scene) == ids, "the worker thread added nothing to the scene"
    state = job.poll()
    assert state.finished and not state.running and state.error is None and (state.done, state.total) == (3, 3)
    out = state.result
    assert out.GetName() == "US despeckled_1" and len(node_ids(scene)) == len(ids) + 2   # volume + display
    # batches of other sizes than the reference run: float rounding may move a voxel by one grey level
    np.testing.assert_allclose(nodes.volume_to_array(out).astype(int), expected.astype(int), atol=1)
    assert np.mean(nodes.volume_to_array(out) == expected) > 0.99
    np.testing.assert_allclose(matrix_of(out), matrix_of(volume))
    assert job.poll() is state and len(node_ids(scene)) == len(ids) + 2     # stored once


def test_job_on_a_tracked_sequence_proxy_gives_a_browsed_sequence(scene, fast, phantoms):
    frames, _ = phantoms
    sequence, browser, proxy = make_sequence(scene, frames[:3])
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToReference")
    proxy.SetAndObserveTransformNodeID(transform.GetID())
    states = run_job(Speckle2SelfLogic(fast, sequences_logic=scene.sequences_logic).prepare_job(proxy))
    done = [s.done for s in states]
    assert done == sorted(done) and states[-1].finished, "progress only grows"
    result = states[-1].result
    assert result.frames == 3 and browser.GetProxyNode(result.sequence_node) is result.proxy_node
    assert result.proxy_node.GetParentTransformNode() is transform
    np.testing.assert_allclose(nodes.volume_to_array(result.sequence_node.GetNthDataNode(2))[0].astype(int),
                               fast.denoise(frames[:3])[2].astype(int), atol=1)


def test_job_batches_are_about_half_a_second_and_cancel_takes_effect_within_a_second(scene, fast, phantoms):
    import time

    frames, _ = phantoms
    volume = make_volume(scene, np.concatenate([frames] * 10))          # 40 frames, 50 ms each: 2 s of work
    ids = node_ids(scene)
    job = Speckle2SelfLogic(slowed(fast, 0.05)).prepare_job(volume)
    job.start()
    while job.poll().done < 12:            # past the timing frame and a first full-size batch
        time.sleep(0.01)
    assert job.batches[0] == 1 and all(b * 0.05 <= 0.75 for b in job.batches), job.batches
    asked = time.monotonic()
    job.cancel()
    assert job.wait(5)
    assert time.monotonic() - asked < 1.0, "cancel took effect after the current batch"
    state = job.poll()
    assert state.cancelled and not state.finished and state.error is None and state.done < 40
    assert node_ids(scene) == ids


def test_cancel_during_a_slow_model_load_ends_the_job_at_once_and_the_next_job_runs(
        scene, untrained_model, phantoms, monkeypatch):
    """Loading a model cannot be interrupted; Cancel still frees the GUI at once, the load's
    result is never stored, and the next job (same logic) waits for that load and reuses it."""
    import threading
    import time

    frames, _ = phantoms
    volume = make_volume(scene, frames[:2])
    loads, release = [], threading.Event()
    real_load = Despeckler.from_file

    def slow_load(*args, **kwargs):
        loads.append(args[0])
        release.wait(10)                     # a model that takes long to load (big file, slow disk)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Despeckler, "from_file", staticmethod(slow_load))
    logic = Speckle2SelfLogic(untrained_model)
    ids = node_ids(scene)
    job = logic.prepare_job(volume)
    job.start()
    while not loads:
        time.sleep(0.01)
    asked = time.monotonic()
    job.cancel()
    state = job.poll()
    assert time.monotonic() - asked < 0.5 and state.cancelled and not state.running and not state.finished
    second = logic.prepare_job(volume)
    second.start()
    release.set()                            # the first load ends; its job stops without storing
    states = run_job(second, start=False)
    assert job.wait(30) and job.poll() is state, "the cancelled job stays cancelled"
    assert states[-1].finished and len(loads) == 1, "the second job reused the model the first one loaded"
    assert len(node_ids(scene)) == len(ids) + 2, "only the second job's output (volume + display)"


def test_job_whose_input_left_the_scene_reports_an_error_and_adds_nothing(scene, fast, phantoms):
    frames, _ = phantoms
    volume = make_volume(scene, frames[:2])
    job = Speckle2SelfLogic(fast).prepare_job(volume)
    job.start()
    assert job.wait(30)
    scene.RemoveNode(volume)
    ids = node_ids(scene)
    state = job.poll()
    assert isinstance(state.error, ValueError) and "removed from the scene" in str(state.error)
    assert node_ids(scene) == ids


# ----------------------------------------------------------------------------- the module's logic (issue #11)

def test_logic_process_and_start_process_as_the_module_calls_them(scene, fast, phantoms):
    from Speckle2SelfLib.scene.logic import DespeckleRun

    frames, _ = phantoms
    volume = make_volume(scene, frames[:2])
    logic = Speckle2SelfLogic(fast, sequences_logic=scene.sequences_logic)
    run = logic.process(volume, gamma=1.0)                # gamma 1: none
    assert run.frames == 2 and run.output_node.GetName() == "US despeckled" and run.sequence_node is None
    np.testing.assert_array_equal(nodes.volume_to_array(run.output_node),
                                  nodes.volume_to_array(logic.despeckle_volume(volume)))
    rgb = make_volume(scene, np.zeros((1, 8, 8, 3), np.uint8), "RGB", "vtkMRMLVectorVolumeNode")
    job = logic.start_process(volume, rgb)                # a grey result never goes into an RGB output
    assert job.wait(30)
    state = job.poll()
    run = DespeckleRun.from_result(state.result, logic.last_seconds)
    assert state.finished and run.output_node is not rgb and run.frames == 2 and run.seconds > 0
    _sequence, _browser, proxy = make_sequence(scene, frames[:3])
    run = logic.process(proxy)                            # all frames of the proxy's sequence
    assert run.frames == 3 and run.sequence_node.GetNumberOfDataNodes() == 3
    assert logic.process(proxy, all_frames=False).frames == 1
    with pytest.raises(ValueError, match="Select an input volume"):
        logic.start_process(None)


def test_logic_reads_model_metadata_without_loading_the_model(untrained_model):
    logic = Speckle2SelfLogic()
    assert logic.model_metadata(str(untrained_model))["name"] == "untrained-test"
    if logic.has_bundled_model():
        default = next(e for e in logic.bundled_models() if e.get("default"))
        assert logic.model_metadata(None)["name"] == logic.model_metadata(default["name"])["name"]
    assert "width 4" in describe_model(logic.model_metadata(str(untrained_model)))


def test_logic_output_keeps_the_input_grey_levels_unless_the_network_levels_are_asked_for(scene, phantoms):
    from Speckle2SelfLib.scene.logic import DespeckleRun

    frames, _ = phantoms
    volume = make_volume(scene, frames[:2])
    logic = Speckle2SelfLogic(Despeckler.from_file("speckle2self-carotid-w16-d2-v2", device="cpu", backend="fp32"),
                              sequences_logic=scene.sequences_logic)
    fitted = nodes.volume_to_array(logic.process(volume).output_node).astype(np.float64)
    own = nodes.volume_to_array(logic.process(volume, grey_levels="network").output_node).astype(np.float64)
    original = frames[:2].astype(np.float64)
    # The bundled model's head stretches contrast; by default the output has the input's brightness.
    assert abs(fitted.mean() - original.mean()) < 2.0 < abs(own.mean() - original.mean())
    job = logic.start_process(volume, grey_levels="network")
    assert job.wait(60)
    run = DespeckleRun.from_result(job.poll().result, logic.last_seconds)
    np.testing.assert_array_equal(nodes.volume_to_array(run.output_node), own)
    _assert_refused_adding_no_node(scene, logic, volume, "grey_levels must be one of auto, input, network",
                                   grey_levels="stretched")


def _assert_refused_adding_no_node(scene, logic, volume, message, **bad_option):
    ids = node_ids(scene)
    for call in (logic.process, logic.start_process):
        with pytest.raises(ValueError, match=message):
            call(volume, **bad_option)
    assert node_ids(scene) == ids, "a refused option adds no node"


def test_logic_guided_refinement_reaches_the_output_in_both_runs_and_bad_values_add_no_node(scene, phantoms):
    from Speckle2SelfLib.scene.logic import DespeckleRun

    frames, _ = phantoms
    volume = make_volume(scene, frames[:2])
    logic = Speckle2SelfLogic(Despeckler.from_file(None, device="cpu", backend="fp32"),
                              sequences_logic=scene.sequences_logic)
    plain = nodes.volume_to_array(logic.process(volume, refine="none").output_node)
    guided = nodes.volume_to_array(logic.process(volume, refine="guided").output_node)
    assert not np.array_equal(plain, guided)
    # the bundled default model recommends the guided refinement: "auto" (the default) applies it
    np.testing.assert_array_equal(nodes.volume_to_array(logic.process(volume).output_node), guided)
    job = logic.start_process(volume, refine="guided")
    assert job.wait(60)
    run = DespeckleRun.from_result(job.poll().result, logic.last_seconds)
    np.testing.assert_array_equal(nodes.volume_to_array(run.output_node), guided)
    _assert_refused_adding_no_node(scene, logic, volume, "refine must be one of auto, guided, none", refine="sharp")
