"""The uncertainty map (engine.uncertainty, ``Despeckler.denoise(..., uncertainty=True)``, the CLI's
``--uncertainty``, the lumen's boundary uncertainty): the refinement's statistics against a direct
computation, the map's shapes, geometry and dtype for every input kind, nothing computed when not
asked, the same map for the same input, and a map that is high where the output errs."""

import numpy as np
import pytest
import torch

from Speckle2SelfLib import segmentation
from Speckle2SelfLib.cli.main import main
from Speckle2SelfLib.engine import uncertainty
from Speckle2SelfLib.engine.bilateral_grid import grid_filter
from Speckle2SelfLib.engine.inference import Despeckler
from Speckle2SelfLib.fileio.imageio import read_frames
from conftest import simulated_frames

SIZE = 64


@pytest.fixture(scope="module")
def default_engine():
    return Despeckler.from_file(None, "cpu")


def _frames(n=3, size=SIZE):
    noisy, _clean = simulated_frames(n=n, size=size, seed=3)
    return (np.asarray(noisy) * 255).round().astype(np.uint8)


def _direct_statistics(x, g, p, sigma, range_sigma):
    """Weighted mean, variance and effective count of x around pixel p, by the plain sums."""
    rows, cols = np.mgrid[:x.shape[0], :x.shape[1]]
    w = np.exp(-((rows - p[0]) ** 2 + (cols - p[1]) ** 2) / (2 * sigma ** 2)
               - (g - g[p]) ** 2 / (2 * range_sigma ** 2))
    mean = (w * x).sum() / w.sum()
    return mean, (w * x * x).sum() / w.sum() - mean ** 2, w.sum() ** 2 / (w * w).sum()


def test_refinement_statistics_match_the_direct_sums_and_the_product_filter():
    rng = np.random.default_rng(0)
    x = rng.random((1, 1, 96, 96)).astype(np.float32)
    guide = np.zeros((1, 1, 96, 96), np.float32)
    guide[..., 48:, :] = 0.5                       # two regions the range kernel keeps apart
    xt, gt = torch.from_numpy(x), torch.from_numpy(guide)
    sigma, range_sigma = 5.0, 0.05
    mean, variance, n_eff, wide = uncertainty.refinement_statistics(xt, gt, sigma, range_sigma, sigma / 1.25,
                                                                    range_sigma / 1.25)
    # the mean is the grid filter's output, to the bit: the map describes exactly what is returned
    assert torch.equal(mean, grid_filter(xt, gt, sigma, range_sigma, sigma / 1.25, range_sigma / 1.25))
    for p in [(20, 40), (47, 40), (48, 40), (70, 70)]:
        m, v, n = _direct_statistics(x[0, 0].astype(np.float64), guide[0, 0], p, sigma, range_sigma)
        assert abs(float(mean[0, 0][p]) - m) < 0.01
        assert abs(float(variance[0, 0][p]) - v) < 0.05 * v
        assert abs(float(n_eff[0, 0][p]) - n) < 0.06 * n
    # beside the region boundary the guide halves the window: about half the effective count
    assert float(n_eff[0, 0, 47, 40]) < 0.6 * float(n_eff[0, 0, 20, 40])
    assert float(n_eff[0, 0, 20, 40]) == pytest.approx(4 * np.pi * sigma ** 2, rel=0.05)
    assert wide.shape == mean.shape


def test_denoise_returns_the_same_output_and_a_float32_map_of_its_shape(default_engine):
    frames = _frames()
    plain = default_engine.denoise(frames)
    out, unc = default_engine.denoise(frames, uncertainty=True)
    assert np.array_equal(out, plain) and out.dtype == np.uint8
    assert unc.shape == frames.shape and unc.dtype == np.float32
    assert np.isfinite(unc).all() and unc.min() >= 0 and unc.max() > 0
    # 2D in, 2D out; each frame's map does not depend on its batch neighbours
    out2d, unc2d = default_engine.denoise(frames[1], uncertainty=True)
    assert out2d.shape == unc2d.shape == frames[1].shape
    np.testing.assert_allclose(unc2d, unc[1], rtol=1e-4, atol=1e-3)
    # an iterable of frames gives two lists
    outs, maps = default_engine.denoise(iter(list(frames)), uncertainty=True)
    assert len(outs) == len(maps) == len(frames) and all(m.shape == frames.shape[1:] for m in maps)


