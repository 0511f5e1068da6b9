"""Live despeckling: frames as they arrive, the latest output kept, frames dropped rather than queued.

Two layers, each usable on its own:

* :class:`StreamDespeckler` -- a worker thread that despeckles submitted frames. Each stream
  (key, e.g. an OpenIGTLink device name) holds at most one pending frame: a frame that arrives
  while the previous one still waits replaces it and is counted as dropped. Memory stays bounded
  (per stream: one pending frame, one in work, the latest result) however slow inference is.
* :class:`StreamRelay` -- an OpenIGTLink relay (``speckle2self stream``, :mod:`.cli.stream`):
  receives IMAGE messages on a listening socket, sends despeckled IMAGE messages to another host
  with the device name suffixed, the same IJK-to-world matrix and the same timestamp (its raw 64
  bits). Other message types (TRANSFORM, ...) are forwarded unchanged, so tracking stays in step.
  Messages are encoded and decoded by ``pyigtl``; the sockets are handled here so that every
  incoming message is seen (and dropped frames are counted), no receive is polled with sleeps,
  and the relay runs in any thread (pyigtl's server hooks SIGINT/SIGTERM, main thread only).

The Slicer side (a live volume node despeckled into an output node, MRML on the main thread
only) is :class:`Speckle2SelfLib.scene.live.LiveVolumeDespeckler`.

torch and pyigtl are imported lazily.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import numpy as np

#: Appended to the device name of despeckled images. OpenIGTLink device names hold at most 20
#: bytes: "Image_Reference" + "_S2S" fits; longer names are shortened to keep the suffix.
DEFAULT_SUFFIX = "_S2S"
DEVICE_NAME_BYTES = 20
DEFAULT_LISTEN_PORT = 18945          # the relay listens here (the scanner / PLUS side connects)
DEFAULT_SEND_PORT = 18944            # 3D Slicer's OpenIGTLinkIF default server port
HEADER_SIZE = 58                     # OpenIGTLink header: version, type, device, timestamp, size, CRC
TIMESTAMP_BYTES = slice(34, 42)      # the header's 64-bit timestamp (seconds, fraction)
MAX_BODY_BYTES = 512 * 1024 * 1024   # larger bodies mean a broken stream (a 4K RGB volume is far less)
POLL_SECONDS = 0.2                   # socket timeout: how quickly threads notice a stop request
STALL_SECONDS = 5.0                  # a message body that stops arriving for this long drops the connection
CONNECT_TIMEOUT = 1.0
SEND_TIMEOUT = 5.0
DRAIN_SECONDS = 10.0                 # on stop: at most this long to finish the frame in work and send it
MAX_OUTBOX = 32                      # outgoing messages waiting for the socket (oldest dropped beyond)
LATENCY_WINDOW = 1000                # latencies kept for the statistics

LogFn = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


def _percentiles_ms(values) -> Tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return round(float(np.median(arr)), 2), round(float(np.percentile(arr, 95)), 2)


def warm_up(despeckler, runs: int = 3) -> None:
    """Run the model a few times on a small frame: TorchScript optimises its graph during the first
    calls (about 10x slower), which would otherwise hit the first live frames."""
    denoise = despeckler.denoise if hasattr(despeckler, "denoise") else despeckler
    frame = (np.add.outer(np.arange(64), np.arange(64)) % 256).astype(np.uint8)   # not constant: the net runs
    for _ in range(runs):
        denoise(frame)


# ----------------------------------------------------------------------------- latest-frame-wins despeckling


def _stream_denoiser(despeckler, refine: str = "auto") -> Callable[[np.ndarray], np.ndarray]:
    """``despeckler.denoise`` with the grain-matched working scale found once per frame size:
    one stream comes from one probe and setting, and matching the grain resamples each frame at
    13 candidate scales, work a live stream should not repeat for every frame. ``refine``: see
    :meth:`~Speckle2SelfLib.engine.inference.Despeckler.denoise` (the guided refinement about
    doubles a CPU frame's latency; "none" skips it)."""
    if not hasattr(despeckler, "resolve_working_scale"):
        return despeckler.denoise
    refine = despeckler.resolve_refine(refine)     # a bad value is refused before any frame
    scales: Dict[Tuple[int, ...], float] = {}

    def denoise(frames: np.ndarray) -> np.ndarray:
        key = tuple(np.shape(frames)[-2:])
        if key not in scales:
            scales[key] = despeckler.resolve_working_scale(np.asarray(frames), "auto")
        return despeckler.denoise(frames, working_scale=scales[key], refine=refine)

    return denoise


@dataclass
class StreamResult:
    """One despeckled frame (or stack) and what came with it."""

    key: str
    output: np.ndarray
    meta: Any
    index: int             # submission number (increasing over all streams)
    received: float        # time.monotonic() when submitted
    finished: float        # time.monotonic() when despeckled

    @property
    def seconds(self) -> float:
        return self.finished - self.received


@dataclass
class StreamStats:
    received: int          # frames submitted
    processed: int         # frames despeckled
    dropped: int           # frames replaced (or refused) before being despeckled
    failed: int            # frames the despeckler raised on
    pending: int
    latency_ms_median: Optional[float]   # submit -> despeckled
    latency_ms_p95: Optional[float]


@dataclass
class _Item:
    key: str
    frames: np.ndarray
    meta: Any
    index: int
    received: float


class StreamDespeckler:
    """Despeckle frames as they arrive; the latest frame of each stream wins.

    ``despeckler``: a :class:`~Speckle2SelfLib.engine.inference.Despeckler` or any callable taking and
    returning an array. ``on_output(result)`` and ``on_error(key, meta, error)`` run in the
    worker thread. Without :meth:`start`, call :meth:`process_pending` to work in the caller's
    thread. ``received == processed + dropped + failed + pending`` holds at any time.
    """

    def __init__(self, despeckler, on_output: Optional[Callable[[StreamResult], None]] = None, *,
                 on_error: Optional[Callable[[str, Any, BaseException], None]] = None, max_streams: int = 8,
                 refine: str = "auto"):
        if max_streams < 1:
            raise ValueError(f"max_streams must be at least 1, got {max_streams}")
        self._denoise = _stream_denoiser(despeckler, refine) if hasattr(despeckler, "denoise") else despeckler
        if not callable(self._denoise):
            raise TypeError("despeckler must be a Despeckler or a callable array -> array")
        self.on_output = on_output
        self.on_error = on_error
        self.max_streams = max_streams
        self._cond = threading.Condition()
        self._pending: "OrderedDict[str, _Item]" = OrderedDict()
        self._latest: Dict[str, StreamResult] = {}
        self._busy = False
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self._index = 0
        self._received = self._processed = self._dropped = self._failed = 0
        self._latencies: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.last_error: Optional[BaseException] = None

    # ------------------------------------------------------------------ life cycle
    def start(self, warm: bool = False) -> "StreamDespeckler":
        """Start the worker thread; with ``warm`` it first runs :func:`warm_up` (frames submitted
        meanwhile wait, the latest winning as always)."""
        with self._cond:
            if self._thread is not None:
                return self
            self._stopping = False
            self._thread = threading.Thread(target=self._run, args=(warm,), name="speckle2self-stream", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Stop the worker after the frame in work; frames still pending count as dropped.
        Returns False when the worker did not end within ``timeout``."""
        with self._cond:
            self._stopping = True
            self._dropped += len(self._pending)
            self._pending.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
            self._thread = None
        return True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ frames in, results out
    def submit(self, frames: np.ndarray, key: str = "", meta: Any = None) -> bool:
        """Hand over a frame (H, W) or stack (N, H, W); it is not copied, so do not change it.

        A frame of ``key`` still waiting is replaced (counted as dropped). Returns False when the
        frame is refused: the despeckler is stopping, or ``max_streams`` other streams are pending.
        """
        with self._cond:
            self._received += 1
            if self._stopping or (key not in self._pending and len(self._pending) >= self.max_streams):
                self._dropped += 1
                return False
            if key in self._pending:
                self._dropped += 1          # replaced in place: the stream keeps its turn
            self._index += 1
            self._pending[key] = _Item(key, frames, meta, self._index, time.monotonic())
            self._cond.notify_all()
        return True

    def latest(self, key: str = "") -> Optional[StreamResult]:
        """The newest despeckled result of ``key`` (None before the first)."""
        with self._cond:
            return self._latest.get(key)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is pending or in work; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending and not self._busy, timeout)

    def process_pending(self) -> int:
        """Despeckle what is pending in the caller's thread (no worker needed); returns the count."""
        done = 0
        while True:
            item = self._take(block=False)
            if item is None:
                return done
            self._process(item)
            done += 1

    @property
    def stats(self) -> StreamStats:
        with self._cond:
            median, p95 = _percentiles_ms(list(self._latencies))
            return StreamStats(self._received, self._processed, self._dropped, self._failed, len(self._pending),
                               median, p95)

    # ------------------------------------------------------------------ worker
    def _take(self, block: bool) -> Optional[_Item]:
        with self._cond:
            while block and not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending or (block and self._stopping):
                return None
            _key, item = self._pending.popitem(last=False)
            self._busy = True
            return item

    def _run(self, warm: bool = False) -> None:
        if warm:
            with self._cond:
                self._busy = True
            try:
                warm_up(self._denoise)
            except Exception:  # noqa: BLE001 - the first real frame reports the same error
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        while True:
            item = self._take(block=True)
            if item is None:
                return
            self._process(item)

    def _process(self, item: _Item) -> None:
        result = None
        try:
            try:
                output = self._denoise(item.frames)
            except Exception as err:  # reported, counted; the stream goes on with the next frame
                with self._cond:
                    self._failed += 1
                    self.last_error = err
                if self.on_error is not None:
                    self.on_error(item.key, item.meta, err)
                return
            result = StreamResult(item.key, output, item.meta, item.index, item.received, time.monotonic())
            with self._cond:
                self._latest[item.key] = result
                self._processed += 1
                self._latencies.append(result.seconds)
            if self.on_output is not None:
                self.on_output(result)
        except Exception as err:  # a failing callback must not kill the worker
            self.last_error = err
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


# ----------------------------------------------------------------------------- OpenIGTLink messages

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
    from .fileio.imageio import luminance_like

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


def _recv_exact(sock: socket.socket, size: int, stop: threading.Event, idle_ok: bool) -> Optional[bytearray]:
    """``size`` bytes from ``sock`` (timeout POLL_SECONDS per recv). None on stop, or on a clean
    close before the first byte. Raises ConnectionError on a close or stall mid-message; with
    ``idle_ok`` waiting for the first byte is unlimited (between messages)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    last = time.monotonic()
    while got < size:
        if stop.is_set():
            return None
        try:
            n = sock.recv_into(view[got:], size - got)
        except socket.timeout:
            if (got or not idle_ok) and time.monotonic() - last > STALL_SECONDS:
                raise ConnectionError(f"stream stalled for {STALL_SECONDS:.0f} s in the middle of a message")
            continue
        if n == 0:
            if got == 0 and idle_ok:
                return None
            raise ConnectionError("connection closed in the middle of a message")
        got += n
        last = time.monotonic()
    return buf


class _Listener:
    """Receives the input stream: accepts one connection at a time on (host, port), or with
    ``connect`` connects to an OpenIGTLink server there (e.g. PlusServer), reconnecting; hands
    each message to ``on_message``."""

    def __init__(self, host: str, port: int, on_message, log: LogFn, connect: bool = False):
        self.on_message = on_message
        self.log = log
        self.connect = connect
        self.stop_event = threading.Event()
        self.connections = 0
        self.failed_connects = 0         # --connect: attempts the server refused or did not answer
        self.thread = threading.Thread(target=self._run, name="speckle2self-igtl-in", daemon=True)
        self.host, self.port = host, port
        self.sock: Optional[socket.socket] = None
        if connect:
            if port <= 0:
                raise ValueError(f"bad input port {port}")
            return
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as err:
            self.sock.close()
            raise RuntimeError(f"cannot listen on {host}:{port} ({err.strerror or err}); is another program "
                               "using the port? choose another with --listen") from err
        self.sock.listen(1)
        self.sock.settimeout(POLL_SECONDS)
        self.port = self.sock.getsockname()[1]

    def _next_connection(self) -> Optional[socket.socket]:
        if self.connect:
            try:
                conn = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
            except OSError as err:
                if not self.failed_connects:      # said once; the relay keeps trying (the server may start later)
                    self.log(f"waiting for {self.host}:{self.port} to accept a connection ({err.strerror or err}); "
                             "is the OpenIGTLink server (e.g. PlusServer) running there?")
                self.failed_connects += 1
                self.stop_event.wait(POLL_SECONDS)
                return None
            self.log(f"receiving from {self.host}:{self.port}")
            return conn
        try:
            conn, peer = self.sock.accept()
        except socket.timeout:
            return None
        self.log(f"input connected from {peer[0]}:{peer[1]}")
        return conn

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    conn = self._next_connection()
                except OSError:
                    return
                if conn is None:
                    continue
                self.connections += 1
                try:
                    conn.settimeout(POLL_SECONDS)
                    self._serve(conn)
                except (OSError, ConnectionError, ValueError) as err:
                    self.log(f"input connection dropped: {err}")
                finally:
                    conn.close()
                if not self.stop_event.is_set():
                    self.log("input disconnected; " + ("reconnecting" if self.connect else
                                                       "waiting for a new connection"))
        finally:
            if self.sock is not None:
                self.sock.close()

    def _serve(self, conn: socket.socket) -> None:
        pyigtl = _require_pyigtl()
        while not self.stop_event.is_set():
            header = _recv_exact(conn, HEADER_SIZE, self.stop_event, idle_ok=True)
            if header is None:
                return
            fields = pyigtl.MessageBase.parse_header(bytes(header))
            if fields["body_size"] > MAX_BODY_BYTES:
                raise ValueError(f"message body of {fields['body_size']} bytes announced; not an OpenIGTLink stream?")
            body = _recv_exact(conn, fields["body_size"], self.stop_event, idle_ok=False)
            if body is None:
                return
            self.on_message(bytes(header), fields, bytes(body))


class _Sender:
    """Keeps a connection to HOST:PORT (reconnecting) and sends queued messages in order."""

    def __init__(self, host: str, port: int, log: LogFn, max_outbox: int = MAX_OUTBOX):
        self.host, self.port = host, port
        self.log = log
        self.max_outbox = max_outbox
        self.cond = threading.Condition()
        self.outbox: Deque[Tuple[bytes, bool, float]] = deque()
        self.in_flight = False
        self.stop_event = threading.Event()
        self.connected = threading.Event()
        self.sent_images = self.sent_other = self.unsent = 0
        self.latencies: Deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.thread = threading.Thread(target=self._run, name="speckle2self-igtl-out", daemon=True)

    def put(self, data: bytes, image: bool, received: float) -> None:
        with self.cond:
            if len(self.outbox) >= self.max_outbox:
                self.outbox.popleft()
                self.unsent += 1
            self.outbox.append((data, image, received))
            self.cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until everything queued was sent (False on timeout, e.g. nobody to send to)."""
        with self.cond:
            return self.cond.wait_for(lambda: not self.outbox and not self.in_flight, timeout)

    def stop(self) -> None:
        self.stop_event.set()
        with self.cond:
            self.cond.notify_all()

    def _connect(self) -> Optional[socket.socket]:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except OSError:
            return None
        sock.settimeout(SEND_TIMEOUT)
        self.connected.set()
        self.log(f"sending to {self.host}:{self.port}")
        return sock

    def _run(self) -> None:
        sock: Optional[socket.socket] = None
        waited = False
        try:
            while not self.stop_event.is_set():
                if sock is None:
                    sock = self._connect()
                    if sock is None:
                        if not waited:
                            self.log(f"waiting for {self.host}:{self.port} to accept a connection")
                            waited = True
                        self.stop_event.wait(POLL_SECONDS)
                        continue
                    waited = False
                with self.cond:
                    if not self.outbox:
                        self.cond.wait(POLL_SECONDS)
                        continue
                    data, image, received = self.outbox.popleft()
                    self.in_flight = True
                try:
                    sock.sendall(data)
                except OSError as err:
                    self.log(f"output connection lost ({err}); reconnecting")
                    sock.close()
                    sock = None
                    self.connected.clear()
                    with self.cond:
                        self.unsent += 1
                else:
                    with self.cond:
                        if image:
                            self.sent_images += 1
                            self.latencies.append(time.monotonic() - received)
                        else:
                            self.sent_other += 1
                finally:
                    with self.cond:
                        self.in_flight = False
                        self.cond.notify_all()
        finally:
            if sock is not None:
                sock.close()
            self.connected.clear()
            with self.cond:
                self.unsent += len(self.outbox)
                self.outbox.clear()
                self.cond.notify_all()


# ----------------------------------------------------------------------------- the relay

@dataclass
class RelayStats:
    received: int          # IMAGE messages taken in (up to max_frames)
    despeckled: int
    dropped: int           # replaced by a newer frame of the same device before being despeckled
    failed: int            # IMAGE messages that could not be despeckled (see the log)
    sent: int              # despeckled IMAGE messages sent
    forwarded: int         # other messages passed through unchanged
    unsent: int            # messages lost on the output side (no connection, full outbox)
    ignored: int           # IMAGE messages after max_frames
    seconds: float
    latency_ms_median: Optional[float]   # received -> despeckled message sent
    latency_ms_p95: Optional[float]

    def summary(self) -> str:
        latency = "" if self.latency_ms_median is None else \
            f"; latency median {self.latency_ms_median:.1f} ms, p95 {self.latency_ms_p95:.1f} ms"
        return (f"{self.received} frames received, {self.despeckled} despeckled, {self.sent} sent, "
                f"{self.dropped} dropped, {self.failed} failed, {self.forwarded} other messages forwarded "
                f"in {self.seconds:.1f} s{latency}")


class StreamRelay:
    """OpenIGTLink relay: IMAGE in (``listen``) -> despeckled IMAGE out (``send``).

    Binds the listening socket when created (``port`` is then known, also for port 0). With
    ``receive_from`` it connects to that OpenIGTLink server for its input instead. :meth:`run`
    blocks until ``max_frames`` IMAGE messages were received and handled, ``max_seconds`` passed,
    or :meth:`stop` was called; then it finishes the frame in work, sends it and closes.
    """

    def __init__(self, despeckler, listen: Tuple[str, int] = ("127.0.0.1", DEFAULT_LISTEN_PORT),
                 send: Tuple[str, int] = ("127.0.0.1", DEFAULT_SEND_PORT), *, suffix: str = DEFAULT_SUFFIX,
                 max_frames: Optional[int] = None, max_seconds: Optional[float] = None, forward_other: bool = True,
                 receive_from: Optional[Tuple[str, int]] = None, log: LogFn = _quiet, refine: str = "auto"):
        _require_pyigtl()
        output_device_name("", suffix)          # checks the suffix fits
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, got {max_frames}")
        if max_seconds is not None and max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {max_seconds}")
        if send[1] <= 0:
            raise ValueError(f"bad output port {send[1]}")
        self.suffix = suffix
        self.max_frames = max_frames
        self.max_seconds = max_seconds
        self.forward_other = forward_other
        self.log = log
        self._lock = threading.Lock()
        self._received = self._ignored = self._forwarded = self._bad = 0
        self._input_done = threading.Event()
        self._stop = threading.Event()
        self._started_at: Optional[float] = None
        self._seconds = 0.0
        self._errors_logged: set = set()
        self.stream = StreamDespeckler(despeckler, self._on_output, on_error=self._on_error, refine=refine)
        self.sender = _Sender(send[0], send[1], log)
        if receive_from is not None:
            self.listener = _Listener(receive_from[0], receive_from[1], self._on_message, log, connect=True)
        else:
            self.listener = _Listener(listen[0], listen[1], self._on_message, log)

    @property
    def port(self) -> int:
        """The listening port (the actual one when 0 was asked for; the server's with receive_from)."""
        return self.listener.port

    # ------------------------------------------------------------------ running
    def run(self) -> RelayStats:
        self._started_at = time.monotonic()
        self.stream.start()
        self.sender.thread.start()
        self.listener.thread.start()
        deadline = None if self.max_seconds is None else self._started_at + self.max_seconds
        try:
            while not self._stop.is_set() and not self._input_done.is_set():
                remaining = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - time.monotonic())
                if remaining <= 0:
                    self.log(f"--max-seconds {self.max_seconds:g} reached")
                    break
                self._stop.wait(remaining)
        except KeyboardInterrupt:
            self.log("interrupted")
        finally:
            self._close()
        return self.stats

    def stop(self) -> None:
        """Ask :meth:`run` to finish (thread-safe, also from a signal handler)."""
        self._stop.set()

    def _close(self) -> None:
        self.listener.stop_event.set()               # no new frames
        self.stream.wait_idle(DRAIN_SECONDS)         # the frame in work is finished ...
        self.stream.stop(DRAIN_SECONDS)
        if self.sender.connected.is_set():
            self.sender.drain(DRAIN_SECONDS)         # ... and sent when there is someone to send to
        self.sender.stop()
        for thread in (self.listener.thread, self.sender.thread):
            if thread.is_alive():
                thread.join(DRAIN_SECONDS)
        self._seconds = time.monotonic() - (self._started_at or time.monotonic())

    @property
    def stats(self) -> RelayStats:
        s = self.stream.stats
        with self.sender.cond:
            sent, forwarded_sent, unsent = self.sender.sent_images, self.sender.sent_other, self.sender.unsent
            median, p95 = _percentiles_ms(list(self.sender.latencies))
        seconds = self._seconds if self._seconds else (
            time.monotonic() - self._started_at if self._started_at else 0.0)
        with self._lock:
            return RelayStats(self._received, s.processed, s.dropped, s.failed + self._bad, sent, forwarded_sent,
                              unsent, self._ignored, round(seconds, 3), median, p95)

    # ------------------------------------------------------------------ callbacks (listener and worker threads)
    def _on_message(self, header: bytes, fields: dict, body: bytes) -> None:
        pyigtl = _require_pyigtl()
        received = time.monotonic()
        if fields["message_type"] != "IMAGE":
            if self.forward_other and not self._input_done.is_set():
                with self._lock:
                    self._forwarded += 1
                self.sender.put(header + body, False, received)
            return
        with self._lock:
            if self._input_done.is_set():
                self._ignored += 1
                return
            self._received += 1
            last = self.max_frames is not None and self._received >= self.max_frames
        try:
            message = pyigtl.ImageMessage()
            message.unpack(fields, body)
            frames = image_frames(message)
        except Exception as err:  # a malformed or unsupported image: reported, the stream goes on
            with self._lock:
                self._bad += 1
            self._on_error(fields.get("device_name", ""), None, err)
        else:
            self.stream.submit(frames, key=message.device_name, meta=(message, header[TIMESTAMP_BYTES], received))
        if last:
            self.log(f"--max-frames {self.max_frames} received")
            self._input_done.set()

    def _on_output(self, result: StreamResult) -> None:
        message, raw_timestamp, received = result.meta
        try:
            data = despeckled_message(message, result.output, self.suffix, raw_timestamp)
        except Exception as err:  # e.g. a voxel type OpenIGTLink cannot carry
            with self._lock:
                self._bad += 1
            self._on_error(result.key, None, err)
            return
        self.sender.put(data, True, received)

    def _on_error(self, key: str, _meta, err: BaseException) -> None:
        kind = (key, type(err).__name__, str(err))
        if kind not in self._errors_logged and len(self._errors_logged) < 100:
            self._errors_logged.add(kind)
            self.log(f"cannot despeckle IMAGE '{key}': {err}")


__all__ = ["warm_up", "StreamDespeckler", "StreamResult", "StreamStats", "StreamRelay", "RelayStats",
           "despeckled_message", "image_frames", "output_device_name", "parse_address"]
