"""End-to-end latency of the live relay (``speckle2self stream``): send -> despeckled frame received.

    python benchmarks/stream_latency.py [--model M.pt] [--device cpu|cuda] [--sizes 256 512]
        [--frames 20] [--rate 30] [--seconds 4] [--threads N]

For each frame size a fresh relay process runs on loopback (127.0.0.1) between this script's
sender and receiver (plain sockets, messages packed and parsed by pyigtl). Each frame carries its
send time as the OpenIGTLink timestamp, which the relay keeps, so latency = receive time - timestamp.

* one in flight: the next frame is sent when the previous one came back -> latency median / p95
  and the frames/s the relay sustains without dropping;
* streaming: frames sent at ``--rate`` frames/s for ``--seconds`` -> frames/s that come out, the
  share of frames the relay dropped (latest frame wins) and the latency of those that came out.

Frames: a real PLUS sequence from ../shared resized to each size (simulated speckle when absent).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))
LOOPBACK = "127.0.0.1"
PLUS_SEQUENCE = ROOT.parent / "shared" / "data" / "sequences" / "SpinePhantomFreehand.igs.mha"
WARM_FRAMES = 2          # per size, not measured (first frames of a new size are slower)
TIMEOUT = 30.0           # s to wait for one frame to come back


def load_frames(size: int, count: int):
    from PIL import Image

    if PLUS_SEQUENCE.is_file():
        from Speckle2SelfLib.fileio.imageio import read_frames

        frames, source = read_frames(PLUS_SEQUENCE).frames, "PLUS SpinePhantomFreehand"
    else:
        from Speckle2SelfLib.simulation import simulated_set

        noisy, _clean = simulated_set(8, size, 0, kinds=("layers", "thyroid", "carotid", "random"))
        frames, source = np.round(np.asarray(noisy) * 255).astype(np.uint8), "simulated"
    resized = [np.asarray(Image.fromarray(frames[i % len(frames)]).resize((size, size), Image.BILINEAR))
               for i in range(count)]
    return np.stack(resized), source


class Receiver:
    """Accepts the relay's connection and records (timestamp, arrival) of each IMAGE message."""

    def __init__(self):
        import pyigtl

        self.parse_header = pyigtl.MessageBase.parse_header
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(1)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.arrivals = {}
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self, conn, size):
        buf = bytearray()
        while len(buf) < size and not self.stop.is_set():
            try:
                chunk = conn.recv(min(size - len(buf), 1 << 20))
            except socket.timeout:
                continue
            if not chunk:
                return None
            buf += chunk
        return bytes(buf) if len(buf) == size else None

    def _run(self):
        while not self.stop.is_set():
            try:
                conn, _peer = self.sock.accept()
            except socket.timeout:
                continue
            conn.settimeout(0.2)
            with conn:
                while not self.stop.is_set():
                    header = self._read(conn, 58)
                    if header is None:
                        break
                    fields = self.parse_header(header)
                    if self._read(conn, fields["body_size"]) is None:
                        break
                    arrived = time.time()
                    if fields["message_type"] == "IMAGE":
                        with self.cond:
                            self.arrivals[fields["timestamp"]] = arrived
                            self.cond.notify_all()
        self.sock.close()

    def wait_for(self, timestamp: float, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: timestamp in self.arrivals, timeout)


def _banner(proc, timeout: float) -> str:
    end, line = time.monotonic() + timeout, b""
    while not line.endswith(b"\n") and time.monotonic() < end and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                break
            line += byte
    return line.decode()


