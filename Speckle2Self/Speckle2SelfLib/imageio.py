"""Read ultrasound images, volumes, sequences and DICOM as grey frames; write results back alike.

Everything is read as a stack of 2D grey frames (N, H, W) plus what is needed to write an
output "like" the input: the SimpleITK image (geometry + header fields such as PLUS
``Seq_Frame*`` entries) or the DICOM dataset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: ITU-R BT.601 luma weights, the usual RGB -> grey mapping for ultrasound screen captures.
LUMA = np.array([0.299, 0.587, 0.114])


class UnsupportedInputError(ValueError):
    """The file is not an image, volume, sequence or DICOM this library can read."""


@dataclass
class ImageData:
    """Grey frames read from one file, and what is needed to write a result like it."""

    path: Path
    frames: np.ndarray                  # (N, H, W), the file's own dtype (RGB -> luminance float32)
    kind: str                           # "image" | "volume" | "sequence" | "dicom"
    is_2d: bool                         # a single 2D image (write back as 2D)
    was_rgb: bool = False
    spacing: tuple = (1.0, 1.0, 1.0)    # (x, y, z) in mm where known
    source: Any = field(default=None, repr=False)  # SimpleITK image or pydicom dataset

    @property
    def array(self) -> np.ndarray:
        """(H, W) for a single 2D image, else (N, H, W)."""
        return self.frames[0] if self.is_2d else self.frames


def to_luminance(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) colour -> (...) float32 grey (alpha ignored)."""
    return (rgb[..., :3].astype(np.float32) @ LUMA.astype(np.float32)).astype(np.float32)


def luminance_like(rgb: np.ndarray) -> np.ndarray:
    """Luminance in the colour data's own dtype (uint8 RGB -> uint8 grey), so outputs keep it."""
    grey = to_luminance(rgb)
    if rgb.dtype.kind in "ui":
        return np.clip(np.rint(grey), 0, np.iinfo(rgb.dtype).max).astype(rgb.dtype)
    return grey


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_readable(path: Path) -> bool:
    """Whether the file's name says it is something :func:`read_frames` reads."""
    return path.is_file() and _suffix(path) in IMAGE_SUFFIXES + SITK_SUFFIXES + DICOM_SUFFIXES


def read_frames(path) -> ImageData:
    """Read a file as grey frames. Raises UnsupportedInputError with the reason and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return _read_picture(path)
    if suffix in SITK_SUFFIXES:
        return _read_sitk(path)
    if suffix in DICOM_SUFFIXES or _looks_like_dicom(path):
        return _read_dicom(path)
    raise UnsupportedInputError(
        f"{path}: unsupported file type {suffix!r}; use an image ({', '.join(IMAGE_SUFFIXES)}), "
        f"a volume or sequence ({', '.join(SITK_SUFFIXES)}) or DICOM (.dcm)")


def _looks_like_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _grey(arr: np.ndarray, channel_axis_last: bool, path: Path) -> tuple:
    """Return (grey array, was_rgb); colour must sit in a last axis of 3 or 4 components."""
    if channel_axis_last and arr.ndim >= 3 and arr.shape[-1] in (3, 4):
        return luminance_like(arr), True
    return arr, False


def _read_picture(path: Path) -> ImageData:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "1"):
            im = im.convert("RGB" if im.mode != "1" else "L")
        arr = np.array(im)
    grey, was_rgb = _grey(arr, True, path)
    if grey.ndim != 2:
        raise UnsupportedInputError(f"{path}: expected a 2D grey or RGB picture, got shape {arr.shape}")
    return ImageData(path, grey[None], "image", True, was_rgb)


def _read_sitk(path: Path) -> ImageData:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise UnsupportedInputError(f"{path}: SimpleITK could not read it ({err})") from err
    arr = sitk.GetArrayFromImage(img)          # (z, y, x[, c]) or (y, x[, c])
    if img.GetNumberOfComponentsPerPixel() > 1:
        if img.GetNumberOfComponentsPerPixel() not in (3, 4):
            raise UnsupportedInputError(
                f"{path}: {img.GetNumberOfComponentsPerPixel()}-component pixels; only grey or RGB(A) is supported")
        arr, was_rgb = luminance_like(arr), True
    else:
        was_rgb = False
    is_2d = arr.ndim == 2
    if is_2d:
        arr = arr[None]
    if arr.ndim != 3:
        raise UnsupportedInputError(f"{path}: expected a 2D image or 3D volume/sequence, got {img.GetDimension()}D")
    keys = img.GetMetaDataKeys()
    kind = "sequence" if any(k.startswith("Seq_Frame") for k in keys) else ("image" if is_2d else "volume")
    spacing = tuple(img.GetSpacing()) + (1.0,) * (3 - img.GetDimension())
    return ImageData(path, arr, kind, is_2d, was_rgb, spacing, img)


def _read_dicom(path: Path) -> ImageData:
    import pydicom
    from pydicom.pixels import apply_color_lut

    try:
        ds = pydicom.dcmread(str(path))
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types for unreadable pixel data
        raise UnsupportedInputError(
            f"{path}: could not decode the DICOM pixel data ({err}); for JPEG 2000 install pylibjpeg-openjpeg") from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    # pydicom >= 3 already returns YBR (incl. JPEG 2000 RCT/ICT) pixels as RGB.
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    colour = int(ds.get("SamplesPerPixel", 1)) > 1 or photometric == "PALETTE COLOR"
    if colour:
        arr = luminance_like(arr)
    elif photometric == "MONOCHROME1":
        arr = arr.max() - arr   # MONOCHROME1 shows low values bright
    if frames == 1 or arr.ndim == 2:
        arr = arr.reshape((1,) + arr.shape[-2:])
    spacing = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])][::-1] + [1.0]
    return ImageData(path, np.asarray(arr), "dicom", frames == 1, colour, tuple(spacing), ds)


def iter_inputs(paths: List[str]) -> Iterator[Path]:
    """Expand files and folders (recursively, sorted) into readable files."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from (f for f in sorted(p.rglob("*")) if is_readable(f))
        elif p.exists():
            yield p
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")


