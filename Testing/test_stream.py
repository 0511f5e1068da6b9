"""Live despeckling: latest-frame-wins worker (engine.latest_frame), OpenIGTLink relay (igtl), live volume node.

The relay test runs ``speckle2self stream`` (cli.main) on loopback (127.0.0.1) only: a pyigtl
client replays frames of a real PLUS sequence from ../shared (simulated frames when it is
absent), the relay despeckles them, a pyigtl server receives the result. Every socket has a
timeout, every loop a bound in count and time, and the relay stops by itself (--max-frames,
with --max-seconds as a backstop).
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import numpy as np
import pytest

from conftest import SHARED, simulated_frames
from Speckle2SelfLib.engine.inference import Despeckler
from Speckle2SelfLib.engine.latest_frame import StreamDespeckler
from Speckle2SelfLib.igtl.messages import despeckled_message, image_frames, output_device_name, parse_address

LOOPBACK = "127.0.0.1"
PLUS_SEQUENCE = SHARED / "sequences" / "SpinePhantomFreehand.igs.mha"
N_FRAMES = 6
SEND_INTERVAL = 0.05         # s between frames (20 frames/s)
RELAY_SECONDS = 40.0         # the relay's --max-seconds backstop; it normally stops after --max-frames in ~1 s
# IJK -> LPS: spacing 0.2 / 0.3 / 1.0 mm, i -> -y, j -> +x, origin (10, -20, 5)
MATRIX = np.array([[0.0, 0.3, 0.0, 10.0],
                   [-0.2, 0.0, 0.0, -20.0],
                   [0.0, 0.0, 1.0, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def fast(untrained_model):
    return Despeckler.from_file(untrained_model, device="cpu")


def stream_frames(n: int = N_FRAMES):
    """uint8 (n, H, W) frames: a real PLUS sequence when ../shared is present, else simulated."""
    if PLUS_SEQUENCE.is_file():
        from Speckle2SelfLib.fileio.imageio import read_frames

        return read_frames(PLUS_SEQUENCE).frames[:n], "real PLUS sequence"
    noisy, _clean = simulated_frames(n=n, size=128)
    return np.round(np.asarray(noisy) * 255).astype(np.uint8), "simulated (../shared absent)"


# ----------------------------------------------------------------------------- StreamDespeckler

class GatedDenoiser:
    """Stands in for a slow model: each call waits for the gate, records its input, adds 1."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = threading.Event()
        self.inputs = []

    def __call__(self, frames):
        self.started.set()
        assert self.gate.wait(10), "gate never opened"
        self.inputs.append(int(frames[0, 0]))
        return frames + 1


def constant(value: int) -> np.ndarray:
    return np.full((8, 8), value, dtype=np.int32)


def test_latest_frame_wins_and_dropped_frames_are_counted():
    slow = GatedDenoiser()
    outputs = []
    stream = StreamDespeckler(slow, on_output=lambda r: outputs.append((r.key, int(r.output[0, 0]), r.meta)))
    with stream:
        assert stream.submit(constant(1), meta="first")
        assert slow.started.wait(10)                  # frame 1 is in work; 2..5 arrive meanwhile
        for value in (2, 3, 4, 5):
            assert stream.submit(constant(value), meta=f"frame {value}")
        mid = stream.stats
        assert (mid.received, mid.dropped, mid.pending) == (5, 3, 1)   # one pending frame, never a queue
        slow.gate.set()
        assert stream.wait_idle(10)
        assert slow.inputs == [1, 5]                  # the newest frame, not the oldest queued one
        assert outputs == [("", 2, "first"), ("", 6, "frame 5")]
        assert int(stream.latest().output[0, 0]) == 6 and stream.latest("other") is None
        stats = stream.stats
        assert (stats.received, stats.processed, stats.dropped, stats.failed, stats.pending) == (5, 2, 3, 0, 0)
        assert stats.latency_ms_median is not None and stats.latency_ms_p95 >= stats.latency_ms_median
    assert not stream.running


