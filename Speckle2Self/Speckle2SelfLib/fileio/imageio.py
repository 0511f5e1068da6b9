"""Read ultrasound images, volumes, sequences and DICOM as grey frames; write results back alike.

Everything is read as a stack of 2D grey frames (N, H, W) plus what is needed to write an
output "like" the input: the SimpleITK image (geometry + header fields such as PLUS
``Seq_Frame*`` entries) or the DICOM dataset.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np

from .formats import (DICOM_SUFFIXES, IMAGE_SUFFIXES, PIL_FORMATS, READABLE_SUFFIXES,  # noqa: F401 (the API)
                      SITK_IO, SITK_SUFFIXES, WRITABLE_SUFFIXES, has_dicom_preamble, is_readable,
                      is_unnamed_dicom, suffix_of)
from .safeio import atomic_output

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


def read_frames(path) -> ImageData:
    """Read a file as grey frames. Raises UnsupportedInputError with the reason and the fix
    (FileNotFoundError / PermissionError for a missing or unreadable file); every message is
    one line that names the file."""
    path = Path(path)
    if path.is_dir():
        raise UnsupportedInputError(f"{path}: is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except PermissionError as err:
        raise PermissionError(f"{path}: permission denied (cannot read the file)") from err
    except OSError as err:
        raise UnsupportedInputError(f"{path}: cannot read the file ({err.strerror or err})") from err
    if not head:
        raise UnsupportedInputError(f"{path}: the file is empty (0 bytes)")
    suffix = suffix_of(path)
    if suffix in IMAGE_SUFFIXES:
        data = _read_picture(path)
    elif suffix in SITK_SUFFIXES:
        data = _read_sitk(path)
    elif suffix in DICOM_SUFFIXES or has_dicom_preamble(head):
        data = _read_dicom(path)
    else:
        raise UnsupportedInputError(
            f"{path}: unsupported file type {suffix!r}; use an image ({', '.join(IMAGE_SUFFIXES)}), "
            f"a volume or sequence ({', '.join(SITK_SUFFIXES)}) or DICOM (.dcm)")
    if data.frames.size == 0 or 0 in data.frames.shape:
        raise UnsupportedInputError(f"{path}: the image has no pixels (shape {data.frames.shape[1:]} "
                                    f"x {data.frames.shape[0]} frames)")
    if data.frames.dtype.kind not in "uif":
        raise UnsupportedInputError(f"{path}: pixel type {data.frames.dtype} is not an intensity")
    return data


def _cause(err: BaseException, native: str = "") -> str:
    """A reader's exception (plus what a native library printed) as a short one-line cause."""
    import re

    lines = [" ".join(line.split()) for line in (str(err) + "\n" + native).splitlines() if line.strip()]
    # ITK appends "Reason: <strerror(errno)>", whatever errno last held: not a cause.
    noise = ("exception thrown in", "reason:", "itk::", "location:", "file:", "line:")
    lines = [re.sub(r"^(ITK ERROR: \w+\(0x[0-9a-fA-F]+\): |MetaImage: |Description: )", "", line)
             for line in lines if not line.lower().startswith(noise)]
    preferred = [line for line in lines if any(k in line.lower() for k in ("not read completely", "ideal =",
                                                                        "expected", "truncat", "corrupt"))]
    chosen = list(dict.fromkeys(preferred or lines))[:2]
    text = "; ".join(chosen) if chosen else type(err).__name__
    return text[:200]


@contextmanager
def _native_stderr():
    """Capture what C++ libraries (ITK, MetaIO) print straight to file descriptor 2, so that a
    failure stays one line; yields a list that receives the captured text."""
    captured: List[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield captured
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read(4096).decode("utf-8", "replace"))


