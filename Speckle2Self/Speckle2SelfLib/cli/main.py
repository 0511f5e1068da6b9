"""Command line: ``speckle2self train | denoise | info | export | simulate | segment | demo | stream``.

This module builds the top-level parser and dispatches: each subcommand is a module of this
package (:mod:`.train`, :mod:`.denoise`, :mod:`.info`, :mod:`.export`; :mod:`.simulate`,
:mod:`.segment`, :mod:`.demo`, :mod:`.stream` loaded only when asked for) over the engine's
functions; :mod:`.options` holds the option types they share.

Every option is checked when it is parsed and every input and output path before any
computation. A failure is one line on stderr (``error: <file>: <cause>``; ``--debug`` adds
the traceback). Exit codes: 0 done; 1 the run failed, or some files of a folder run failed;
2 bad input, options or output paths (nothing computed or written); 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM). See docs/reliability.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .. import __version__
from .denoise import add_denoise
from .exitcodes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED
from .export import add_export
from .info import add_info
from .train import add_train


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _add_optional(sub, module: str, name: str, help_text: str, load: bool = True) -> None:
    """Subcommands that live in their own modules of this package register through add_*/run_*.

    ``load=False`` (another subcommand was asked for) registers the name only: importing the
    module (scipy, slicer, ...) would add seconds to every start of the command line.
    """
    import importlib

    p = sub.add_parser(name, help=help_text)
    if not load:
        return
    try:
        mod = importlib.import_module(f".{module}", __package__)
        getattr(mod, f"add_{name}_arguments")(p)
        p.set_defaults(func=getattr(mod, f"run_{name}"))
    except (ImportError, AttributeError) as err:
        # A missing optional dependency must not take down train/denoise with it.
        reason = f"'{name}' is unavailable: {err}"
        p.set_defaults(func=lambda _args: _unavailable(reason))


def _unavailable(reason: str) -> int:
    print(f"error: {reason}", file=sys.stderr)
    return 2


def _with_debug(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--debug`` after the subcommand as well (``speckle2self denoise ... --debug``)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of a failure")
    return parser


def _command_in(argv: Optional[List[str]]) -> Optional[str]:
    """The subcommand named in ``argv`` (None when none is, e.g. ``--help``; "" when unknown)."""
    args = sys.argv[1:] if argv is None else [str(a) for a in argv]
    for arg in args:
        if arg.startswith("@"):
            return ""                   # arguments from a file: load everything
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="speckle2self", description="Self-supervised ultrasound despeckling",
                     fromfile_prefix_chars="@",
                     epilog="exit codes: 0 done; 1 the run failed (or some files of a folder run); "
                            "2 bad input, options or output paths (nothing computed or written); "
                            "130 interrupted. See docs/reliability.md.")
    parser.add_argument("--version", action="version", version=f"speckle2self {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_train(sub)
    add_denoise(sub)
    add_info(sub)
    add_export(sub)
    wanted = _command_in(argv)
    for module, name, help_text in (
            ("simulate", "simulate", "simulate a B-mode phantom with its clean target"),
            ("segment", "segment", "segment the carotid lumen from a seed point"),
            ("demo", "demo", "despeckle a simulated phantom and a real DICOM with the bundled model"),
            ("stream", "stream", "live OpenIGTLink relay: receive IMAGE messages, send them despeckled")):
        _add_optional(sub, module, name, help_text, load=wanted in ("", name))
    for subparser in sub.choices.values():
        _with_debug(subparser)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporary files are cleaned up on the way out."""


def _sigterm_handler(owner: int):
    """SIGTERM handler of the CLI's process ``owner``: raise :class:`_Terminated` there; a forked
    child (e.g. OpenVINO's telemetry) inherits the handler and must just exit, without a traceback."""
    def terminate(signum, _frame):
        if os.getpid() != owner:
            os._exit(128 + signum)
        raise _Terminated()
    return terminate


#: Errors that mean "bad input, options or paths" (exit 2); anything else is a failed run (exit 1).
def _is_bad_input(err: BaseException) -> bool:
    from ..engine.resources import InsufficientMemory
    return isinstance(err, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError,
                            IsADirectoryError, NotADirectoryError, InsufficientMemory)) \
        and not isinstance(err, (FloatingPointError, MemoryError))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, DeprecationWarning):
        return
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


#: Options whose value may start with a minus sign (RAS coordinates are often negative).
_SIGNED_VALUE_OPTIONS = ("--seed", "--seed-ras")


def _attach_signed_values(argv: List[str]) -> List[str]:
    """``--seed-ras -27.2,-52.5,30.5`` as ``--seed-ras=-27.2,-52.5,30.5``: argparse takes a value
    that starts with '-' and is not a plain number for an option, and would refuse it."""
    out: List[str] = []
    for arg in argv:
        if out and out[-1] in _SIGNED_VALUE_OPTIONS and len(arg) > 1 and arg[0] == "-" \
                and (arg[1].isdigit() or arg[1] == "."):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _with_option_names(message: str, args: argparse.Namespace) -> str:
    """The library names its arguments (edge_power, max_frames); on the command line the user
    gave the options (--edge-power, --max-frames): say those. Only names with an underscore,
    which prose never uses."""
    import re

    for dest in vars(args):
        if "_" in dest:
            message = re.sub(rf"(?<![-\w]){dest}\b", "--" + dest.replace("_", "-"), message)
    return message


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    import signal
    import threading
    import warnings

    from ..fileio.safeio import one_line

    argv = _attach_signed_values(sys.argv[1:] if argv is None else [str(a) for a in argv])
    try:
        args = build_parser(argv).parse_args(argv)
        args.argv = argv                    # train --nproc starts the same command in its processes
    except SystemExit as done:      # --help, --version, or a one-line option error (exit 2)
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    debug = bool(getattr(args, "debug", False))
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_handler(os.getpid()))
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted; outputs already written are complete, none is partial "
              "(rerun denoise with --skip-existing to finish)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print("error: terminated (SIGTERM); outputs already written are complete, none is partial", file=sys.stderr)
        return EXIT_TERMINATED
    except (Exception, MemoryError) as err:  # noqa: B014 - every failure becomes one line
        if debug:
            import traceback
            traceback.print_exc()
        hint = "" if debug or _is_bad_input(err) else " (run with --debug for the traceback)"
        print(f"error: {_with_option_names(one_line(err), args)}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT if _is_bad_input(err) else EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
