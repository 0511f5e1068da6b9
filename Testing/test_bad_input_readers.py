"""Bad files of every readable format: empty, truncated, text, another format's bytes, damaged
header; and unusual but valid pictures (1x1, 16-bit, RGBA, palette, multi-page). Issue #16.

Each bad file is refused by ``read_frames`` with one line that names the file, and by
``speckle2self denoise`` with exit code 2, one error line, no output and the input unchanged.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from test_bad_input_helpers import assert_refused, needs_non_root, run_cli, sha, snapshot, speckle
from Speckle2SelfLib.fileio.imageio import UnsupportedInputError, read_frames

FORMATS = ["png", "jpg", "tif", "bmp", "mha", "nrrd", "nii.gz", "dcm"]
KINDS = ["empty", "truncated", "text", "other-format", "damaged-header"]


def write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "US", "Test^Bad"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def write_valid(path: Path, pixels: np.ndarray) -> Path:
    fmt = path.name.split(".", 1)[1]
    if fmt in ("png", "jpg", "tif", "bmp"):
        Image.fromarray(pixels).save(path)
    elif fmt == "dcm":
        write_dicom(path, pixels)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(pixels), str(path))
    return path


def valid_bytes(fmt: str, tmp_path: Path) -> bytes:
    return write_valid(tmp_path / f"valid.{fmt}", speckle((48, 64))).read_bytes()


def damage_header(fmt: str, data: bytes) -> bytes:
    if fmt == "png":        # a byte of the IHDR chunk: its CRC no longer matches
        return data[:18] + bytes([data[18] ^ 0xFF]) + data[19:]
    if fmt in ("jpg", "tif", "bmp"):     # the signature (SOI marker, byte order mark, "BM")
        return b"\x00\x00\x00\x00" + data[4:]
    if fmt == "mha":
        return data.replace(b"ElementType = MET_UCHAR", b"ElementType = MET_BOGUS")
    if fmt == "nrrd":
        return data.replace(b"dimension: 2", b"dimension: 9")
    if fmt == "nii.gz":     # the gzip member's header
        return b"\x1f\x8b\x99\x00" + data[4:]
    if fmt == "dcm":        # Rows (0028,0010) claims far more pixels than the data holds
        import pydicom
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.Rows = 4000
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()
    raise AssertionError(fmt)


def make_bad(tmp_path: Path, fmt: str, kind: str) -> Path:
    path = tmp_path / "in" / f"bad.{fmt}"
    path.parent.mkdir()
    if kind == "empty":
        data = b""
    elif kind == "truncated":
        whole = valid_bytes(fmt, tmp_path)
        data = whole[: len(whole) * 6 // 10]
    elif kind == "text":
        data = b"this is a text file, not an image\n" * 4
    elif kind == "other-format":     # valid bytes of another family under this extension
        other = "mha" if fmt in ("png", "jpg", "tif", "bmp") else "png"
        data = valid_bytes(other, tmp_path)
    else:
        data = damage_header(fmt, valid_bytes(fmt, tmp_path))
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_file_is_refused_by_reader_and_cli(fmt, kind, tmp_path, untrained_model, capsys):
    path = make_bad(tmp_path, fmt, kind)
    before = sha(path)
    with pytest.raises(UnsupportedInputError) as info:
        read_frames(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    out = tmp_path / "out" / f"result.{fmt}"
    out.parent.mkdir()
    result = run_cli(["denoise", path, out, "--model", untrained_model, "--device", "cpu"], capsys)
    assert_refused(result, 2, str(path))
    assert snapshot(out.parent) == {}, "nothing is written for a refused input"
    assert sha(path) == before


def test_missing_input_and_folder_as_file(tmp_path, untrained_model, capsys):
    result = run_cli(["denoise", tmp_path / "nope.png", tmp_path / "o.png", "--model", untrained_model], capsys)
    assert_refused(result, 2, "nope.png", "no such file")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(UnsupportedInputError, match="is a folder"):
        read_frames(tmp_path / "d.png")


@needs_non_root
def test_unreadable_input_names_permission(tmp_path, untrained_model, capsys):
    path = write_valid(tmp_path / "locked.png", speckle((32, 32)))
    path.chmod(0)
    try:
        result = run_cli(["denoise", path, tmp_path / "o.png", "--model", untrained_model], capsys)
        assert_refused(result, 2, "locked.png", "permission denied")
    finally:
        path.chmod(0o644)


# ----------------------------------------------------------------------------- unusual valid pictures

def _picture(tmp_path, name, image: Image.Image) -> Path:
    path = tmp_path / name
    image.save(path)
    return path


def test_one_pixel_picture_is_too_small(tmp_path, untrained_model, capsys):
    path = _picture(tmp_path, "dot.png", Image.fromarray(np.array([[7]], np.uint8)))
    assert read_frames(path).frames.shape == (1, 1, 1)
    result = run_cli(["denoise", path, tmp_path / "o.png", "--model", untrained_model], capsys)
    assert_refused(result, 2, "dot.png", "too small")
    assert not (tmp_path / "o.png").exists()


def test_multi_page_tiff_is_refused_not_cut_to_its_first_page(tmp_path):
    pages = [Image.fromarray(speckle((32, 32), seed=k)) for k in range(3)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(UnsupportedInputError, match="3-page TIF.*mha"):
        read_frames(path)


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "P", "LA", "F"])
def test_unusual_picture_modes_are_despeckled(mode, tmp_path, untrained_model, capsys):
    grey = speckle((40, 56))
    if mode == "I;16":
        image = Image.fromarray(grey.astype(np.uint16) * 257)
    elif mode == "RGBA":
        image = Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 200)]))
    elif mode == "P":
        image = Image.fromarray(grey).convert("P")
    elif mode == "LA":
        image = Image.fromarray(grey).convert("LA")
    else:
        image = Image.fromarray(grey.astype(np.float32) / 255.0)
    suffix = "tif" if mode == "F" else "png"
    path = _picture(tmp_path, f"in.{suffix}", image)
    before = sha(path)
    out = tmp_path / f"out.{suffix}"
    result = run_cli(["denoise", path, out, "--model", untrained_model, "--device", "cpu"], capsys)
    assert result.code == 0, result.err
    back = np.array(Image.open(out))
    assert back.shape == (40, 56)
    if mode == "I;16":
        assert back.dtype == np.uint16 or Image.open(out).mode.startswith("I"), "16-bit stays 16-bit"
        assert back.max() > 255
    assert sha(path) == before
