"""File formats by name: the extensions this library reads and writes, and DICOM files without one.

Both :mod:`.imageio` (reading and writing) and :mod:`.safeio` (checking output paths) need
these tables; they live here so that neither module has to import the other for them.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
READABLE_SUFFIXES = IMAGE_SUFFIXES + SITK_SUFFIXES + DICOM_SUFFIXES
WRITABLE_SUFFIXES = IMAGE_SUFFIXES + SITK_SUFFIXES + DICOM_SUFFIXES

#: PIL's format names -> the extensions a file of that format may carry.
PIL_FORMATS = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".jpeg"), "TIFF": (".tif", ".tiff"),
               "BMP": (".bmp",)}
#: The ITK ImageIO that must read each volume extension.
SITK_IO = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO",
           ".nii": "NiftiImageIO", ".nii.gz": "NiftiImageIO"}


def suffix_of(path: Path) -> str:
    """The lower-case extension, ``.nii.gz`` counted as one."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_readable(path: Path) -> bool:
    """Whether the file is something :func:`~.imageio.read_frames` reads: by its extension, or a
    DICOM file by its preamble (DICOM exports often name files IM0001 or by UID, without .dcm)."""
    return path.is_file() and (suffix_of(path) in READABLE_SUFFIXES or is_unnamed_dicom(path))


def is_unnamed_dicom(path: Path) -> bool:
    """A DICOM image file whose name has no DICOM extension (DICOMDIR, an index, is not one)."""
    if suffix_of(path) in READABLE_SUFFIXES or path.name.upper() == "DICOMDIR":
        return False
    try:
        with open(path, "rb") as fh:
            return has_dicom_preamble(fh.read(132))
    except OSError:
        return False


def has_dicom_preamble(head: bytes) -> bool:
    """The first 132 bytes of a DICOM Part 10 file: a 128-byte preamble, then 'DICM'."""
    return len(head) == 132 and head[128:132] == b"DICM"
