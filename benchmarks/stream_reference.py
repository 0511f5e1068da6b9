"""The live relay fed and read by the reference OpenIGTLink C++ programs; prints a markdown table.

    python benchmarks/stream_reference.py [--fps 10 ...] [--runs N] [--model M.pt] [--device cpu] [--build DIR]
        [--relay-arg=--refine=none ...]

Builds ImagerClient and ReceiveServer from Debian's openigtlink-examples (+ libopenigtlink-dev;
into --build, default ~/.cache/speckle2self/openigtlink-reference), then per --fps: ReceiveServer,
a ``speckle2self stream`` process (bundled default model unless --model) and ImagerClient sending
its 100 frames (256 x 256 uint8) at that rate, all on loopback (benchlib.igtl_reference; the same
scenario as Testing/test_stream_reference.py at 10 frames/s).

Columns: ImagerClient's rate and the frames it sent; what the relay received and dropped
(latest frame wins); the IMAGE messages ReceiveServer unpacked with a good CRC and their rate
(first to last arrival); the relay's own latency (frame received -> despeckled frame sent).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import igtl_reference as ref  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fps", type=float, nargs="+", default=[10.0], help="ImagerClient's frame rates (default 10)")
    p.add_argument("--runs", type=int, default=1, help="rounds over --fps (default 1)")
    p.add_argument("--model", help="model for the relay (default: the bundled default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--relay-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for speckle2self stream, e.g. --relay-arg=--refine=none (repeatable)")
    p.add_argument("--build", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "speckle2self" /
                   "openigtlink-reference", help="where the C++ programs are built")
    args = p.parse_args(argv)
    reason = ref.missing_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    tools = ref.build(args.build)
    relay_args = ["--device", args.device, *(["--model", args.model] if args.model else []), *args.relay_arg]
    rows = []
    for run in range(1, args.runs + 1):
        for fps in args.fps:
            r = ref.run_relay_scenario(tools, fps=fps, relay_args=relay_args)
            s = r.relay
            print(r.describe(), file=sys.stderr)
            latency = "-" if s.get("latency_ms_median") is None else \
                f"{s['latency_ms_median']:.1f} / {s['latency_ms_p95']:.1f}"
            rows.append(f"| {run} | {r.in_fps:.1f} | {r.client_frames} | {s.get('received', '-')} | "
                        f"{s.get('dropped', '-')} | {r.images_ok} | "
                        f"{'-' if r.out_fps is None else f'{r.out_fps:.1f}'} | {latency} |")
    print("| run | frames/s in | frames sent | relay received | relay dropped | ReceiveServer got (CRC ok) | "
          "frames/s out | latency median / p95 (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
