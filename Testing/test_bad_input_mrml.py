"""Bad nodes on the Slicer side (real slicer-core MRML scene): every case raises one clear
ValueError naming the node, and the scene keeps exactly the nodes it had (minus a node the
user deleted during the run). Issue #16."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
vtk = pytest.importorskip("vtk")

from Speckle2SelfLib.scene import nodes  # noqa: E402
from Speckle2SelfLib.scene.logic import Speckle2SelfLogic  # noqa: E402
from Speckle2SelfLib.engine.inference import Despeckler  # noqa: E402
from test_bad_input_helpers import speckle  # noqa: E402
from test_mrml_despeckle import make_image, make_sequence, make_volume, node_ids  # noqa: E402


@pytest.fixture(scope="module")
def logic(untrained_model):
    return Speckle2SelfLogic(Despeckler.from_file(untrained_model, device="cpu"))


def _frames(n=3, shape=(40, 48)):
    return np.stack([speckle(shape, seed=k) for k in range(n)])


def _delete_during_run(scene, node):
    def progress(_done, _total):
        if scene.IsNodePresent(node):
            scene.RemoveNode(node)
    return progress


def case_empty_volume(scene, logic):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Empty")
    node.SetAndObserveImageData(vtk.vtkImageData())
    return lambda: logic.despeckle_volume(node), "'Empty' is an empty image"


def case_no_image_data(scene, logic):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Blank")
    return lambda: logic.despeckle_volume(node), "'Blank' has no image data"


def case_rgba_vector_volume(scene, logic):
    node = make_volume(scene, np.zeros((1, 40, 48, 4), np.uint8), "RGBA", "vtkMRMLVectorVolumeNode")
    return lambda: logic.despeckle_volume(node), "'RGBA' has 4-component voxels"


def case_two_component_volume(scene, logic):
    node = make_volume(scene, np.zeros((1, 40, 48, 2), np.uint8), "Dual", "vtkMRMLVectorVolumeNode")
    return lambda: logic.despeckle_volume(node), "'Dual' has 2-component voxels"


def case_label_map(scene, logic):
    node = make_volume(scene, (_frames(1) > 100).astype(np.uint8), "Mask", "vtkMRMLLabelMapVolumeNode",
                       window_level=None)
    return lambda: logic.despeckle_volume(node), "'Mask' is a label map"


def case_not_a_volume(scene, logic):
    node = scene.AddNewNodeByClass("vtkMRMLModelNode", "Surface")
    return lambda: logic.despeckle_volume(node), "'Surface' is a vtkMRMLModelNode, not a volume"


def case_nan_voxels(scene, logic):
    voxels = _frames(1).astype(np.float32)
    voxels[0, 3, 4] = np.nan
    node = make_volume(scene, voxels, "Float", window_level=None)
    return lambda: logic.despeckle_volume(node), "'Float' has NaN or infinite voxel values"


def case_tiny_volume(scene, logic):
    node = make_volume(scene, _frames(1)[:, :3, :3], "Dot")
    return lambda: logic.despeckle_volume(node), "too small"


def case_output_is_input(scene, logic):
    node = make_volume(scene, _frames(1), "Same")
    return lambda: logic.despeckle_volume(node, node), "is the input"


def case_mixed_size_sequence(scene, logic):
    frames = _frames(2)
    _seq, browser, _proxy = make_sequence(scene, [frames[0], frames[1][:30, :36]], name="Mixed")
    return lambda: logic.despeckle_sequence(browser), "mixes frame sizes"


def case_empty_sequence(scene, logic):
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "Nothing")
    return lambda: logic.despeckle_sequence(sequence), "'Nothing' has no frames"


def case_input_deleted_while_running(scene, logic):
    node = make_volume(scene, _frames(3), "Gone")
    return (lambda: logic.despeckle_volume(node, batch_size=1, progress=_delete_during_run(scene, node)),
            "'Gone' was removed from the scene")


def case_output_deleted_while_running(scene, logic):
    node = make_volume(scene, _frames(3), "Kept")
    target = make_volume(scene, _frames(1), "Target")
    return (lambda: logic.despeckle_volume(node, target, batch_size=1, progress=_delete_during_run(scene, target)),
            "'Target' was removed from the scene")


def case_sequence_deleted_while_running(scene, logic):
    sequence, browser, _proxy = make_sequence(scene, list(_frames(3)), name="Loop")
    return (lambda: logic.despeckle_sequence(browser, batch_size=1, progress=_delete_during_run(scene, sequence)),
            "'Loop' was removed from the scene")


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_node_gets_a_clear_error_and_the_scene_is_unchanged(case, scene, logic):
    call, message = CASES[case](scene, logic)
    before = node_ids(scene)
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value), str(info.value)
    after = node_ids(scene)
    assert set(after) <= set(before), f"nodes added: {set(after) - set(before)}"
    if "deleted" not in case:
        assert after == before
    else:
        assert len(before) - len(after) <= 3, "only the deleted node (and its display/storage nodes) went"


def test_flat_volume_is_returned_unchanged_with_a_warning(scene, logic):
    node = make_volume(scene, np.full((2, 40, 48), 90, np.uint8), "Flat")
    with pytest.warns(UserWarning, match="flat"):
        out = logic.despeckle_volume(node)
    np.testing.assert_array_equal(nodes.volume_to_array(out), np.full((2, 40, 48), 90, np.uint8))
    assert nodes.volume_to_array(node).max() == 90, "input untouched"


def test_inconsistent_image_data_is_refused(scene, logic):
    node = make_volume(scene, _frames(1), "Broken")
    image = make_image(_frames(1))
    image.SetDimensions(48, 40, 5)          # claims 5 slices, holds 1
    node.SetAndObserveImageData(image)
    before = node_ids(scene)
    with pytest.raises(ValueError, match="'Broken'"):
        logic.despeckle_volume(node)
    assert node_ids(scene) == before