# ----------------------------------------------------------------------------- writing

def write_like(out_path, frames: np.ndarray, like: ImageData) -> Path:
    """Write grey frames (N, H, W) or (H, W) in the input's format with its geometry."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    frames = frames if frames.ndim == 3 else frames[None]
    suffix = _suffix(out_path)
    if suffix in IMAGE_SUFFIXES:
        _write_picture(out_path, frames)
    elif suffix in SITK_SUFFIXES:
        _write_sitk(out_path, frames, like)
    elif suffix in DICOM_SUFFIXES:
        _write_dicom(out_path, frames, like)
    else:
        raise UnsupportedInputError(f"{out_path}: cannot write {suffix!r}; use .png, .mha, .nrrd, .nii.gz or .dcm")
    return out_path


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """uint8 stays; other dtypes are min-max scaled to 0..255 for display formats."""
    if frame.dtype == np.uint8:
        return frame
    lo, hi = float(np.min(frame)), float(np.max(frame))
    scaled = (frame.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(frame.shape)
    return np.round(scaled * 255).astype(np.uint8)


def _write_picture(path: Path, frames: np.ndarray) -> None:
    from PIL import Image

    if frames.shape[0] != 1:
        raise ValueError(f"{path}: a picture holds one frame, got {frames.shape[0]}; write .mha or .nrrd instead")
    Image.fromarray(to_uint8(frames[0])).save(path)


def _write_sitk(path: Path, frames: np.ndarray, like: ImageData) -> None:
    import SimpleITK as sitk

    arr = frames[0] if like.is_2d else frames
    out = sitk.GetImageFromArray(arr)
    src = like.source
    if isinstance(src, sitk.Image):
        out.CopyInformation(src) if src.GetNumberOfComponentsPerPixel() == 1 else _copy_geometry(out, src)
        for key in src.GetMetaDataKeys():   # PLUS sequence fields, transforms, timestamps
            out.SetMetaData(key, src.GetMetaData(key))
    else:
        out.SetSpacing(like.spacing[: out.GetDimension()])
    sitk.WriteImage(out, str(path), useCompression=True)


def _copy_geometry(out, src) -> None:
    out.SetSpacing(src.GetSpacing())
    out.SetOrigin(src.GetOrigin())
    out.SetDirection(src.GetDirection())


def _write_dicom(path: Path, frames: np.ndarray, like: ImageData) -> None:
    """A derived grey DICOM: the input's patient/study/geometry tags, new pixels and UIDs."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if not isinstance(like.source, pydicom.Dataset):
        raise ValueError(f"{path}: DICOM output needs a DICOM input; write .png or .mha instead")
    ds = copy.deepcopy(like.source)
    pixels = frames if frames.dtype in (np.uint8, np.uint16) else to_uint8(frames)
    for tag in ("PaletteColorLookupTableUID", "RedPaletteColorLookupTableDescriptor",
                "GreenPaletteColorLookupTableDescriptor", "BluePaletteColorLookupTableDescriptor",
                "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData",
                "BluePaletteColorLookupTableData", "PlanarConfiguration"):
        if tag in ds:
            delattr(ds, tag)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.shape[0] > 1:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelData = (pixels if pixels.shape[0] > 1 else pixels[0]).tobytes()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = (str(ds.get("SeriesDescription", "")) + " despeckled").strip()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(str(path), enforce_file_format=True)