def test_the_map_is_deterministic_and_in_the_frames_grey_levels(default_engine):
    frames = _frames(n=2)
    _out, first = default_engine.denoise(frames, uncertainty=True)
    _out, second = default_engine.denoise(frames, uncertainty=True)
    assert np.array_equal(first, second)
    # the same image on a 257x wider grey scale (uint16): the map in its grey levels, 257x larger
    _out, wide = default_engine.denoise(frames.astype(np.uint16) * 257, uncertainty=True)
    np.testing.assert_allclose(wide, first * 257, rtol=1e-3, atol=0.05)


def test_a_flat_frame_has_a_zero_map(default_engine):
    frames = _frames(n=2)
    frames[1] = 7
    with pytest.warns(UserWarning, match="flat"):
        out, unc = default_engine.denoise(frames, uncertainty=True)
    assert (out[1] == 7).all() and (unc[1] == 0).all() and unc[0].max() > 0


def test_no_map_is_computed_unless_asked(default_engine, monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the uncertainty map was computed without being asked for")

    monkeypatch.setattr(uncertainty, "uncertainty_components", refuse)
    out = default_engine.denoise(_frames(n=2))
    assert isinstance(out, np.ndarray) and out.shape == (2, SIZE, SIZE)
    with pytest.raises(AssertionError, match="without being asked"):
        default_engine.denoise(_frames(n=1), uncertainty=True)


def test_bad_uncertainty_values_are_refused(default_engine):
    with pytest.raises(ValueError, match="uncertainty must be True or False"):
        default_engine.denoise(_frames(n=1), uncertainty="yes")


def test_models_without_the_refinement_get_a_map_too(untrained_model):
    engine = Despeckler.from_file(untrained_model, "cpu")
    assert engine.resolve_refine("auto") == "none"
    frames = _frames(n=2)
    out, unc = engine.denoise(frames, uncertainty=True)
    assert np.array_equal(out, engine.denoise(frames))
    assert unc.shape == frames.shape and unc.dtype == np.float32 and np.isfinite(unc).all() and unc.max() > 0


def test_the_map_is_high_where_the_output_errs(default_engine):
    """On a simulated image with a truth (a tuning seed, 512 px as in benchmarks/simulated.py): the
    pixels the map ranks least reliable (top 10%) err several times more than the others, and the
    map ranks the errors better than the output's gradient (benchmarks/uncertainty.py measures it
    in full, on the test seeds)."""
    from scipy import ndimage, stats

    from Speckle2SelfLib import metrics
    from Speckle2SelfLib.simulation import make_phantom, simulate_bmode

    phantom = make_phantom("carotid", size=(512, 512), seed=1000)
    sim = simulate_bmode(phantom.clean, fc=7.5e6, seed=1000)
    out, unc = default_engine.denoise(sim.bmode.astype(np.float32), uncertainty=True)
    error = np.abs(metrics.affine_fit(out, sim.reference) - sim.reference)
    top = unc >= np.percentile(unc, 90)
    assert error[top].mean() > 3 * error[~top].mean()
    gradient = ndimage.gaussian_gradient_magnitude(out.astype(np.float64), 1.0)
    rho = stats.spearmanr(unc.ravel(), error.ravel())[0]
    assert rho > stats.spearmanr(gradient.ravel(), error.ravel())[0] + 0.1
    # in grey levels of the output: the map's mean is the mean absolute error within a factor 2
    assert 0.5 < unc.mean() / error.mean() < 2.0


# ----------------------------------------------------------------------------- lumen


def test_boundary_uncertainty_is_the_maps_mean_along_the_contour():
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    unc = np.zeros((40, 40), np.float32)
    assert segmentation.boundary_uncertainty(mask, unc) == 0.0
    unc[9:31, 9:31] = 4.0            # the contour's band: the mask's edge and the pixel outside
    unc[12:28, 12:28] = 100.0        # well inside: not on the contour
    assert segmentation.boundary_uncertainty(mask, unc) == pytest.approx(4.0)
    assert np.isnan(segmentation.boundary_uncertainty(np.zeros((40, 40), bool), unc))
    with pytest.raises(ValueError, match="differs from the mask"):
        segmentation.boundary_uncertainty(mask, unc[:-1])


# ----------------------------------------------------------------------------- CLI


def _write(path, frames, spacing=(0.2, 0.3, 0.5)):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(frames)
    image.SetSpacing(spacing)
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


def test_cli_writes_the_map_with_the_outputs_geometry(tmp_path, capsys):
    import SimpleITK as sitk

    src = _write(tmp_path / "in.nrrd", _frames(n=3))
    out, unc = tmp_path / "out.nrrd", tmp_path / "unc.nrrd"
    assert main(["denoise", str(src), str(out), "--device", "cpu", "--slice-axis", "k",
                 "--uncertainty", str(unc)]) == 0
    a, b = sitk.ReadImage(str(out)), sitk.ReadImage(str(unc))
    assert b.GetSize() == a.GetSize() and b.GetSpacing() == a.GetSpacing() and b.GetOrigin() == a.GetOrigin()
    assert b.GetDirection() == a.GetDirection()
    assert sitk.GetArrayFromImage(b).dtype == np.float32 and sitk.GetArrayFromImage(b).max() > 0
    plain = tmp_path / "plain.nrrd"
    assert main(["denoise", str(src), str(plain), "--device", "cpu", "--slice-axis", "k"]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(plain))), sitk.GetArrayFromImage(a))