def test_streams_take_turns_and_their_number_is_bounded():
    slow = GatedDenoiser()
    stream = StreamDespeckler(slow, max_streams=2).start()
    try:
        assert stream.submit(constant(10), key="a")
        assert slow.started.wait(10)
        assert stream.submit(constant(20), key="b")
        assert stream.submit(constant(11), key="a")
        assert not stream.submit(constant(30), key="c")   # a third stream while two are pending: refused
        assert stream.submit(constant(21), key="b")       # replaces b's pending frame, keeps b's turn
        slow.gate.set()
        assert stream.wait_idle(10)
        assert slow.inputs == [10, 21, 11]
        assert int(stream.latest("a").output[0, 0]) == 12 and int(stream.latest("b").output[0, 0]) == 22
        assert stream.stats.dropped == 2 and stream.stats.processed == 3
    finally:
        slow.gate.set()
        assert stream.stop(10)


def test_a_failing_frame_is_counted_and_the_stream_goes_on(fast):
    errors = []
    stream = StreamDespeckler(fast, on_error=lambda key, meta, err: errors.append((key, meta, type(err))))
    stream.submit(np.zeros((4, 4), np.uint8), meta="too small")    # the engine refuses frames under 8 px
    ramp = (np.arange(16 * 16) % 200).astype(np.uint8).reshape(16, 16)
    stream.submit(ramp, meta="ramp")                               # replaces it before any worker ran
    assert stream.process_pending() == 1
    assert stream.stats.dropped == 1 and stream.latest().meta == "ramp"
    stream.submit(np.zeros((4, 4), np.uint8), meta="too small")
    assert stream.process_pending() == 1
    good = (np.arange(32 * 32) % 251).astype(np.uint8).reshape(32, 32)
    stream.submit(good)
    assert stream.process_pending() == 1
    np.testing.assert_array_equal(stream.latest().output, fast.denoise(good))
    stats = stream.stats
    assert (stats.received, stats.processed, stats.dropped, stats.failed) == (4, 2, 1, 1)
    assert errors == [("", "too small", ValueError)]


# ----------------------------------------------------------------------------- message helpers

def test_device_names_fit_openigtlink_and_addresses_parse():
    assert output_device_name("Image_Reference") == "Image_Reference_S2S"
    long_name = output_device_name("A_very_long_image_device")
    assert long_name.endswith("_S2S") and len(long_name.encode()) == 20
    with pytest.raises(ValueError, match="too long"):
        output_device_name("US", "_a_suffix_of_20bytes")
    assert parse_address("18945") == (LOOPBACK, 18945)
    assert parse_address("127.0.0.1:0") == (LOOPBACK, 0)
    for bad in ("host:port", "70000", "localhost:"):
        with pytest.raises(ValueError, match="bad"):
            parse_address(bad)


