"""OpenIGTLink transport: the live relay (``speckle2self stream``) and its IMAGE messages.

* :mod:`.relay` -- :class:`~.relay.StreamRelay`: IMAGE in on one socket, despeckled IMAGE out on
  another (the engine's latest-frame-wins :class:`~Speckle2SelfLib.engine.latest_frame.StreamDespeckler`
  in between), other messages forwarded unchanged;
* :mod:`.messages` -- IMAGE messages to frames and back (``pyigtl``), device names, addresses.

pyigtl (``pip install -e '.[stream]'``) and torch are imported lazily.
"""

from .messages import DEFAULT_SUFFIX, despeckled_message, image_frames, output_device_name, parse_address
from .relay import DEFAULT_LISTEN_PORT, DEFAULT_SEND_PORT, RelayStats, StreamRelay

__all__ = ["StreamRelay", "RelayStats", "DEFAULT_LISTEN_PORT", "DEFAULT_SEND_PORT", "DEFAULT_SUFFIX",
           "despeckled_message", "image_frames", "output_device_name", "parse_address"]