def test_cli_map_of_a_volume_sliced_along_another_axis_is_laid_out_like_the_output(tmp_path):
    import SimpleITK as sitk

    volume = np.transpose(_frames(n=40, size=48)[:, :, :40], (1, 0, 2)).copy()     # frames along J
    src = _write(tmp_path / "vol.nrrd", volume)
    out, unc = tmp_path / "out.nrrd", tmp_path / "unc.nrrd"
    assert main(["denoise", str(src), str(out), "--device", "cpu", "--slice-axis", "j",
                 "--uncertainty", str(unc)]) == 0
    maps = sitk.GetArrayFromImage(sitk.ReadImage(str(unc)))
    assert maps.shape == volume.shape
    engine = Despeckler.from_file(None, "cpu")
    _o, direct = engine.denoise(np.ascontiguousarray(np.transpose(volume, (1, 0, 2))), uncertainty=True)
    np.testing.assert_allclose(maps, np.transpose(direct, (1, 0, 2)), rtol=1e-4, atol=1e-3)


def test_cli_map_of_a_sequence_keeps_its_geometry_and_header(tmp_path):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(_frames(n=3, size=48))
    image.SetSpacing((0.2, 0.3, 1.5))
    image.SetOrigin((10.0, -5.0, 2.0))
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    image.SetMetaData("Seq_Frame0000_Timestamp", "12.5")
    sitk.WriteImage(image, str(tmp_path / "cine.mha"))
    assert read_frames(tmp_path / "cine.mha").kind == "sequence"
    unc = tmp_path / "unc.mha"
    assert main(["denoise", str(tmp_path / "cine.mha"), str(tmp_path / "out.mha"), "--device", "cpu",
                 "--uncertainty", str(unc)]) == 0
    back = sitk.ReadImage(str(unc))
    assert back.GetSize() == image.GetSize() and back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin() and back.GetDirection() == image.GetDirection()
    assert back.GetMetaData("Seq_Frame0000_Timestamp") == "12.5"
    assert sitk.GetArrayFromImage(back).dtype == np.float32


