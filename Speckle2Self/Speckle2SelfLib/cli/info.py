"""``speckle2self info``: a model's metadata."""

from __future__ import annotations

import json


def add_info(sub) -> None:
    """The ``info`` subcommand."""
    p = sub.add_parser("info", help="print a model's metadata")
    p.add_argument("model", nargs="?", help="model file or bundled name (default: the bundled default model)")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    """Print a model's metadata (JSON), its file and its parameter count."""
    from ..engine.models import load_model, resolve_model_path
    from ..engine.network import count_parameters

    loaded = load_model(resolve_model_path(args.model))
    info = dict(loaded.metadata)
    info["file"] = str(loaded.path)
    info["parameters"] = count_parameters(loaded.module)
    print(json.dumps(info, indent=2))
    return 0
