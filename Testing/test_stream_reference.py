"""The live relay against the reference OpenIGTLink implementation (the C++ library PLUS and Slicer use).

ImagerClient and ReceiveServer, example programs of the OpenIGTLink library (Debian:
openigtlink-examples + libopenigtlink-dev), are built from their sources once per session into a
pytest temporary folder. ImagerClient sends its 100 IMAGE frames (256 x 256 uint8) at 10 frames/s
to ``speckle2self stream`` (bundled default model, default settings, --device cpu), which sends
the despeckled images on to ReceiveServer; ReceiveServer unpacks each with the library's own
parser and CRC check and prints what it got. All traffic stays on loopback (ReceiveServer binds
every interface: the library's server offers no choice); every wait is bounded and every process
is killed at the end (benchlib.igtl_reference). Without the packages or a C++ compiler
the test skips and says which is missing (scripts/setup_env.sh installs them as root).
"""

from __future__ import annotations

import json

import pytest

from benchlib import igtl_reference as ref

FPS = 10.0
OUTPUT_NAME = "ImagerClient_S2S"          # ImagerClient's device name + the relay's default suffix
HEADER = 58                               # OpenIGTLink message header (bytes)
IMAGE_HEADER = 72                         # IMAGE body: this header, then the voxels


@pytest.fixture(scope="session")
def reference_programs(tmp_path_factory):
    reason = ref.missing_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("pyigtl", reason="the relay needs pyigtl (pip install -e '.[test]')")
    try:
        return ref.build(tmp_path_factory.mktemp("openigtlink-reference"))
    except ref.BuildError as err:
        pytest.fail(f"the OpenIGTLink examples are installed but do not build: {err}")


def test_reference_client_to_relay_to_reference_server_at_10_fps(reference_programs):
    """100 frames in at 10 frames/s, 100 despeckled out, none dropped (the relay's own statistics),
    each one parsed by the reference library under the relay's output name."""
    result = ref.run_relay_scenario(reference_programs, fps=FPS)
    n = ref.FRAMES_PER_RUN
    what = result.describe()

    # ImagerClient really streamed at about 10 frames/s
    assert result.client_frames == n, what
    assert 8.0 <= result.in_fps <= 10.5, what

    # the relay stopped by itself after --max-frames, everything accounted for, nothing dropped
    assert result.relay_rc == 0, what
    stats = result.relay
    assert stats["received"] == n, what
    assert stats["dropped"] == 0, what
    assert stats["failed"] == 0 and stats["unsent"] == 0 and stats["ignored"] == 0, what
    assert stats["despeckled"] == n and stats["sent"] == n, what

    # ReceiveServer parsed every one with the library's parser, CRC checked, under the output name,
    # with the input's geometry and voxel type (uint8 = OpenIGTLink scalar type 3)
    assert result.images_announced == n, what
    assert result.images_ok == n, what
    assert result.device_names == {OUTPUT_NAME: n}, what
    assert result.dimensions == {"(256, 256, 1)": n}, what
    assert result.spacings == {"(1, 1, 5)": n}, what
    assert result.scalar_types == {"3": n}, what


def test_relay_keeps_the_reference_clients_image_header_bit_for_bit(reference_programs):
    """Byte level: ImagerClient's messages as the reference library packs them (captured raw once),
    against what the relay sends for them. The IMAGE header (dimensions, the IJK-to-world
    matrix with ImagerClient's flipped J axis, 1 x 1 x 5 mm spacing, sub-volume) and the message
    header (version, type, timestamp) must come out as they went in, the device name suffixed and
    the voxels despeckled. Only the endian flag may differ: the relay packs little-endian, which
    OpenIGTLink allows and which is moot for uint8 voxels."""
    tools = reference_programs
    n = ref.FRAMES_PER_RUN
    fast = 1000                                 # frames/s: ImagerClient sends its 100 frames in ~0.2 s

    capture = ref.Capture()
    client = ref.run_imager_client(tools, capture.port, fast)
    sent = capture.join(10.0)
    assert client.returncode == 0 and len(sent) == n, client.stderr[-500:]

    capture = ref.Capture()
    relay, out, err, port = ref.start_relay(capture.port, max_seconds=40.0)
    try:
        client = ref.run_imager_client(tools, port, fast)
        assert relay.wait(15.0) == 0, err.text()[-10:]
    finally:
        ref.stop_process(relay)
    relayed = capture.join(10.0)
    stats = json.loads(out.wait_for(lambda line: line.startswith("{"), 1.0))
    assert stats["received"] == n and stats["failed"] == 0 and stats["unsent"] == 0, stats
    assert stats["despeckled"] == stats["sent"] == len(relayed) >= 1, (stats, len(relayed))   # most are dropped

    inputs = {message[HEADER + IMAGE_HEADER:] for message in sent}      # ImagerClient's 5 test images
    assert len(inputs) == 5
    first = sent[0]
    for message in relayed:
        assert message[0:14] == first[0:14]                              # version, type "IMAGE"
        assert message[14:34].rstrip(b"\0") == OUTPUT_NAME.encode()
        assert message[34:50] == first[34:50]                            # timestamp, body size
        assert message[HEADER:HEADER + 4] == first[HEADER:HEADER + 4]    # image header version, components, type
        assert message[HEADER + 4] in (1, 2)                             # endian: big or little
        assert message[HEADER + 5:HEADER + IMAGE_HEADER] == first[HEADER + 5:HEADER + IMAGE_HEADER]
        assert message[HEADER + IMAGE_HEADER:] not in inputs             # despeckled, not passed through