def test_cli_rgb_png_gets_a_grey_map(tmp_path):
    from PIL import Image

    grey = _frames(n=1, size=48)[0]
    Image.fromarray(np.stack([grey, grey, grey], axis=-1)).save(tmp_path / "in.png")
    unc = tmp_path / "unc.mha"
    assert main(["denoise", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--device", "cpu",
                 "--uncertainty", str(unc)]) == 0
    data = read_frames(unc)
    assert data.frames.shape == (1, 48, 48) and data.frames.dtype == np.float32


@pytest.mark.parametrize("extra, message", [
    (["--uncertainty", "{tmp}/unc.png"], "fractional grey levels"),
    (["--uncertainty", "{tmp}/out.mha"], "overwrite the output"),
    (["--uncertainty", "{tmp}/missing/unc.mha"], ""),
    (["--uncertainty", "{tmp}/unc.mha", "--slice-axis", "three"], "slice-axis auto"),
])
def test_cli_refuses_a_bad_map_path_before_any_work(tmp_path, capsys, extra, message):
    src = _write(tmp_path / "in.nrrd", _frames(n=2))
    out = tmp_path / "out.mha"
    args = ["denoise", str(src), str(out), "--device", "cpu"] + [a.format(tmp=tmp_path) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "unc.mha").exists()


def test_cli_refuses_a_map_for_a_folder_run(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "a.nrrd", _frames(n=1))
    assert main(["denoise", str(tmp_path / "in"), str(tmp_path / "out"), "--uncertainty",
                 str(tmp_path / "unc.mha")]) == 2
    assert "one input file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- MRML (slicer-core)


def _volume_node(scene, voxels):
    from Speckle2SelfLib.scene import nodes

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "us")
    nodes.write_voxels(node, voxels)
    node.SetSpacing(0.3, 0.2, 1.5)
    node.SetOrigin(12.0, -30.0, 7.0)
    node.SetIJKToRASDirections(0, -1, 0, 1, 0, 0, 0, 0, -1)
    return node


def test_logic_writes_the_map_into_its_own_volume_node_with_the_inputs_geometry(scene, default_engine):
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    import vtk

    from Speckle2SelfLib.scene import nodes
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    frames = _frames(n=2)
    volume = _volume_node(scene, frames)
    logic = Speckle2SelfLogic(default_engine)
    plain = nodes.volume_to_array(logic.despeckle_volume(volume))
    assert logic.last_uncertainty_node is None            # not asked: no map, no node
    before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    out = logic.despeckle_volume(volume, uncertainty=True)
    unc = logic.last_uncertainty_node
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == before + 2
    assert unc.GetName() == "us uncertainty" and unc.GetAttribute("Speckle2Self.UncertaintyOf") == out.GetID()
    maps = nodes.volume_to_array(unc)
    assert maps.shape == frames.shape and maps.dtype == np.float32 and maps.max() > 0
    assert np.array_equal(nodes.volume_to_array(out), plain)
    _o, direct = default_engine.denoise(frames, uncertainty=True)
    np.testing.assert_allclose(maps, direct, rtol=1e-5, atol=1e-4)
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(a)
    unc.GetIJKToRASMatrix(b)
    assert all(a.GetElement(r, c) == b.GetElement(r, c) for r in range(4) for c in range(4))
    # a given node is filled again; the input and the output are refused before any work
    again = logic.despeckle_volume(volume, out, uncertainty=True, uncertainty_node=unc)
    assert again is out and logic.last_uncertainty_node is unc
    with pytest.raises(ValueError, match="its own volume node"):
        logic.despeckle_volume(volume, uncertainty=True, uncertainty_node=volume)
    with pytest.raises(ValueError, match="slice axis auto"):
        logic.despeckle_volume(volume, uncertainty=True, slice_axis="three")


