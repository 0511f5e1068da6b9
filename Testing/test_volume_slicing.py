"""3D volumes despeckled in their acquisition plane (issue #37): Speckle2SelfLib.engine.volume_axes,
the CLI's --slice-axis and the Slicer logic's slice_axis, on simulated volumes (core) and on the
real PLUS frames and reconstructed volume of ../shared (skipped where it is absent)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import SHARED, requires_shared
from benchlib.volume_phantom import simulate_volume, to_uint8
from Speckle2SelfLib.engine import volume_axes as va
from Speckle2SelfLib.engine.inference import Despeckler

SEQUENCES = SHARED / "sequences"


@pytest.fixture(scope="module")
def fast(untrained_model):
    return Despeckler.from_file(untrained_model, device="cpu")


@pytest.fixture(scope="module")
def stack():
    """Simulated B-mode frames through a 3D phantom (frames, depth, lateral), uint8, and the truth."""
    noisy, truth = simulate_volume(24, 96, 96, seed=3)
    return to_uint8(noisy), truth


# ----------------------------------------------------------------------------- detection

@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_auto_finds_the_frame_axis_and_depth_of_a_simulated_stack_in_any_axis_order(stack, perm):
    volume = np.transpose(stack[0], perm)
    choice = va.detect_slice_axis(volume)
    assert choice.axis == "kji"[perm.index(0)]         # where the frames went
    assert choice.rows == "kji"[perm.index(1)]         # where depth went
    assert choice.source == "data" and "depth along" in choice.reason


def test_auto_gives_the_same_voxels_whatever_the_axis_order(fast, stack):
    volume = stack[0]
    reference, choice = va.despeckle_volume(fast, volume, "auto")
    assert choice.axis == "k" and reference.shape == volume.shape and reference.dtype == np.uint8
    for perm in ((1, 0, 2), (1, 2, 0), (2, 0, 1)):
        out, other = va.despeckle_volume(fast, np.ascontiguousarray(np.transpose(volume, perm)), "auto")
        back = np.transpose(out, np.argsort(perm))
        assert np.abs(back.astype(int) - reference.astype(int)).max() <= 1, perm


def test_explicit_axes_slice_in_the_arrays_own_order(fast, stack):
    volume = stack[0]
    for axis, frames in (("k", volume), ("j", volume.transpose(1, 0, 2)), ("i", volume.transpose(2, 0, 1))):
        out, choice = va.despeckle_volume(fast, volume, axis)
        assert choice.axis == axis and choice.record() == f"{axis}; requested"
        expected = fast.denoise(np.ascontiguousarray(frames))
        np.testing.assert_array_equal(choice.to_frames(out), expected)


def test_three_plane_mode_is_the_mean_of_three_passes_with_depth_along_the_rows(fast, stack):
    volume = stack[0][:, :40, :48]
    out, choice = va.despeckle_volume(fast, volume, "three")
    # depth is J here: the K pass is rows J (as k), the I pass rows J, columns K (i would be rows K)
    passes = [va.despeckle_volume(fast, volume, "k")[0].astype(float),
              va.despeckle_volume(fast, volume, "j")[0].astype(float),
              np.transpose(fast.denoise(np.ascontiguousarray(volume.transpose(2, 1, 0))), (2, 1, 0)).astype(float)]
    assert choice.axis == "three" and out.dtype == volume.dtype
    np.testing.assert_array_equal(out, np.rint(np.mean(passes, axis=0)).astype(np.uint8))
    median, _ = va.despeckle_volume(fast, volume, "three", combine="median")
    np.testing.assert_array_equal(median, np.rint(np.median(passes, axis=0)).astype(np.uint8))


def test_progress_counts_every_pass_and_cancel_stops(fast, stack):
    from Speckle2SelfLib.engine.inference import Cancelled

    volume = stack[0][:, :40, :48]
    seen = []
    va.despeckle_volume(fast, volume, "three", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (sum(volume.shape), sum(volume.shape))
    with pytest.raises(Cancelled):
        va.despeckle_volume(fast, volume, "j", cancel=lambda: True)


def test_no_clear_plane_keeps_k_and_says_so():
    noise = np.random.default_rng(0).integers(0, 255, (20, 40, 50)).astype(np.uint8)
    choice = va.detect_slice_axis(noise)
    assert choice.axis == "k" and choice.source == "fallback" and "kept K" in choice.reason
    flat = va.detect_slice_axis(np.zeros((1, 30, 40), np.uint8))
    assert flat.axis == "k" and "single 2D image" in flat.reason


def test_axes_too_short_for_a_frame_are_never_sliced(stack):
    thin = stack[0][:, :, :5]                         # 5 voxels along I: only J-K planes are frames
    choice = va.detect_slice_axis(thin)
    assert choice.axis == "i" and "8+ voxels" in choice.reason


@pytest.mark.parametrize("value, message", [("x", "slice axis must be one of auto, i, j, k, three"),
                                            (3, "slice axis must be one of")])
def test_bad_slice_axis_is_one_line_naming_the_choices(value, message):
    with pytest.raises(ValueError, match=message) as err:
        va.check_slice_axis(value)
    assert "\n" not in str(err.value)


def test_explicit_axis_with_frames_too_small_is_refused_before_computing(stack):
    with pytest.raises(ValueError, match="choose another slice axis or auto"):
        va.choose_slice_axis(stack[0][:4], "j")      # J slices would be 4 x 96
    with pytest.raises(ValueError, match="three-plane mode needs 8"):
        va.choose_slice_axis(stack[0][:4], "three")


def test_oblique_acquisition_is_reported():
    from scipy import ndimage as ndi

    noisy, _ = simulate_volume(32, 96, 96, seed=5)
    turned = ndi.rotate(noisy, 40, axes=(0, 2), reshape=False, order=1, mode="constant")
    assert va.obliqueness_deg(to_uint8(noisy)) < va.OBLIQUE_DEG
    choice = va.detect_slice_axis(to_uint8(turned))
    assert choice.oblique_deg > va.OBLIQUE_DEG and "oblique" in choice.reason and "nearest axis" in choice.reason


# ----------------------------------------------------------------------------- command line

def _write(path, voxels, **meta):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(voxels)
    image.SetSpacing((0.2, 0.3, 0.5))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    for key, value in meta.items():
        image.SetMetaData(key, value)
    sitk.WriteImage(image, str(path))
    return image


def test_cli_despeckles_a_volume_in_its_acquisition_plane_and_records_it(tmp_path, untrained_model, stack, capsys):
    import SimpleITK as sitk
    from Speckle2SelfLib.cli import main

    volume = np.ascontiguousarray(stack[0].transpose(1, 0, 2))      # frames along J
    image = _write(tmp_path / "vol.mha", volume)
    assert main(["denoise", str(tmp_path / "vol.mha"), str(tmp_path / "out.mha"), "--model", str(untrained_model),
                 "--device", "cpu"]) == 0
    assert "slice axis J slices" in capsys.readouterr().out
    out = sitk.ReadImage(str(tmp_path / "out.mha"))
    assert out.GetMetaData(va.HEADER_FIELD).startswith("j; depth along K")
    assert out.GetDirection() == image.GetDirection() and out.GetSpacing() == image.GetSpacing()
    fast = Despeckler.from_file(untrained_model, device="cpu")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), va.despeckle_volume(fast, volume, "auto")[0])
    assert main(["denoise", str(tmp_path / "vol.mha"), str(tmp_path / "k.nrrd"), "--model", str(untrained_model),
                 "--device", "cpu", "--slice-axis", "k"]) == 0
    assert sitk.ReadImage(str(tmp_path / "k.nrrd")).GetMetaData(va.HEADER_FIELD) == "k; requested"


def test_cli_plus_sequence_is_sliced_along_its_frames(tmp_path, untrained_model, stack):
    import SimpleITK as sitk
    from Speckle2SelfLib.cli import main

    volume = np.ascontiguousarray(stack[0].transpose(1, 0, 2))      # the data alone would say J
    _write(tmp_path / "cine.igs.mha", volume, Seq_Frame0000_Timestamp="1.0", UltrasoundImageOrientation="MF")
    assert main(["denoise", str(tmp_path / "cine.igs.mha"), str(tmp_path / "out.igs.mha"), "--model",
                 str(untrained_model), "--device", "cpu"]) == 0
    out = sitk.ReadImage(str(tmp_path / "out.igs.mha"))
    assert out.GetMetaData(va.HEADER_FIELD).startswith("k; PLUS sequence")
    assert out.GetMetaData("Seq_Frame0000_Timestamp") == "1.0"


def test_cli_bad_slice_axis_is_exit_2(tmp_path, stack, capsys):
    from Speckle2SelfLib.cli import main

    _write(tmp_path / "vol.mha", stack[0])
    assert main(["denoise", str(tmp_path / "vol.mha"), str(tmp_path / "o.mha"), "--slice-axis", "z"]) == 2
    assert "--slice-axis" in capsys.readouterr().err


def test_cli_explicit_axis_too_small_is_exit_2_before_computing(tmp_path, untrained_model, stack, capsys):
    from Speckle2SelfLib.cli import main

    _write(tmp_path / "thin.mha", np.ascontiguousarray(stack[0][:4]))
    assert main(["denoise", str(tmp_path / "thin.mha"), str(tmp_path / "o.mha"), "--model", str(untrained_model),
                 "--slice-axis", "j"]) == 2
    err = capsys.readouterr().err
    assert "choose another slice axis or auto" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.mha").exists()


def test_logic_refuses_a_bad_slice_axis_before_reading(scene, fast, stack):
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    volume = _volume_node(scene, stack[0])
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="slice axis must be one of auto, i, j, k, three"):
        Speckle2SelfLogic(fast).despeckle_volume(volume, slice_axis="x")
    with pytest.raises(ValueError, match="slice axis must be one of"):
        Speckle2SelfLogic(fast).start_process(volume, slice_axis="diagonal")
    assert scene.GetNumberOfNodes() == before


# ----------------------------------------------------------------------------- Slicer logic (real MRML nodes)

DIRECTIONS = ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0))   # columns: i -> -A, j -> +R, k -> -S


def _volume_node(scene, voxels, name="US3D"):
    from vtk.util import numpy_support
    import vtk

    voxels = np.ascontiguousarray(voxels)
    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.reshape(-1, 1), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.3, 0.2, 0.5)
    node.SetOrigin(12.0, -30.0, 7.0)
    node.SetIJKToRASDirections(*[DIRECTIONS[col][row] for row in range(3) for col in range(3)])
    node.CreateDefaultDisplayNodes()
    return node


def _matrix(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_logic_despeckles_a_rotated_volume_in_its_acquisition_plane(scene, fast, stack):
    from Speckle2SelfLib.scene import nodes
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    voxels = np.ascontiguousarray(stack[0].transpose(1, 2, 0))      # (depth, lateral, frames): frames along I
    volume = _volume_node(scene, voxels)
    out = Speckle2SelfLogic(fast).despeckle_volume(volume)
    assert out.GetAttribute(va.ATTRIBUTE).startswith("i; depth along K")
    np.testing.assert_allclose(_matrix(out), _matrix(volume))
    expected = va.despeckle_volume(fast, voxels, "auto")[0]
    np.testing.assert_array_equal(nodes.volume_to_array(out), expected)
    k_out = Speckle2SelfLogic(fast).despeckle_volume(volume, slice_axis="k")
    assert k_out.GetAttribute(va.ATTRIBUTE) == "k; requested"
    assert not np.array_equal(nodes.volume_to_array(k_out), expected)


def test_background_job_despeckles_in_the_chosen_plane(scene, fast, stack):
    import time

    from Speckle2SelfLib.scene import nodes
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    voxels = np.ascontiguousarray(stack[0][:, :48, :40].transpose(1, 0, 2))   # frames along J
    volume = _volume_node(scene, voxels)
    job = Speckle2SelfLogic(fast).start_process(volume, slice_axis="three")
    deadline = time.monotonic() + 120
    state = job.poll()
    while not state.finished and time.monotonic() < deadline:
        time.sleep(0.05)
        state = job.poll()
    assert state.finished and state.error is None, state.error
    out = state.result
    assert out.GetAttribute(va.ATTRIBUTE).startswith("three;")
    np.testing.assert_array_equal(nodes.volume_to_array(out), va.despeckle_volume(fast, voxels, "three")[0])
    np.testing.assert_allclose(_matrix(out), _matrix(volume))


def test_slice_axis_parameter_is_saved_with_the_scene(scene, tmp_path):
    import slicer
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    node = Speckle2SelfLogic.parameter_node(scene)
    assert va.read_parameter(node) == "auto"           # unset: the default
    va.write_parameter(node, "three")
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    assert va.read_parameter(Speckle2SelfLogic.parameter_node(loaded)) == "three"
    with pytest.raises(ValueError, match="slice axis must be one of"):
        va.write_parameter(node, "diagonal")
    node.SetParameter(va.SLICE_AXIS_PARAMETER, "diagonal")
    with pytest.raises(ValueError, match="parameter sliceAxis"):
        va.read_parameter(node)


# ----------------------------------------------------------------------------- real data (../shared)

@requires_shared
@pytest.mark.parametrize("name", ["SpinePhantomFreehand.igs.mha", "BoneUltrasound_L14.igs.mha"])
def test_real_plus_frames_auto_finds_the_frame_axis_in_any_axis_order(name):
    import SimpleITK as sitk

    path = SEQUENCES / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    frames = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    for perm in itertools.permutations(range(3)):
        choice = va.detect_slice_axis(np.transpose(frames, perm))
        assert (choice.axis, choice.rows) == ("kji"[perm.index(0)], "kji"[perm.index(1)]), (perm, choice.reason)


@requires_shared
def test_reconstructed_volume_is_despeckled_in_its_b_mode_planes():
    import SimpleITK as sitk

    path = SEQUENCES / "SpinePhantomFreehandReconstructed.mha"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))      # (K, J, I) = (104, 106, 147)
    choice = va.detect_slice_axis(volume)
    # depth runs along K (the K slices are constant-depth planes); the sweep along J
    assert choice.rows == "k" and choice.axis == "j", choice.reason
