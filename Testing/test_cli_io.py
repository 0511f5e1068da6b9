"""Files in, files out: readers, writers and the `speckle2self` command line."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import SHARED, requires_shared
from Speckle2SelfLib.cli import main
from Speckle2SelfLib.fileio.imageio import UnsupportedInputError, read_frames, write_like


def _speckle(shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.rayleigh(60, size=shape), 0, 255).astype(np.uint8)


def test_rgb_png_is_read_as_luminance(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    data = read_frames(tmp_path / "c.png")
    assert data.was_rgb and data.is_2d and data.array.shape == (20, 30) and data.array.dtype == np.uint8
    assert data.array[0, 0] == round(0.299 * 100 + 0.587 * 200)


def test_volume_geometry_and_header_fields_survive_a_round_trip(tmp_path):
    img = sitk.GetImageFromArray(_speckle((4, 24, 32)))
    img.SetSpacing((0.2, 0.3, 1.5))
    img.SetOrigin((10.0, -5.0, 2.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    img.SetMetaData("Seq_Frame0000_Timestamp", "12.5")
    sitk.WriteImage(img, str(tmp_path / "in.mha"))
    data = read_frames(tmp_path / "in.mha")
    assert data.kind == "sequence" and data.frames.shape == (4, 24, 32)
    write_like(tmp_path / "out.mha", data.frames[::-1].copy(), data)
    back = sitk.ReadImage(str(tmp_path / "out.mha"))
    assert back.GetSpacing() == img.GetSpacing() and back.GetOrigin() == img.GetOrigin()
    assert back.GetDirection() == img.GetDirection()
    assert back.GetMetaData("Seq_Frame0000_Timestamp") == "12.5"


def test_unsupported_and_missing_files_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedInputError, match="unsupported file type '.txt'"):
        read_frames(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_frames(tmp_path / "missing.png")


@pytest.mark.parametrize("name, colour", [("US1_UNCR.dcm", True), ("US1_J2KR.dcm", True),
                                          ("gdcm-US-ALOKA-16.dcm", True)])
def test_real_ultrasound_dicom_reads_and_writes_a_derived_dicom(name, colour, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not installed (pip install pydicom-data)")
    data = read_frames(path)
    assert data.was_rgb == colour and data.frames.shape == (1, 480, 640)
    assert data.frames.max() > data.frames.min()
    out = write_like(tmp_path / "out.dcm", data.frames, data)
    ds = pydicom.dcmread(out)
    assert ds.PhotometricInterpretation == "MONOCHROME2" and "DERIVED" in ds.ImageType
    assert ds.SOPInstanceUID != data.source.SOPInstanceUID
    assert ds.pixel_array.shape == (480, 640)


def test_j2k_and_uncompressed_copies_read_alike():
    from pydicom.data import get_testdata_file

    a, b = get_testdata_file("US1_UNCR.dcm"), get_testdata_file("US1_J2KR.dcm")
    if a is None or b is None:
        pytest.skip("pydicom-data not installed")
    np.testing.assert_array_equal(read_frames(a).frames, read_frames(b).frames)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_train")
    for i in range(3):
        Image.fromarray(_speckle((48, 64), seed=i)).save(folder / f"f{i}.png")
    out = folder / "model.pt"
    assert main(["train", str(folder), "--out", str(out), "--steps", "3", "--width", "4", "--batch", "2",
                 "--crop", "32", "--preview-every", "0", "--device", "cpu"]) == 0
    return out


def test_train_writes_a_model_that_info_describes(cli_model, capsys):
    assert cli_model.is_file() and cli_model.with_suffix(".ckpt").is_file()
    assert main(["info", str(cli_model)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["width"] == 4 and info["training"]["steps_done"] == 3
    assert info["training"]["data"]["frames"] == 3 and info["parameters"] > 0


def test_denoise_a_folder_keeps_names_and_writes_8bit_png(cli_model, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_speckle((40, 50))).save(src / "a.png")
    Image.fromarray(_speckle((36, 44), 1)).save(src / "sub" / "b.png")
    (src / "readme.txt").write_text("not an image")
    before = (src / "a.png").read_bytes()
    assert main(["denoise", str(src), str(tmp_path / "out"), "--model", str(cli_model), "--device", "cpu"]) == 0
    a = Image.open(tmp_path / "out" / "a.png")
    assert a.mode == "L" and a.size == (50, 40)
    assert Image.open(tmp_path / "out" / "sub" / "b.png").size == (44, 36)
    assert (src / "a.png").read_bytes() == before


def test_denoise_refuses_to_overwrite_its_input(cli_model, tmp_path, capsys):
    Image.fromarray(_speckle((40, 50))).save(tmp_path / "a.png")
    assert main(["denoise", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--model", str(cli_model)]) == 2
    assert "overwrite the input" in capsys.readouterr().err


def test_info_on_a_non_model_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a model")
    assert main(["info", str(tmp_path / "x.pt")]) == 2
    assert "not a TorchScript model" in capsys.readouterr().err


@requires_shared
def test_denoise_a_real_plus_sequence_keeps_its_header(cli_model, tmp_path):
    src = SHARED / "sequences" / "UltrasonixCurvilinearScanConvertedData.igs.mha"
    out = tmp_path / "out.igs.mha"
    assert main(["denoise", str(src), str(out), "--model", str(cli_model), "--device", "cpu"]) == 0
    a, b = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert b.GetSize() == a.GetSize() and b.GetSpacing() == a.GetSpacing()
    assert b.GetPixelID() == a.GetPixelID()
    seq_keys = [k for k in a.GetMetaDataKeys() if k.startswith("Seq_Frame")]
    assert seq_keys and all(b.GetMetaData(k) == a.GetMetaData(k) for k in seq_keys)


def test_denoise_grey_levels_option_reaches_the_output(tmp_path, capsys):
    from conftest import simulated_frames

    frame = np.rint(simulated_frames(n=1, size=96, seed=4)[0][0] * 255).astype(np.uint8)
    Image.fromarray(frame).save(tmp_path / "a.png")
    outputs = {}
    for levels in ("auto", "network"):
        out = tmp_path / f"{levels}.png"
        assert main(["denoise", str(tmp_path / "a.png"), str(out), "--device", "cpu", "--grey-levels", levels,
                     "--refine", "none"]) == 0
        outputs[levels] = np.asarray(Image.open(out), dtype=np.float64)
    # The bundled model's own grey levels are stretched; by default they follow the input's
    # (the guided refinement, the default, always has the input's levels).
    assert abs(outputs["auto"].mean() - frame.mean()) < abs(outputs["network"].mean() - frame.mean())
    assert main(["denoise", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--grey-levels", "fit"]) == 2
    assert "invalid choice: 'fit'" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()
    # With the default model's guided refinement the network's levels cannot reach the output:
    # refused in one line naming the fix, before anything is written.
    assert main(["denoise", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--grey-levels", "network"]) == 2
    err = capsys.readouterr().err
    assert "--refine none" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.png").exists()