def test_lumen_table_gets_each_frames_boundary_uncertainty(scene, default_engine):
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.scene import lumen as scene_lumen
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic
    from Speckle2SelfLib.simulation import make_phantom, simulate_bmode

    phantom = make_phantom("carotid", size=(160, 160), seed=1002)
    frame = (simulate_bmode(phantom.clean, fc=7.5e6, seed=1002).bmode * 255).round().astype(np.uint8)
    volume = _volume_node(scene, np.stack([frame, frame]))
    logic = Speckle2SelfLogic(default_engine)
    out = logic.despeckle_volume(volume, uncertainty=True)
    row, col = segmentation.seed_from_mask(phantom.lumen_mask)
    result = scene_lumen.segment_lumen(out, seed_ijk=(col, row, 0), plot=False)
    shares = scene_lumen.add_boundary_uncertainty(result, logic.last_uncertainty_node, out)
    table = result.table_node.GetTable()
    column = table.GetColumnByName(scene_lumen.BOUNDARY_UNCERTAINTY_COLUMN)
    assert column is not None and column.GetNumberOfTuples() == len(result.frames) == 2
    maps = logic.last_uncertainty_node
    from Speckle2SelfLib.scene.nodes import volume_to_array
    expected = segmentation.uncertain_boundary_share(result.sequence.masks[0], volume_to_array(maps)[0],
                                                     volume_to_array(out)[0])
    assert 0.0 <= shares[0] <= 1.0 and column.GetValue(0) == pytest.approx(expected)
    again = scene_lumen.add_boundary_uncertainty(result, maps, out)      # a rerun replaces the column
    assert again == shares and table.GetNumberOfColumns() == len(scene_lumen.TABLE_COLUMNS) + 1
    with pytest.raises(ValueError, match="scalar volume node"):
        scene_lumen.add_boundary_uncertainty(result, None, out)


def test_background_job_writes_the_same_map(scene, default_engine):
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.scene import nodes
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    frames = _frames(n=3)
    volume = _volume_node(scene, frames)
    logic = Speckle2SelfLogic(default_engine)
    job = logic.start_process(volume, uncertainty=True)
    assert job.wait(120)
    state = job.poll()
    assert state.finished, state
    unc = logic.last_uncertainty_node
    _o, direct = default_engine.denoise(frames, uncertainty=True)
    np.testing.assert_allclose(nodes.volume_to_array(unc), direct, rtol=1e-5, atol=1e-4)
    assert unc.GetAttribute("Speckle2Self.UncertaintyOf") == state.result.GetID()
    plain = logic.start_process(volume)                   # not asked: no map
    assert plain.wait(120) and plain.poll().finished and logic.last_uncertainty_node is None
    assert plain.uncertainty_maps is None


# ----------------------------------------------------------------------------- MRML: whole sequences (#36)


def _sequence_nodes(scene, frames, name="cine"):
    """A sequence of 2D volumes (index "time" in s, geometry set per item), a browser and its proxy."""
    import slicer

    from Speckle2SelfLib.scene import nodes

    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    for k, frame in enumerate(frames):
        item = slicer.vtkMRMLScalarVolumeNode()
        nodes.write_voxels(item, frame[None])
        item.SetSpacing(0.3, 0.2, 1.5)
        item.SetOrigin(12.0 + k, -30.0, 7.0)         # a probe that moves: each item has its own geometry
        item.SetIJKToRASDirections(0, -1, 0, 1, 0, 0, 0, 0, -1)
        sequence.SetDataNodeAtValue(item, f"{1.5 + 0.04 * k:.2f}")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", name + " browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    scene.sequences_logic.UpdateProxyNodesFromSequences(browser)
    return sequence, browser, browser.GetProxyNode(sequence)


