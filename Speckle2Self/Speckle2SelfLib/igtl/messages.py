"""OpenIGTLink IMAGE messages: unpacked to frames, despeckled frames packed like the message they came from.

Messages are encoded and decoded by ``pyigtl`` (imported lazily); the sockets are
:mod:`.relay`'s.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

#: Appended to the device name of despeckled images. OpenIGTLink device names hold at most 20
#: bytes: "Image_Reference" + "_S2S" fits; longer names are shortened to keep the suffix.
DEFAULT_SUFFIX = "_S2S"
DEVICE_NAME_BYTES = 20
HEADER_SIZE = 58                     # OpenIGTLink header: version, type, device, timestamp, size, CRC
TIMESTAMP_BYTES = slice(34, 42)      # the header's 64-bit timestamp (seconds, fraction)


def _require_pyigtl():
    try:
        import pyigtl
    except ImportError as err:
        raise RuntimeError("live streaming needs pyigtl: pip install pyigtl "
                           "(or pip install -e '.[stream]')") from err
    return pyigtl


def output_device_name(device_name: str, suffix: str = DEFAULT_SUFFIX) -> str:
    """``device_name + suffix``, the name shortened so that the result fits OpenIGTLink's 20 bytes."""
    if len(suffix.encode("utf8")) >= DEVICE_NAME_BYTES:
        raise ValueError(f"suffix {suffix!r} is too long: OpenIGTLink device names hold {DEVICE_NAME_BYTES} bytes")
    base = device_name
    while len((base + suffix).encode("utf8")) > DEVICE_NAME_BYTES:
        base = base[:-1]
    return base + suffix


def image_frames(message) -> np.ndarray:
    """The (K, J, I) grey voxels of an IMAGE message (RGB(A) -> luminance in the same dtype)."""
    from ..fileio.imageio import luminance_like

    image = np.asarray(message.image)
    if image.ndim == 4:
        if image.shape[3] == 1:
            image = image[..., 0]
        elif image.shape[3] in (3, 4):
            image = luminance_like(image)
        else:
            raise ValueError(f"IMAGE '{message.device_name}' has {image.shape[3]}-component voxels; only grey "
                             "or RGB(A) images can be despeckled")
    if image.ndim != 3:
        raise ValueError(f"IMAGE '{message.device_name}' has shape {image.shape}; expected (K, J, I) voxels")
    native = image.dtype.newbyteorder("=")
    return np.ascontiguousarray(image, dtype=native)


def despeckled_message(message, output: np.ndarray, suffix: str = DEFAULT_SUFFIX,
                       raw_timestamp: Optional[bytes] = None) -> bytes:
    """Pack ``output`` (K, J, I) as an IMAGE message like ``message``: device name suffixed, same
    IJK-to-world matrix, coordinate system, header version, metadata and timestamp (bit for bit
    when ``raw_timestamp``, the 8 timestamp bytes of the received header, is given)."""
    pyigtl = _require_pyigtl()

    reply = pyigtl.ImageMessage(np.ascontiguousarray(output), ijk_to_world_matrix=message.ijk_to_world_matrix,
                                world_coordinate_system=message.world_coordinate_system,
                                timestamp=message.timestamp,
                                device_name=output_device_name(message.device_name, suffix))
    reply.header_version = message.header_version
    reply.message_id = message.message_id
    reply.metadata = dict(message.metadata)
    data = reply.pack()
    if raw_timestamp is not None:
        if len(raw_timestamp) != TIMESTAMP_BYTES.stop - TIMESTAMP_BYTES.start:
            raise ValueError("raw_timestamp must be the header's 8 timestamp bytes")
        data = data[:TIMESTAMP_BYTES.start] + raw_timestamp + data[TIMESTAMP_BYTES.stop:]
    return data


def parse_address(text: str, default_host: str = "127.0.0.1") -> Tuple[str, int]:
    """'PORT' or 'HOST:PORT' -> (host, port); port 0 means any free port (listening only)."""
    text = str(text).strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad address {text!r}: expected PORT or HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"bad port {number} in {text!r}: ports are 0..65535")
    return host, number


__all__ = ["DEFAULT_SUFFIX", "despeckled_message", "image_frames", "output_device_name", "parse_address"]