def run_size(args, size: int) -> dict:
    import pyigtl

    closed_n = args.frames
    open_n = int(round(args.rate * args.seconds))
    total = WARM_FRAMES + closed_n + open_n
    frames, source = load_frames(size, total)
    receiver = Receiver()
    command = [sys.executable, "-m", "Speckle2SelfLib.cli", "stream", "--listen", f"{LOOPBACK}:0",
               "--send", f"{LOOPBACK}:{receiver.port}", "--device", args.device, "--max-frames", str(total),
               "--max-seconds", str(TIMEOUT * 4 + args.seconds + closed_n * TIMEOUT), "--json", "--quiet"]
    if args.model:
        command += ["--model", args.model]
    command += ["--refine", args.refine]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "Speckle2Self"))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        banner = _banner(proc, 120)
        if not banner.startswith("listening on"):
            raise RuntimeError(f"relay did not start: {banner!r} {proc.stderr.read().decode()[-2000:]}")
        port = int(banner.split()[2].split(":")[1].rstrip(","))
        sender = socket.create_connection((LOOPBACK, port), timeout=10)

        def send(i: int) -> float:
            stamp = time.time()
            message = pyigtl.ImageMessage(frames[i][None], timestamp=stamp, device_name="Image_Reference")
            data = message.pack()
            stamp = pyigtl.MessageBase.parse_header(data[:58])["timestamp"]   # as the receiver decodes it
            sender.sendall(data)
            return stamp

        for i in range(WARM_FRAMES):
            if not receiver.wait_for(send(i), TIMEOUT):
                raise RuntimeError("warm-up frame did not come back")
        latencies, started = [], time.time()
        for i in range(WARM_FRAMES, WARM_FRAMES + closed_n):          # one frame in flight
            stamp = send(i)
            if not receiver.wait_for(stamp, TIMEOUT):
                raise RuntimeError(f"frame {i} did not come back within {TIMEOUT} s")
            latencies.append(receiver.arrivals[stamp] - stamp)
        closed_fps = closed_n / (time.time() - started)

        stamps, period = [], 1.0 / args.rate                          # streaming at --rate
        first = time.monotonic()
        for k in range(open_n):
            delay = first + k * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            stamps.append(send(WARM_FRAMES + closed_n + k))
        sent_seconds = time.monotonic() - first
        receiver.wait_for(stamps[-1], TIMEOUT)                         # the last frame always comes out
        out, err = proc.communicate(timeout=TIMEOUT)
        sender.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        receiver.stop.set()
        receiver.thread.join(5)
    if proc.returncode != 0:
        raise RuntimeError(f"relay failed: {err.decode()[-2000:]}")
    stats = json.loads(out.decode().strip().splitlines()[-1])
    streamed = [receiver.arrivals[s] - s for s in stamps if s in receiver.arrivals]
    came_out = len(streamed)
    ms = lambda values, q: 1000 * float(np.percentile(values, q))  # noqa: E731
    return {"size": size, "source": source, "median_ms": ms(latencies, 50), "p95_ms": ms(latencies, 95),
            "closed_fps": closed_fps, "stream_fps": came_out / max(sent_seconds, 1e-9),
            "dropped_pct": 100.0 * (open_n - came_out) / open_n, "stream_median_ms": ms(streamed, 50),
            "relay_dropped": stats["dropped"], "relay_sent": stats["sent"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file or bundled name (default: the bundled default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--frames", type=int, default=20, help="frames sent one at a time (latency)")
    parser.add_argument("--rate", type=float, default=30.0, help="frames/s of the streaming phase")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the streaming phase")
    parser.add_argument("--threads", type=int, help="CPU threads for torch in the relay")
    parser.add_argument("--refine", default="auto", choices=["auto", "guided", "none"],
                        help="the relay's refinement (default auto: what the model recommends)")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args(argv)

    from Speckle2SelfLib.engine.models import read_metadata, resolve_model_path

    name = read_metadata(resolve_model_path(args.model)).get("name", "?")
    rows = [run_size(args, size) for size in args.sizes]
    threads = args.threads or "default"
    print(f"\nRelay `speckle2self stream`, model {name}, device {args.device}, torch threads {threads}, "
          f"loopback; frames: {rows[0]['source']}\n")
    print(f"| frame | latency median (ms) | latency p95 (ms) | frames/s, one in flight "
          f"| at {args.rate:g} frames/s in: frames/s out | dropped | latency median (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}x{r['size']} | {r['median_ms']:.0f} | {r['p95_ms']:.0f} | {r['closed_fps']:.1f} "
              f"| {r['stream_fps']:.1f} | {r['dropped_pct']:.0f}% | {r['stream_median_ms']:.0f} |")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
