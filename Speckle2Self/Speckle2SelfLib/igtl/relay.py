"""The OpenIGTLink relay (``speckle2self stream``, :mod:`Speckle2SelfLib.cli.stream`).

:class:`StreamRelay` receives IMAGE messages on a listening socket, sends despeckled IMAGE messages
to another host with the device name suffixed, the same IJK-to-world matrix and the same
timestamp (its raw 64 bits). Other message types (TRANSFORM, ...) are forwarded unchanged, so
tracking stays in step. The frames are despeckled by the engine's latest-frame-wins
:class:`~Speckle2SelfLib.engine.latest_frame.StreamDespeckler`; messages are encoded and decoded by
``pyigtl`` (:mod:`.messages`); the sockets are handled here so that every incoming message is seen
(and dropped frames are counted), no receive is polled with sleeps, and the relay runs in any
thread (pyigtl's server hooks SIGINT/SIGTERM, main thread only).

torch and pyigtl are imported lazily.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Optional, Tuple

from ..engine.latest_frame import DRAIN_SECONDS, LATENCY_WINDOW, StreamDespeckler, StreamResult, percentiles_ms
from .messages import (DEFAULT_SUFFIX, HEADER_SIZE, TIMESTAMP_BYTES, _require_pyigtl, despeckled_message, image_frames,
                       output_device_name)

DEFAULT_LISTEN_PORT = 18945          # the relay listens here (the scanner / PLUS side connects)
DEFAULT_SEND_PORT = 18944            # 3D Slicer's OpenIGTLinkIF default server port
MAX_BODY_BYTES = 512 * 1024 * 1024   # larger bodies mean a broken stream (a 4K RGB volume is far less)
POLL_SECONDS = 0.2                   # socket timeout: how quickly threads notice a stop request
STALL_SECONDS = 5.0                  # a message body that stops arriving for this long drops the connection
CONNECT_TIMEOUT = 1.0
SEND_TIMEOUT = 5.0
MAX_OUTBOX = 32                      # outgoing messages waiting for the socket (oldest dropped beyond)

LogFn = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


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
            median, p95 = percentiles_ms(list(self.sender.latencies))
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


__all__ = ["StreamRelay", "RelayStats", "DEFAULT_LISTEN_PORT", "DEFAULT_SEND_PORT"]
