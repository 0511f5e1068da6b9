"""``speckle2self stream``: the live OpenIGTLink relay (:class:`~Speckle2SelfLib.igtl.relay.StreamRelay`)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from dataclasses import asdict

from ..engine.latest_frame import warm_up
from ..igtl.messages import parse_address
from ..igtl.relay import StreamRelay, _quiet


def add_stream_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``speckle2self stream``."""
    source = p.add_mutually_exclusive_group()
    source.add_argument("--listen", default="18945", metavar="[HOST:]PORT",
                        help="where the relay accepts the image stream (default 127.0.0.1:18945; 0.0.0.0:PORT for "
                             "every interface; port 0: any free port, printed)")
    p.add_argument("--send", default="127.0.0.1:18944", metavar="HOST:PORT",
                   help="where despeckled images go, e.g. 3D Slicer's OpenIGTLinkIF server (default 127.0.0.1:18944)")
    source.add_argument("--connect", metavar="HOST:PORT",
                        help="instead of listening, receive by connecting to this OpenIGTLink server (e.g. PlusServer)")
    p.add_argument("--model", help="model file or bundled model name (default: the bundled default model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--suffix", default="_S2S", help="appended to the device name of despeckled images (default _S2S)")
    p.add_argument("--max-frames", type=int, help="stop after this many IMAGE messages were received and handled")
    p.add_argument("--max-seconds", type=float, help="stop after this many seconds")
    p.add_argument("--no-forward", action="store_true", help="do not pass other messages (TRANSFORM, ...) through")
    p.add_argument("--refine", default="auto", choices=["auto", "guided", "none"],
                   help="auto (default): what the model recommends (guided for the bundled default); none: the "
                        "network's output alone (the refinement is a small share of a frame's time)")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--json", action="store_true", help="print the final statistics as JSON")
    p.add_argument("--quiet", action="store_true", help="no connection messages on stderr")


def run_stream(args) -> int:
    """Run ``speckle2self stream``: relay until stopped (Ctrl-C, SIGTERM, --max-frames or --max-seconds)."""
    import signal

    from ..engine.inference import Despeckler

    listen = parse_address(args.listen)
    send = parse_address(args.send)
    receive_from = parse_address(args.connect) if getattr(args, "connect", None) else None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    log = _quiet if args.quiet else (lambda message: print(f"[stream] {message}", file=sys.stderr, flush=True))
    despeckler = Despeckler.from_file(args.model, args.device)
    warm_up(despeckler)
    relay = StreamRelay(despeckler, listen, send, suffix=args.suffix, max_frames=args.max_frames,
                        max_seconds=args.max_seconds, forward_other=not args.no_forward,
                        receive_from=receive_from, log=log, refine=args.refine)
    name = despeckler.metadata.get("name", "model")
    source = f"receiving from {receive_from[0]}:{receive_from[1]}" if receive_from else \
        f"listening on {relay.listener.host}:{relay.port}"
    print(f"{source}, sending to {send[0]}:{send[1]} (model {name}, device {despeckler.device}, "
          f"backend {despeckler.backend})", flush=True)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: relay.stop())
    try:
        stats = relay.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(json.dumps(asdict(stats)) if args.json else stats.summary(), flush=True)
    if receive_from and relay.listener.connections == 0:
        print(f"error: never connected to {receive_from[0]}:{receive_from[1]} ({relay.listener.failed_connects} "
              "attempt(s)); start the OpenIGTLink server (e.g. PlusServer) there or fix --connect", file=sys.stderr)
        return 1
    return 0