def _matrix(volume):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def _node_ids(scene):
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def _assert_map_sequence_of(result, sequence, browser, direct):
    """One map per input item at its index value, laid out like the output item, played by ``browser``."""
    from Speckle2SelfLib.scene import nodes

    maps, out = result.uncertainty_node, result.sequence_node
    assert maps.GetName() == "cine uncertainty" and maps.GetAttribute("Speckle2Self.UncertaintyOf") == out.GetID()
    assert maps.GetNumberOfDataNodes() == sequence.GetNumberOfDataNodes() == len(direct)
    assert (maps.GetIndexName(), maps.GetIndexUnit()) == ("time", "s")
    for k in range(len(direct)):
        assert maps.GetNthIndexValue(k) == sequence.GetNthIndexValue(k) == out.GetNthIndexValue(k)
        item, out_item = maps.GetNthDataNode(k), out.GetNthDataNode(k)
        values = nodes.volume_to_array(item)
        assert values.shape == nodes.volume_to_array(out_item).shape and values.dtype == np.float32
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() > 0
        assert _matrix(item) == _matrix(out_item) == _matrix(sequence.GetNthDataNode(k))
        np.testing.assert_allclose(values[0], direct[k], rtol=1e-5, atol=1e-4)
    proxy = result.uncertainty_proxy_node
    assert browser.IsSynchronizedSequenceNode(maps, False) and browser.GetProxyNode(maps) is proxy
    assert browser.GetSequenceNode(proxy) is maps and proxy.GetName() == maps.GetName()
    browser.SetSelectedItemNumber(2)                    # plays in step with the output
    np.testing.assert_allclose(nodes.volume_to_array(proxy)[0], direct[2], rtol=1e-5, atol=1e-4)
    assert _matrix(proxy) == _matrix(result.proxy_node)


def test_a_sequence_gets_a_map_sequence_played_with_its_output(scene, default_engine):
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    frames = _frames(n=3)
    sequence, browser, proxy = _sequence_nodes(scene, frames)
    logic = Speckle2SelfLogic(default_engine, sequences_logic=scene.sequences_logic)
    job = logic.start_process(proxy, uncertainty=True)            # what the module's Apply starts
    assert job.wait(120)
    state = job.poll()
    assert state.finished, state
    result = state.result
    assert logic.last_uncertainty_node is result.uncertainty_node
    _o, direct = default_engine.denoise(frames, uncertainty=True)
    _assert_map_sequence_of(result, sequence, browser, direct)
    # the module's rerun: the map's proxy (what it remembers) gets its sequence refilled, no node added
    count = scene.GetNumberOfNodes()
    again = logic.despeckle_sequence(proxy, result.proxy_node, uncertainty=True,
                                     uncertainty_node=result.uncertainty_proxy_node)
    assert again.uncertainty_node is result.uncertainty_node and again.uncertainty_proxy_node is \
        result.uncertainty_proxy_node and logic.last_uncertainty_node is again.uncertainty_node
    assert scene.GetNumberOfNodes() == count, "a rerun into the same output and map adds no node"
    assert browser.GetNumberOfSynchronizedSequenceNodes() == 2      # output and map (the input is primary)
    assert again.uncertainty_node.GetAttribute("Speckle2Self.UncertaintyOf") == again.sequence_node.GetID()
    plain = logic.despeckle_sequence(sequence)                     # not asked: no map
    assert plain.uncertainty_node is None and logic.last_uncertainty_node is None
    # Apply forgives a remembered map that cannot take a sequence's maps (a volume's): a new one
    job = logic.start_process(proxy, uncertainty=True, uncertainty_node=_volume_node(scene, frames[:1]))
    assert job.wait(120) and job.poll().finished
    made = logic.last_uncertainty_node
    assert made.IsA("vtkMRMLSequenceNode") and made is not result.uncertainty_node
    assert made.GetName().startswith("cine uncertainty_")


