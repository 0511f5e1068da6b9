"""The live relay (``speckle2self stream``) between programs of the reference OpenIGTLink C++ library.

Debian's ``openigtlink-examples`` ships the sources of the library's example programs and
``libopenigtlink-dev`` its headers and library. Two of them are built here with the C++ compiler:

* ``ImagerClient HOST PORT FPS IMGDIR`` connects and sends 100 IMAGE messages (device
  "ImagerClient", 256 x 256 x 1 uint8, spacing 1 x 1 x 5 mm, the library's test images) at FPS
  frames/s, then closes;
* ``ReceiveServer PORT`` accepts a connection and, for each of the next 100 messages, prints on
  stderr what it received; an IMAGE whose CRC checks out prints its "Device Name", "Scalar Type",
  "Dimensions", "Spacing", ... lines. It never exits by itself.

:func:`run_relay_scenario` starts ReceiveServer, a relay process between the two (its input on a
port it picks itself, printed) and ImagerClient, everything on loopback (127.0.0.1; ReceiveServer
binds every interface, the library's CreateServer offers no choice), each wait bounded, every
process killed at the end. Used by Testing/test_stream_reference.py and
benchmarks/stream_reference.py.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = Path(os.environ.get("OPENIGTLINK_EXAMPLES", "/usr/share/doc/openigtlink-examples/examples"))
INCLUDE = Path(os.environ.get("OPENIGTLINK_INCLUDE", "/usr/include/openigtlink"))
SOURCES = {"ImagerClient": "Imager/ImagerClient.cxx", "ReceiveServer": "Receiver/ReceiveServer.cxx"}
IMAGES = "Imager/img"
FRAMES_PER_RUN = 100          # ImagerClient sends 100 frames; ReceiveServer reads 100 messages per connection
INSTALL_HINT = ("apt-get install openigtlink-examples libopenigtlink-dev g++; "
                "scripts/setup_env.sh does it when run as root")
LOOPBACK = "127.0.0.1"


def _existing(path: Path) -> Optional[Path]:
    """``path``, or its gzipped copy (Debian may compress files under /usr/share/doc)."""
    if path.is_file():
        return path
    gz = path.with_name(path.name + ".gz")
    return gz if gz.is_file() else None


def compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def missing_reason() -> Optional[str]:
    """Why the reference programs cannot be built here (one line), or None."""
    absent = [rel for rel in SOURCES.values() if _existing(EXAMPLES / rel) is None]
    if absent or not (EXAMPLES / IMAGES).is_dir():
        return (f"OpenIGTLink example sources not found under {EXAMPLES} (openigtlink-examples not installed, "
                f"or /usr/share/doc excluded by dpkg); {INSTALL_HINT}")
    if not (INCLUDE / "igtlImageMessage.h").is_file():
        return f"OpenIGTLink headers not found in {INCLUDE} (libopenigtlink-dev not installed); {INSTALL_HINT}"
    if compiler() is None:
        return f"no C++ compiler (g++, c++, clang++ or $CXX) found; {INSTALL_HINT}"
    return None


class BuildError(RuntimeError):
    pass


def build(dest: Path) -> Dict[str, Path]:
    """Compile ImagerClient and ReceiveServer into ``dest`` (kept when up to date) and copy the
    test images there; returns {"ImagerClient": exe, "ReceiveServer": exe, "images": dir}."""
    dest.mkdir(parents=True, exist_ok=True)
    cxx = compiler()
    out: Dict[str, Path] = {}
    for name, rel in SOURCES.items():
        source = _existing(EXAMPLES / rel)
        if source.suffix == ".gz":
            plain = dest / source.name[:-3]
            plain.write_bytes(gzip.decompress(source.read_bytes()))
            source = plain
        exe = dest / name
        if not exe.is_file() or exe.stat().st_mtime < source.stat().st_mtime:
            cmd = [cxx, "-O1", "-w", f"-I{INCLUDE}", str(source), "-o", str(exe), "-lOpenIGTLink", "-lpthread"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise BuildError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        out[name] = exe
    images = dest / "img"
    images.mkdir(exist_ok=True)
    for src in (EXAMPLES / IMAGES).iterdir():
        target = images / (src.name[:-3] if src.name.endswith(".gz") else src.name)
        if not target.is_file():
            data = src.read_bytes()
            target.write_bytes(gzip.decompress(data) if src.name.endswith(".gz") else data)
    out["images"] = images
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` (Linux /proc; True elsewhere, the relay retries anyway)."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not any(t.is_file() for t in tables):
        return True
    for table in tables:
        if table.is_file():
            for line in table.read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


class _Lines:
    """Reads a process's stream line by line in a thread, each line with its arrival time."""

    def __init__(self, stream):
        self.lines: List[tuple] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            with self.cond:
                self.lines.append((time.monotonic(), raw.decode("utf8", "replace").rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.lines.append((time.monotonic(), None))      # end of stream
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float) -> Optional[str]:
        """The first line for which ``predicate(line)`` holds (None: timeout or end of stream)."""
        end = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for _t, line in self.lines[seen:]:
                    if line is None:
                        return None
                    if predicate(line):
                        return line
                seen = len(self.lines)
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def text(self) -> List[str]:
        with self.cond:
            return [line for _t, line in self.lines if line is not None]

    def timed(self) -> List[tuple]:
        with self.cond:
            return [(t, line) for t, line in self.lines if line is not None]


@dataclass
class ScenarioResult:
    fps: float
    client_frames: int                    # frames ImagerClient read and sent ("Reading ... done.")
    client_seconds: float                 # ImagerClient's run time
    relay: dict                           # the relay's final statistics (RelayStats as JSON)
    relay_rc: Optional[int]
    images_announced: int                 # ReceiveServer: "Receiving IMAGE data type."
    images_ok: int                        # ReceiveServer: IMAGE messages that unpacked with a good CRC
    device_names: Dict[str, int] = field(default_factory=dict)
    dimensions: Dict[str, int] = field(default_factory=dict)
    scalar_types: Dict[str, int] = field(default_factory=dict)
    spacings: Dict[str, int] = field(default_factory=dict)
    out_fps: Optional[float] = None       # rate of the despeckled images reaching ReceiveServer
    relay_log: List[str] = field(default_factory=list)
    receiver_log_tail: List[str] = field(default_factory=list)
    client_log_tail: List[str] = field(default_factory=list)

    @property
    def in_fps(self) -> float:
        return self.client_frames / self.client_seconds if self.client_seconds else 0.0

    def describe(self) -> str:
        return (f"ImagerClient sent {self.client_frames} frames in {self.client_seconds:.1f} s "
                f"({self.in_fps:.1f}/s); relay {self.relay}; ReceiveServer: {self.images_ok} good IMAGE "
                f"messages of {self.images_announced} ({self.device_names}), {self.out_fps or 0:.1f}/s; "
                f"relay log: {self.relay_log[-6:]}")


def _count(lines: Sequence[str], prefix: str) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for line in lines:
        if line.startswith(prefix):
            value = line.split(":", 1)[1].strip()
            counts[value] = counts.get(value, 0) + 1
    return counts


def stop_process(proc: Optional[subprocess.Popen]) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(3)


def start_relay(send_port: int, relay_args: Sequence[str] = ("--device", "cpu"), max_frames: int = FRAMES_PER_RUN,
                max_seconds: float = 60.0, timeout: float = 25.0):
    """Start ``speckle2self stream --json`` (this checkout's) listening on a free loopback port and
    sending to ``send_port``; returns once it listens and its output connection is up:
    (process, stdout lines, stderr lines, listening port). The caller stops the process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "Speckle2Self")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    relay = subprocess.Popen(
        [sys.executable, "-m", "Speckle2SelfLib.cli", "stream", "--listen", f"{LOOPBACK}:0",
         "--send", f"{LOOPBACK}:{send_port}", "--max-frames", str(max_frames), "--max-seconds", f"{max_seconds:g}",
         "--json", *relay_args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = _Lines(relay.stdout), _Lines(relay.stderr)
        banner = out.wait_for(lambda line: line.startswith("listening on "), timeout)
        if banner is None:
            raise RuntimeError(f"the relay did not start within {timeout:g} s: {out.text()[-5:]} {err.text()[-10:]}")
        port = int(re.match(r"listening on [^ ]*:(\d+),", banner).group(1))
        # the output connection is up before the first frame goes in
        if err.wait_for(lambda line: f"sending to {LOOPBACK}:{send_port}" in line, 5.0) is None:
            raise RuntimeError(f"the relay did not connect to {LOOPBACK}:{send_port}: {err.text()[-10:]}")
    except BaseException:
        stop_process(relay)
        raise
    return relay, out, err, port


class Capture:
    """A loopback OpenIGTLink server that keeps the raw bytes (header + body) of each message
    from one connection, up to ``limit`` messages (no parsing beyond the header's body size)."""

    def __init__(self, limit: int = FRAMES_PER_RUN):
        self.limit = limit
        self.messages: List[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(1)
        self.sock.settimeout(30.0)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _peer = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30.0)
            buf = b""
            while len(self.messages) < self.limit:
                try:
                    chunk = conn.recv(1 << 20)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                while len(buf) >= 58:
                    size = 58 + int.from_bytes(buf[42:50], "big")
                    if len(buf) < size:
                        break
                    self.messages.append(buf[:size])
                    buf = buf[size:]
        self.sock.close()

    def join(self, timeout: float) -> List[bytes]:
        self.thread.join(timeout)
        self.sock.close()
        return list(self.messages)


def run_imager_client(tools: Dict[str, Path], port: int, fps: float, timeout: float = 20.0):
    return subprocess.run([str(tools["ImagerClient"]), LOOPBACK, str(port), f"{fps:g}", str(tools["images"])],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def run_relay_scenario(tools: Dict[str, Path], fps: float = 10.0, relay_args: Sequence[str] = ("--device", "cpu"),
                       start_timeout: float = 25.0, client_timeout: float = 20.0,
                       finish_timeout: float = 12.0) -> ScenarioResult:
    """ImagerClient -> relay -> ReceiveServer on loopback; see the module docstring.

    Raises RuntimeError (with the processes' output) when a program does not start; the counts of
    a run that completes are returned as they are, for the caller to judge."""
    receiver = relay = None
    try:
        # ReceiveServer: a free port (re-picked if another program took it in between)
        for _attempt in range(3):
            port = free_port()
            receiver = subprocess.Popen([str(tools["ReceiveServer"]), str(port)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            received = _Lines(receiver.stderr)
            end = time.monotonic() + 5.0
            while receiver.poll() is None and not _listening(port) and time.monotonic() < end:
                time.sleep(0.05)
            if receiver.poll() is None and _listening(port):
                break
            stop_process(receiver)
        else:
            raise RuntimeError(f"ReceiveServer did not start: {received.text()[-5:]}")

        relay, relay_out, relay_err, relay_port = start_relay(
            port, relay_args, max_seconds=start_timeout + client_timeout + finish_timeout, timeout=start_timeout)

        started = time.monotonic()
        client = run_imager_client(tools, relay_port, fps, client_timeout)
        client_seconds = time.monotonic() - started
        client_log = client.stderr.splitlines()
        if any("Cannot connect" in line for line in client_log):
            raise RuntimeError(f"ImagerClient could not connect to the relay on port {relay_port}")

        try:
            relay_rc = relay.wait(finish_timeout)
        except subprocess.TimeoutExpired:
            relay_rc = None
        stats_line = relay_out.wait_for(lambda line: line.startswith("{"), 1.0)
        # the relay has sent all it will send: give ReceiveServer a moment to print the last ones
        expected = json.loads(stats_line)["sent"] if stats_line else FRAMES_PER_RUN
        end = time.monotonic() + 3.0
        while sum(line.startswith("Device Name") for line in received.text()) < expected and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.2)                          # anything beyond the expected count would show now
    finally:
        stop_process(relay)
        stop_process(receiver)

    lines = received.text()
    arrivals = [t for t, line in received.timed() if line.startswith("Device Name")]
    out_fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 and \
        arrivals[-1] > arrivals[0] else None
    return ScenarioResult(
        fps=fps,
        client_frames=sum(1 for line in client_log if line.startswith("Reading") and line.endswith("done.")),
        client_seconds=client_seconds,
        relay=json.loads(stats_line) if stats_line else {},
        relay_rc=relay_rc,
        images_announced=sum(line.startswith("Receiving IMAGE data type.") for line in lines),
        images_ok=len(arrivals),
        device_names=_count(lines, "Device Name"),
        dimensions=_count(lines, "Dimensions"),
        scalar_types=_count(lines, "Scalar Type"),
        spacings=_count(lines, "Spacing"),
        out_fps=out_fps,
        relay_log=relay_err.text(),
        receiver_log_tail=lines[-12:],
        client_log_tail=client_log[-5:],
    )