def test_despeckled_message_keeps_matrix_timestamp_and_header(fast):
    pyigtl = pytest.importorskip("pyigtl", reason="pyigtl is not installed (pip install -e '.[stream]')")
    frame = (np.arange(24 * 40) % 200).astype(np.uint16).reshape(1, 24, 40)
    sent = pyigtl.ImageMessage(frame, ijk_to_world_matrix=MATRIX, timestamp=1700000000.123456789,
                               device_name="Image_Reference")
    sent.header_version = 2
    sent.metadata = {"Probe": "L14"}
    packed = sent.pack()
    header = pyigtl.MessageBase.parse_header(packed[:58])
    received = pyigtl.ImageMessage()
    received.unpack(header, packed[58:])
    received.image = received.image.astype(">u2")     # as a big-endian sender would deliver them
    frames = image_frames(received)
    assert frames.dtype == np.uint16 and frames.dtype.isnative and frames.shape == (1, 24, 40)
    data = despeckled_message(received, fast.denoise(frames), raw_timestamp=packed[34:42])
    assert data[34:42] == packed[34:42]
    reply_header = pyigtl.MessageBase.parse_header(data[:58])
    reply = pyigtl.ImageMessage()
    reply.unpack(reply_header, data[58:])
    assert reply.device_name == "Image_Reference_S2S" and reply.timestamp == received.timestamp
    assert reply.header_version == 2 and reply.metadata == {"Probe": "L14"}
    np.testing.assert_allclose(reply.ijk_to_world_matrix, received.ijk_to_world_matrix, rtol=0, atol=1e-6)
    np.testing.assert_allclose(reply.ijk_to_world_matrix, MATRIX, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(reply.image, fast.denoise(frame))


# ----------------------------------------------------------------------------- the relay on loopback

def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def _collect(server, images: dict, others: dict) -> None:
    for message in server.get_latest_messages():
        if message.message_type == "IMAGE":
            images.setdefault(message.timestamp, []).append(message)
        else:
            others[message.device_name] = message


def test_relay_on_loopback_matches_offline_despeckling(untrained_model, fast, capsys):
    """``speckle2self stream`` (run through cli.main, in this process) between a pyigtl sender
    and a pyigtl receiver; it must stop by itself after --max-frames."""
    pyigtl = pytest.importorskip("pyigtl", reason="pyigtl is not installed (pip install -e '.[stream]')")
    from Speckle2SelfLib import cli

    frames, source = stream_frames()
    frames = frames[:, 40:296, 250:570] if frames.shape[1:] == (616, 820) else frames   # PLUS: the echo region
    n = len(frames)
    outgoing = [pyigtl.ImageMessage(frames[i][None], ijk_to_world_matrix=MATRIX, timestamp=1700000000 + 0.05 * i,
                                    device_name="Image_Reference") for i in range(n)]
    # What a receiver decodes from each sent message: the relay must keep exactly this.
    expected_ts = {pyigtl.MessageBase.parse_header(m.pack()[:58])["timestamp"]: i for i, m in enumerate(outgoing)}
    assert len(expected_ts) == n
    tracking = pyigtl.TransformMessage(np.diag([1.0, 2.0, 3.0, 1.0]), device_name="ProbeToTracker")

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    receiver = pyigtl.OpenIGTLinkServer(port=0, local_server=True)      # binds 127.0.0.1, any free port
    images, others, problems = {}, {}, []
    relay_done = threading.Event()
    listen_port = _free_loopback_port()
    deadline = time.monotonic() + RELAY_SECONDS + 10

    def replay():
        """The scanner side: connect, send a transform and the frames at a fixed rate, keep receiving."""
        sender = pyigtl.OpenIGTLinkClient(host=LOOPBACK, port=listen_port)
        try:
            while not sender.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not sender.is_connected():
                problems.append("the pyigtl sender could not connect to the relay")
                return
            sender.send_message(tracking, wait=False)
            for message in outgoing:
                sender.send_message(message, wait=False)
                step_end = time.monotonic() + SEND_INTERVAL
                while time.monotonic() < step_end:
                    _collect(receiver, images, others)
                    time.sleep(0.002)
            while not relay_done.is_set() and time.monotonic() < deadline:
                _collect(receiver, images, others)
                time.sleep(0.002)
        except Exception as err:  # reported by the test thread
            problems.append(repr(err))
        finally:
            sender.stop()

    thread = threading.Thread(target=replay, daemon=True)
    try:
        thread.start()
        started = time.monotonic()
        rc = cli.main(["stream", "--listen", f"{LOOPBACK}:{listen_port}",
                       "--send", f"{LOOPBACK}:{receiver.server_address[1]}", "--model", str(untrained_model),
                       "--device", "cpu", "--max-frames", str(n), "--max-seconds", str(RELAY_SECONDS),
                       "--json", "--quiet"])
        elapsed = time.monotonic() - started
        relay_done.set()
        thread.join(10)
        assert not thread.is_alive() and not problems, problems
        settle = time.monotonic() + 1.0       # the relay's last message left before it returned
        while time.monotonic() < settle and (n - 1) not in {expected_ts.get(t) for t in images}:
            _collect(receiver, images, others)
            time.sleep(0.005)
        _collect(receiver, images, others)
    finally:
        relay_done.set()
        receiver.stop()
        for sig, handler in handlers.items():         # pyigtl's server replaced them
            signal.signal(sig, handler)

    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[0].startswith(f"listening on {LOOPBACK}:{listen_port}, sending to ")
    stats = json.loads(out[-1])
    assert elapsed < RELAY_SECONDS, "the relay stopped on its time limit, not after --max-frames"
    assert stats["received"] == n and stats["failed"] == 0 and stats["ignored"] == 0
    assert stats["despeckled"] + stats["dropped"] == n and stats["sent"] == stats["despeckled"] >= 1
    assert stats["forwarded"] == 1 and stats["unsent"] == 0 and stats["latency_ms_median"] > 0

    assert others["ProbeToTracker"].message_type == "TRANSFORM"
    np.testing.assert_allclose(others["ProbeToTracker"].matrix, tracking.matrix)
    assert set(images) <= set(expected_ts), "a timestamp was not kept"
    received = {expected_ts[t]: msgs for t, msgs in images.items()}
    assert n - 1 in received, f"the last frame must always come through (got {sorted(received)})"
    assert 1 <= sum(len(m) for m in received.values()) <= stats["sent"]
    for index, messages in received.items():
        assert len(messages) == 1, f"frame {index} was sent twice"
        reply = messages[0]
        assert reply.device_name == "Image_Reference_S2S"
        assert reply.image.shape == (1,) + frames.shape[1:] and reply.image.dtype == frames.dtype
        np.testing.assert_allclose(reply.ijk_to_world_matrix, MATRIX, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(reply.image[0], fast.denoise(frames[index]),
                                      err_msg=f"frame {index} of the {source} differs from offline despeckling")


def test_relay_connects_to_a_server_source_and_stops_by_itself():
    """--connect: the relay is the client of the image source (as with PlusServer). Any callable
    can stand in for the model; here it inverts the grey levels (in the frame's own dtype)."""
    pyigtl = pytest.importorskip("pyigtl", reason="pyigtl is not installed (pip install -e '.[stream]')")
    from Speckle2SelfLib.igtl.relay import StreamRelay

    frames = (np.arange(3 * 32 * 48) % 256).astype(np.uint8).reshape(3, 32, 48)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    source = pyigtl.OpenIGTLinkServer(port=0, local_server=True)       # PlusServer-like: waits for clients
    receiver = pyigtl.OpenIGTLinkServer(port=0, local_server=True)
    images, others = {}, {}
    try:
        source.send_message(pyigtl.TransformMessage(np.eye(4), device_name="ProbeToTracker"), wait=False)
        for i, frame in enumerate(frames):     # queued until the relay connects, then sent in one burst
            source.send_message(pyigtl.ImageMessage(frame[None], ijk_to_world_matrix=MATRIX, timestamp=1000 + i,
                                                    device_name="US"), wait=False)
        relay = StreamRelay(lambda x: 255 - x, send=(LOOPBACK, receiver.server_address[1]), max_frames=len(frames),
                            max_seconds=20, receive_from=(LOOPBACK, source.server_address[1]))
        stats = relay.run()                    # returns after the third frame, not after 20 s
        end = time.monotonic() + 2
        while time.monotonic() < end and 1002.0 not in images:
            _collect(receiver, images, others)
            time.sleep(0.005)
    finally:
        source.stop()
        receiver.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert stats.seconds < 15 and stats.received == 3 and stats.despeckled + stats.dropped == 3
    assert stats.sent == stats.despeckled and stats.forwarded == 1 and stats.failed == 0
    assert 1002.0 in images and set(images) <= {1000.0, 1001.0, 1002.0}
    for stamp, (reply,) in images.items():
        assert reply.device_name == "US_S2S"
        np.testing.assert_array_equal(reply.image[0], 255 - frames[int(stamp) - 1000])
        np.testing.assert_allclose(reply.ijk_to_world_matrix, MATRIX, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- Slicer: live volume node

def _set_voxels(volume, voxels):
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    image.SetDimensions(voxels.shape[2], voxels.shape[1], voxels.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(voxels).reshape(-1, 1),
                                                               deep=True))
    volume.SetAndObserveImageData(image)


@pytest.mark.parametrize("threaded", [True, False])
def test_live_volume_node_updates_the_output(scene, fast, threaded):
    slicer = pytest.importorskip("slicer")
    from vtk.util import numpy_support

    from Speckle2SelfLib.scene.live import LiveVolumeDespeckler

    frames, _source = stream_frames(3)
    frames = frames[:, :160, :200]                    # a crop keeps the test quick
    live_input = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Reference")
    _set_voxels(live_input, frames[0][None])
    live_input.SetSpacing(0.2, 0.3, 1.0)
    live_input.SetOrigin(10.0, -20.0, 5.0)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToReference")
    live_input.SetAndObserveTransformNodeID(transform.GetID())
    live = LiveVolumeDespeckler(fast, live_input, threaded=threaded)

    def wait_apply() -> bool:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if live.apply():
                return True
            time.sleep(0.005)
        return False

    try:
        assert live.capture()
        assert not live.capture(), "an unchanged input must not be despeckled again"
        assert wait_apply()
        output = live.output_node
        assert output.GetName() == "Image_Reference despeckled" and output.GetScene() is scene
        voxels = numpy_support.vtk_to_numpy(output.GetImageData().GetPointData().GetScalars())
        np.testing.assert_array_equal(voxels.reshape(frames[0].shape), fast.denoise(frames[0]))
        assert output.GetSpacing() == live_input.GetSpacing() and output.GetOrigin() == live_input.GetOrigin()
        assert output.GetTransformNodeID() == transform.GetID()
        first_image = output.GetImageData()

        events = []
        output.AddObserver(slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent, lambda *_: events.append(1))
        _set_voxels(live_input, frames[1][None])      # a new frame arrives (as OpenIGTLinkIF writes it)
        live_input.SetOrigin(11.0, -20.0, 5.0)
        assert live.capture() and wait_apply()
        assert output.GetImageData() is first_image and events, "updated in place, with an event"
        voxels = numpy_support.vtk_to_numpy(output.GetImageData().GetPointData().GetScalars())
        np.testing.assert_array_equal(voxels.reshape(frames[1].shape), fast.denoise(frames[1]))
        assert output.GetOrigin() == (11.0, -20.0, 5.0)
        assert not live.apply(), "nothing new to write"
        assert live.updates == 2 and live.stats.failed == 0
    finally:
        live.stop()
    with pytest.raises(ValueError, match="must not be the input"):
        LiveVolumeDespeckler(fast, live_input, live_input)


def test_stream_refinement_follows_the_model_unless_turned_off_and_bad_values_are_refused_first():
    from Speckle2SelfLib.engine.latest_frame import _stream_denoiser

    default = Despeckler.from_file(None, device="cpu", backend="fp32")        # recommends the guided refinement
    frame = np.rint(simulated_frames(n=1, size=64, seed=9)[0][0] * 255).astype(np.uint8)
    np.testing.assert_array_equal(_stream_denoiser(default)(frame), default.denoise(frame, refine="guided"))
    np.testing.assert_array_equal(_stream_denoiser(default, "none")(frame), default.denoise(frame, refine="none"))
    assert not np.array_equal(default.denoise(frame, refine="guided"), default.denoise(frame, refine="none"))
    with pytest.raises(ValueError, match="refine must be one of auto, guided, none"):
        StreamDespeckler(default, refine="sharp")


def test_connect_to_a_server_that_never_answers_says_so_and_fails(untrained_model, capsys):
    from Speckle2SelfLib import cli

    closed = socket.socket()
    closed.bind((LOOPBACK, 0))
    port = closed.getsockname()[1]
    closed.close()                       # nothing listens there now: connections are refused
    rc = cli.main(["stream", "--connect", f"{LOOPBACK}:{port}", "--send", f"{LOOPBACK}:{port}",
                   "--model", str(untrained_model), "--device", "cpu", "--max-seconds", "1"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"waiting for {LOOPBACK}:{port} to accept a connection" in err       # said while it runs, once
    assert err.count("is the OpenIGTLink server") == 1
    assert f"error: never connected to {LOOPBACK}:{port}" in err                  # and at the end
    # listening and connecting for the input at once is a contradiction, refused by the parser
    assert cli.main(["stream", "--listen", "0", "--connect", f"{LOOPBACK}:{port}"]) == 2