@pytest.mark.parametrize("bad, message", [
    ("input", "their own sequence"), ("input proxy", "their own sequence"), ("output", "their own sequence"),
    ("volume", "no browser shows"), ("table", "no browser shows"),
])
def test_a_bad_map_node_for_a_sequence_is_refused_before_any_work(scene, default_engine, bad, message):
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    sequence, browser, proxy = _sequence_nodes(scene, _frames(n=2))
    logic = Speckle2SelfLogic(default_engine, sequences_logic=scene.sequences_logic)
    output = logic.despeckle_sequence(proxy).proxy_node
    nodes_by_role = {"input": sequence, "input proxy": proxy, "output": output,
                     "volume": _volume_node(scene, _frames(n=1)),
                     "table": scene.AddNewNodeByClass("vtkMRMLTableNode", "t")}

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model ran before the map node was checked")

    logic.despeckler = no_model
    ids = _node_ids(scene)
    for call in (lambda **o: logic.despeckle_sequence(proxy, output, **o),
                 lambda **o: logic.prepare_job(proxy, output, **o)):
        with pytest.raises(ValueError, match=message) as err:
            call(uncertainty=True, uncertainty_node=nodes_by_role[bad])
        assert len(str(err.value).splitlines()) == 1 and "create a new one" in str(err.value)
    assert _node_ids(scene) == ids


def test_a_cancelled_or_failed_sequence_run_leaves_no_map_node(scene, default_engine, monkeypatch):
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.engine.inference import Cancelled
    from Speckle2SelfLib.scene import despeckle
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    sequence, browser, proxy = _sequence_nodes(scene, _frames(n=3))
    logic = Speckle2SelfLogic(default_engine, sequences_logic=scene.sequences_logic)
    ids, synchronised = _node_ids(scene), browser.GetNumberOfSynchronizedSequenceNodes()
    steps = []
    with pytest.raises(Cancelled):           # cancelled while the output sequence is being stored
        logic.despeckle_sequence(sequence, uncertainty=True, progress=lambda done, total: steps.append(done),
                                 cancel=lambda: bool(steps) and steps[-1] >= 4)
    assert _node_ids(scene) == ids and browser.GetNumberOfSynchronizedSequenceNodes() == synchronised
    job = logic.prepare_job(proxy, uncertainty=True)
    job.cancel()
    job.start()
    assert job.wait(120) and job.poll().cancelled
    assert _node_ids(scene) == ids and logic.last_uncertainty_node is None
    real = despeckle._commit_maps

    def fails_after_the_maps(*args):
        real(*args)
        raise RuntimeError("disk full")

    monkeypatch.setattr(despeckle, "_commit_maps", fails_after_the_maps)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.despeckle_sequence(sequence, uncertainty=True)
    assert _node_ids(scene) == ids and browser.GetNumberOfSynchronizedSequenceNodes() == synchronised


def test_a_rerun_that_fails_keeps_the_earlier_output_and_map(scene, default_engine, monkeypatch):
    """A rerun into the same output and map fills new nodes first; the earlier results are replaced
    only once everything new is in place, so a failure while filling leaves them as they were."""
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.scene import despeckle, nodes
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    sequence, browser, proxy = _sequence_nodes(scene, _frames(n=3))
    logic = Speckle2SelfLogic(default_engine, sequences_logic=scene.sequences_logic)
    first = logic.despeckle_sequence(proxy, uncertainty=True)
    maps = first.uncertainty_node
    before = [nodes.volume_to_array(maps.GetNthDataNode(k)).copy() for k in range(maps.GetNumberOfDataNodes())]
    ids = _node_ids(scene)

    real = despeckle._fill_items

    def fails_filling_the_maps(target, source, per_item, class_name, suffix, *rest):
        if suffix == despeckle.UNCERTAINTY_SUFFIX:       # the output's new sequence is filled by then
            raise RuntimeError("out of memory")
        return real(target, source, per_item, class_name, suffix, *rest)

    monkeypatch.setattr(despeckle, "_fill_items", fails_filling_the_maps)
    with pytest.raises(RuntimeError, match="out of memory"):
        logic.despeckle_sequence(proxy, first.proxy_node, uncertainty=True,
                                 uncertainty_node=first.uncertainty_proxy_node)
    assert _node_ids(scene) == ids
    assert first.sequence_node.GetScene() is scene and first.sequence_node.GetNumberOfDataNodes() == 3
    assert maps.GetNumberOfDataNodes() == len(before)
    for k, values in enumerate(before):
        np.testing.assert_array_equal(nodes.volume_to_array(maps.GetNthDataNode(k)), values)