def _nifti_problem(path: Path) -> Optional[str]:
    """ITK zero-fills a truncated NIfTI file silently: compare its size with its header."""
    import gzip
    import struct

    try:
        if suffix_of(path) == ".nii.gz":
            with gzip.open(path, "rb") as fh:
                head = fh.read(544)
                size = len(head)
                while True:
                    block = fh.read(1 << 20)
                    if not block:
                        break
                    size += len(block)
        else:
            with open(path, "rb") as fh:
                head = fh.read(544)
            size = path.stat().st_size
    except (EOFError, OSError, gzip.BadGzipFile) as err:
        return f"the compressed data is incomplete or damaged ({err})"
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            bitpix = struct.unpack(order + "h", head[72:74])[0]
            offset = int(struct.unpack(order + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", head[14:16])[0]
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
            break
    else:
        return "no NIfTI header"
    count = 1
    for d in dims[1:1 + max(0, min(int(dims[0]), 7))]:
        count *= max(int(d), 0)
    expected = max(offset, 348) + count * max(int(bitpix), 0) // 8
    if size < expected:
        return f"truncated: {size} bytes of image data where the header needs {expected}"
    return None


def _grey(arr: np.ndarray, channel_axis_last: bool, path: Path) -> tuple:
    """Return (grey array, was_rgb); colour must sit in a last axis of 3 or 4 components."""
    if channel_axis_last and arr.ndim >= 3 and arr.shape[-1] in (3, 4):
        return luminance_like(arr), True
    return arr, False


def _read_picture(path: Path) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    kind = suffix_of(path).lstrip(".").upper()
    try:
        with Image.open(path) as im:
            actual = PIL_FORMATS.get(str(im.format))
            if actual is not None and suffix_of(path) not in actual:
                raise UnsupportedInputError(f"{path}: the file holds a {im.format} image, not {kind}; "
                                            f"rename it to {actual[0]}")
            pages = int(getattr(im, "n_frames", 1) or 1)
            if pages > 1:
                raise UnsupportedInputError(f"{path}: a {pages}-page {kind}; only single-page pictures are read, "
                                            "save the stack as .mha or .nrrd instead")
            if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "HSV", "1", "LAB"):
                im = im.convert("RGB" if im.mode not in ("1", "LA") else "L")
            arr = np.array(im)
    except UnsupportedInputError:
        raise
    except UnidentifiedImageError as err:
        raise UnsupportedInputError(f"{path}: not a {kind} image (unrecognised or corrupt content)") from err
    except Image.DecompressionBombError as err:
        raise UnsupportedInputError(f"{path}: picture too large to read safely ({_cause(err)})") from err
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
        raise UnsupportedInputError(f"{path}: corrupt or truncated {kind} image ({_cause(err)})") from err
    if arr.dtype == object or arr.ndim < 2:
        raise UnsupportedInputError(f"{path}: unsupported {kind} pixel format")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    grey, was_rgb = _grey(arr, True, path)
    if grey.ndim != 2:
        raise UnsupportedInputError(f"{path}: expected a 2D grey or RGB picture, got shape {arr.shape}")
    return ImageData(path, grey[None], "image", True, was_rgb)


def _read_sitk(path: Path) -> ImageData:
    import SimpleITK as sitk

    expected = SITK_IO.get(suffix_of(path))
    try:
        used = sitk.ImageFileReader.GetImageIOFromFileName(str(path))
    except (RuntimeError, AttributeError):
        used = ""
    if expected and used and used != expected:
        raise UnsupportedInputError(f"{path}: the file holds a {used.replace('ImageIO', '')} image, not "
                                    f"{suffix_of(path)}; rename it with its own extension")
    if expected == "NiftiImageIO":
        problem = _nifti_problem(path)
        if problem:
            raise UnsupportedInputError(f"{path}: corrupt or truncated NIfTI file ({problem})")
    with _native_stderr() as native:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            if expected:
                reader.SetImageIO(expected)
            img = reader.Execute()
            arr = sitk.GetArrayFromImage(img)          # (z, y, x[, c]) or (y, x[, c])
            error = None
        except RuntimeError as err:
            error = err
    if error is not None:
        raise UnsupportedInputError(f"{path}: corrupt, truncated or not a {suffix_of(path)} file "
                                    f"({_cause(error, ''.join(native))})") from error
    if arr.dtype.kind == "c":
        raise UnsupportedInputError(f"{path}: complex-valued voxels; give magnitudes (B-mode) instead")
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
    except Exception as err:  # InvalidDicomError, EOFError, struct errors, ...
        raise UnsupportedInputError(f"{path}: not a readable DICOM file ({_cause(err)})") from err
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise UnsupportedInputError(f"{path}: a DICOM file without pixel data (not an image)")
    try:
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types for unreadable pixel data
        hint = "; for JPEG 2000 install pylibjpeg-openjpeg" if "2000" in str(err) or "plugin" in str(err) else ""
        raise UnsupportedInputError(
            f"{path}: could not decode the DICOM pixel data ({_cause(err)}){hint}") from err
    try:
        return _dicom_frames(path, ds, arr, apply_color_lut)
    except UnsupportedInputError:
        raise
    except Exception as err:    # inconsistent tags (frames, samples, spacing, palette)
        raise UnsupportedInputError(f"{path}: inconsistent DICOM image tags ({_cause(err)})") from err


def _dicom_frames(path: Path, ds, arr: np.ndarray, apply_color_lut) -> ImageData:
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
    if arr.ndim != 3:
        raise UnsupportedInputError(f"{path}: DICOM pixel array of shape {arr.shape}; expected frames of 2D pixels")
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



def check_output_format(out_path, like: ImageData, frames: Optional[int] = None) -> None:
    """Raise UnsupportedInputError when ``like``'s frames cannot be written to ``out_path``
    (unknown extension, several frames into a picture, DICOM from a non-DICOM input)."""
    out_path = Path(out_path)
    suffix = suffix_of(out_path)
    frames = like.frames.shape[0] if frames is None else frames
    if suffix not in WRITABLE_SUFFIXES:
        raise UnsupportedInputError(f"{out_path}: cannot write {suffix!r}; use .png, .mha, .nrrd, .nii.gz or .dcm")
    if suffix in IMAGE_SUFFIXES and frames != 1:
        raise UnsupportedInputError(f"{out_path}: a picture holds one frame, the input has {frames}; "
                                    "write .mha or .nrrd instead")
    if suffix in DICOM_SUFFIXES and like.kind != "dicom":
        raise UnsupportedInputError(f"{out_path}: DICOM output needs a DICOM input; write .png or .mha instead")


def write_like(out_path, frames: np.ndarray, like: ImageData, derivation: Optional[dict] = None) -> Path:
    """Write grey frames (N, H, W) or (H, W) in the input's format with its geometry.

    The file is written under a temporary name in the destination folder and renamed into
    place (Speckle2SelfLib.fileio.safeio.atomic_output): a killed run never leaves a partial file
    under the output's name, and a failed write leaves an earlier file of that name as it was.
    """

    out_path = Path(out_path)
    frames = frames if frames.ndim == 3 else frames[None]
    check_output_format(out_path, like, frames.shape[0])
    if frames.dtype.kind == "f" and not np.isfinite(frames).all():
        raise ValueError(f"{out_path}: the result contains NaN or infinite values; nothing was written")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix_of(out_path)
    with atomic_output(out_path) as tmp:
        if suffix in IMAGE_SUFFIXES:
            _write_picture(tmp, frames)
        elif suffix in SITK_SUFFIXES:
            _write_sitk(tmp, frames, like)
        else:
            _write_dicom(tmp, frames, like, derivation)
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
    frame = frames[0]
    if frame.dtype == np.uint16 and suffix_of(path) in (".png", ".tif", ".tiff"):
        Image.fromarray(frame).save(path)        # 16-bit grey stays 16-bit
    else:
        Image.fromarray(to_uint8(frame)).save(path)


def _write_sitk(path: Path, frames: np.ndarray, like: ImageData) -> None:
    import SimpleITK as sitk

    arr = frames[0] if like.is_2d else frames
    out = sitk.GetImageFromArray(arr)
    src = like.source
    compress = True
    if isinstance(src, sitk.Image):
        out.CopyInformation(src) if src.GetNumberOfComponentsPerPixel() == 1 else _copy_geometry(out, src)
        header = _header_text(like.path)
        for key in src.GetMetaDataKeys():   # PLUS sequence fields, transforms, timestamps
            if key in READER_ADDED_KEYS and key not in header:
                continue                    # made up by ITK's reader; the input file has no such field
            out.SetMetaData(key, src.GetMetaData(key))
        if suffix_of(path) in (".mha", ".mhd") and suffix_of(Path(like.path)) in (".mha", ".mhd"):
            compress = "compresseddata = true" in header.lower()
        elif suffix_of(path) in (".nrrd", ".nhdr") and suffix_of(Path(like.path)) in (".nrrd", ".nhdr"):
            compress = "gzip" in header.lower()
    else:
        out.SetSpacing(like.spacing[: out.GetDimension()])
    sitk.WriteImage(out, str(path), useCompression=compress)


#: Metadata that SimpleITK's readers add to every image although the file has no such field.
READER_ADDED_KEYS = ("ITK_InputFilterName", "ITK_original_direction", "ITK_original_spacing", "Modality",
                     "ITK_FileNotes")


def _header_text(path, limit: int = 1 << 20) -> str:
    """The text header of a MetaImage/NRRD file (up to its data), '' for binary formats."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except (OSError, TypeError):
        return ""
    for marker in (b"ElementDataFile", b"\n\n"):
        at = head.find(marker)
        if at >= 0:
            end = head.find(b"\n", at + 1) if marker == b"ElementDataFile" else at
            head = head[: end if end >= 0 else len(head)]
            break
    return head.decode("latin-1") if suffix_of(Path(path)) in (".mha", ".mhd", ".nrrd", ".nhdr") else ""


def _copy_geometry(out, src) -> None:
    out.SetSpacing(src.GetSpacing())
    out.SetOrigin(src.GetOrigin())
    out.SetDirection(src.GetDirection())


def _write_dicom(path: Path, frames: np.ndarray, like: ImageData, derivation: Optional[dict] = None) -> None:
    """A derived grey DICOM: the input's patient/study/geometry tags, new pixels and UIDs."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if not isinstance(like.source, pydicom.Dataset):
        raise ValueError(f"{path}: DICOM output needs a DICOM input; write .png or .mha instead")
    ds = copy.deepcopy(like.source)
    pixels = frames if frames.dtype in (np.uint8, np.uint16, np.int8, np.int16) else to_uint8(frames)
    if pixels is not frames:
        # The pixels were stretched to 0..255: the input's modality and display mappings no
        # longer describe them (an image with RescaleIntercept -1024 would display black).
        for tag in ("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
                    "VOILUTSequence", "ModalityLUTSequence", "VOILUTFunction"):
            if tag in ds:
                delattr(ds, tag)
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
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if pixels.shape[0] > 1:
        ds.NumberOfFrames = pixels.shape[0]
    ds.PixelData = (pixels if pixels.shape[0] > 1 else pixels[0]).tobytes()
    _derived_identity(ds, like.source, derivation, generate_uid)
    ds.save_as(str(path), enforce_file_format=True)


def _derived_identity(ds, source, derivation: Optional[dict], generate_uid) -> None:
    """ImageType DERIVED, descriptions naming the model and new UIDs for a derived DICOM.

    With ``derivation`` ({"key", "model", "description"}, engine.archive.derivation_for) the new
    UIDs are derived from the input's UIDs and the key (model checksum + output options): the
    outputs of one input series share one new SeriesInstanceUID, and any worker, or a rerun,
    gives the same file the same SOPInstanceUID. Without it they are random."""
    import re

    given = source.get("ImageType") or []
    kept = [str(v) for v in ([given] if isinstance(given, str) else list(given))[2:]]
    if not all(re.fullmatch(r"[A-Z0-9 _]{0,16}", v) for v in kept):
        kept = []       # the input's own values 3+ are not valid code strings: not copied
    ds.ImageType = ["DERIVED", "SECONDARY"] + kept
    model = f" ({derivation['model']})" if derivation and derivation.get("model") else ""
    ds.SeriesDescription = (str(source.get("SeriesDescription", "")) + " despeckled" + model).strip()[:64]
    if derivation:
        ds.DerivationDescription = str(derivation.get("description") or "Despeckled by Speckle2Self")[:1024]
        key = str(derivation["key"])
        series = str(source.get("SeriesInstanceUID", "")) or str(source.get("SOPInstanceUID", ""))
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", series, key])
        sop = str(source.get("SOPInstanceUID", "")) or series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["sop", sop, key])
    else:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()


def has_pixel_spacing(data) -> bool:
    """Whether read frames carry a physical pixel spacing: pictures never, DICOM only with
    PixelSpacing, ITK formats always (measurements are then in mm, else in pixels)."""
    if data.source is None:
        return False
    return data.kind != "dicom" or "PixelSpacing" in data.source