def test_a_new_output_gets_a_new_map_and_the_earlier_output_keeps_its_own(scene, default_engine):
    """The module remembers the last map; Apply into a new output must not take it from the output
    it describes."""
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic

    sequence, browser, proxy = _sequence_nodes(scene, _frames(n=2))
    logic = Speckle2SelfLogic(default_engine, sequences_logic=scene.sequences_logic)
    first = logic.despeckle_sequence(proxy, uncertainty=True)
    job = logic.start_process(proxy, None, uncertainty=True, uncertainty_node=first.uncertainty_proxy_node)
    assert job.wait(120) and job.poll().finished
    second = job.poll().result
    assert second.uncertainty_node is not first.uncertainty_node
    assert first.uncertainty_node.GetAttribute("Speckle2Self.UncertaintyOf") == first.sequence_node.GetID()
    assert second.uncertainty_node.GetAttribute("Speckle2Self.UncertaintyOf") == second.sequence_node.GetID()
    # into the output it describes, the remembered map is refilled (no new node)
    again = logic.start_process(proxy, first.proxy_node, uncertainty=True, uncertainty_node=first.uncertainty_proxy_node)
    assert again.wait(120) and again.poll().result.uncertainty_node is first.uncertainty_node


def _carotid_frames(n=2):
    from Speckle2SelfLib.simulation import make_phantom, simulate_bmode

    phantom = make_phantom("carotid", size=(160, 160), seed=1002)
    frames = [(simulate_bmode(phantom.clean, fc=7.5e6, seed=1002 + k).bmode * 255).round().astype(np.uint8)
              for k in range(n)]
    return np.stack(frames), phantom


def test_lumen_table_on_a_sequence_gets_each_frames_boundary_uncertainty(scene, default_engine):
    pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    from Speckle2SelfLib.scene import lumen as scene_lumen
    from Speckle2SelfLib.scene.logic import Speckle2SelfLogic
    from Speckle2SelfLib.scene.nodes import volume_to_array

    frames, phantom = _carotid_frames(2)
    sequence, browser, proxy = _sequence_nodes(scene, frames)
    logic = Speckle2SelfLogic(default_engine, sequences_logic=scene.sequences_logic)
    out = logic.despeckle_sequence(proxy, uncertainty=True)
    row, col = segmentation.seed_from_mask(phantom.lumen_mask)
    result = scene_lumen.segment_lumen(out.sequence_node, seed_ijk=(col, row, 0), plot=False)
    assert result.segmentation_sequence_node is not None and result.frames == [0, 1]
    shares = scene_lumen.add_boundary_uncertainty(result, out.uncertainty_node, out.sequence_node)
    column = result.table_node.GetTable().GetColumnByName(scene_lumen.BOUNDARY_UNCERTAINTY_COLUMN)
    assert column is not None and column.GetNumberOfTuples() == 2
    for k in range(2):
        expected = segmentation.uncertain_boundary_share(
            result.sequence.masks[k], volume_to_array(out.uncertainty_node.GetNthDataNode(k))[0],
            volume_to_array(out.sequence_node.GetNthDataNode(k))[0])
        assert 0.0 <= shares[k] <= 1.0 and column.GetValue(k) == pytest.approx(expected)
    # the module passes the proxies: the same column
    assert scene_lumen.add_boundary_uncertainty(result, out.uncertainty_proxy_node, out.proxy_node) == shares
    with pytest.raises(ValueError, match="must be a sequence"):
        scene_lumen.add_boundary_uncertainty(result, _volume_node(scene, frames[:1]), out.sequence_node)
    with pytest.raises(ValueError, match="not measured on sequence"):
        scene_lumen.add_boundary_uncertainty(result, out.uncertainty_node, sequence)
    shifted, _b, _p = _sequence_nodes(scene, frames, "other")
    shifted.UpdateIndexValue("1.50", "9.00")             # a map sequence whose index values differ
    with pytest.raises(ValueError, match="has no item at time 1.50"):
        scene_lumen.add_boundary_uncertainty(result, shifted, out.sequence_node)
