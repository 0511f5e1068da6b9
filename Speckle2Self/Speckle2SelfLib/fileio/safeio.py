"""Never lose data: output-path checks before any work, atomic writes, one-line error messages.

* :func:`check_output_path` refuses, before anything is read or computed, an output that
  resolves to one of the inputs (the same file, a hard link to it, or for folder runs an
  output folder equal to or inside the input folder), an existing folder given as a file, a
  missing or read-only folder, and an unknown extension.
* :func:`atomic_output` writes under a temporary name in the destination folder and renames
  it into place, so a killed run leaves either the complete file or nothing under its name.
* :func:`one_line` turns any exception into the one line the command line prints.

The command line's exit codes are in :mod:`Speckle2SelfLib.cli.exitcodes`.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from .formats import WRITABLE_SUFFIXES, is_readable, suffix_of

PARTIAL_MARK = ".speckle2self-partial-"


class OutputPathError(ValueError):
    """An output path that would lose data or cannot be written; raised before any work."""


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def same_file(a, b) -> bool:
    """Whether two paths name the same file (symlinks and hard links included)."""
    a, b = Path(a), Path(b)
    if _real(a) == _real(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def is_within(path, folder) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (after resolving links)."""
    path, folder = _real(path), _real(folder)
    return path == folder or folder in path.parents


def check_output_path(out, inputs: Iterable = (), *, suffixes: Optional[Sequence[str]] = None,
                      folder: bool = False, what: str = "output") -> Path:
    """Check an output path before any work; returns it as a Path or raises OutputPathError.

    ``inputs``: files or folders the command reads. ``folder``: the output is a folder of
    results (it may not exist yet; its nearest existing parent must be writable). A file
    output must not be an existing folder, its folder must exist and be writable, and its
    extension must be one of ``suffixes`` when given.
    """
    out = Path(out)
    text = str(out)
    if not text or text.strip() != text:
        raise OutputPathError(f"{what} path {text!r} is empty or has leading/trailing spaces")
    for source in inputs:
        source = Path(source)
        if source.is_dir():
            if folder and is_within(out, source):
                raise OutputPathError(f"{what} {out} is the input folder {source} or inside it; results would "
                                      "be mixed with (or overwrite) the inputs; choose a folder outside it")
            if not folder and is_within(out, source) and out.is_file() and _read_as_input(out):
                raise OutputPathError(f"{what} {out} would overwrite one of the input files (in the input "
                                      f"folder {source}); inputs are never overwritten, choose another output path")
        elif same_file(out, source):
            raise OutputPathError(f"{what} {out} would overwrite the input file {source}; inputs are never "
                                  "overwritten, choose another output path")
    if folder:
        if out.exists() and not out.is_dir():
            raise OutputPathError(f"{what} {out} exists and is not a folder; give a folder for a folder run")
        _check_writable(_nearest_existing(out), what, out)
        return out
    if out.is_dir():
        raise OutputPathError(f"{what} {out} is an existing folder; give a file name (e.g. {out / 'result'}"
                              f"{(suffixes or ['.png'])[0]})")
    if suffixes is not None and suffix_of(out) not in [s.lower() for s in suffixes]:
        raise OutputPathError(f"{what} {out} has an unknown extension {suffix_of(out)!r}; use one of "
                              f"{', '.join(suffixes)}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise OutputPathError(f"{what} folder {parent} does not exist; create it first or choose another path")
    if not parent.is_dir():
        raise OutputPathError(f"{what} folder {parent} is not a folder")
    _check_writable(parent, what, out)
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputPathError(f"{what} {out} exists and is read-only; choose another path or make it writable")
    return out


def _read_as_input(path: Path) -> bool:
    return is_readable(path)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def _check_writable(folder: Path, what: str, out: Path) -> None:
    """A real probe (a file created and removed): permission bits alone do not tell for root or
    read-only mounts."""
    if not folder.is_dir():
        raise OutputPathError(f"{what} {out}: {folder} is not a folder")
    key = (str(_real(folder)), os.getpid())
    if key in _PROBED:
        return
    _remove_stale(folder, f"{PARTIAL_MARK}probe-")
    probe = folder / f"{PARTIAL_MARK}probe-{os.getpid()}"
    try:
        with open(probe, "wb"):
            pass
    except OSError as err:
        raise OutputPathError(f"{what} folder {folder} is not writable ({err.strerror or err}); "
                              "choose another output folder") from err
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    _PROBED.add(key)


#: Folders found writable by this process (a folder run probes its output folders once).
_PROBED: set = set()


def check_mask_output(out, source) -> Path:
    """``segment``'s --out: not the input, a known extension that keeps a mask exact (not
    JPEG), an existing writable folder."""
    if Path(out).suffix.lower() in (".jpg", ".jpeg"):
        raise ValueError(f"--out {out}: JPEG's lossy compression would turn the mask's 0/255 into other grey "
                         "levels along its edge; write it as .png (or .nrrd / .mha for a label volume)")
    return check_output_path(out, [source], suffixes=WRITABLE_SUFFIXES, what="--out")


def check_input_path(path, what: str = "input") -> Path:
    """An input that exists and can be opened for reading (raises FileNotFoundError/PermissionError)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path}: no such file or folder")
    if path.is_file():
        try:
            with open(path, "rb"):
                pass
        except PermissionError as err:
            raise PermissionError(f"{what} {path}: permission denied (cannot read it)") from err
    elif path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: permission denied (cannot list the folder)")
    return path


# ----------------------------------------------------------------------------- atomic writes

def partial_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}{PARTIAL_MARK}{os.getpid()}"


def remove_stale_partials(out: Path) -> None:
    """Remove temporaries of earlier, killed runs for ``out`` (their process is gone)."""
    _remove_stale(out.parent, f".{out.name}{PARTIAL_MARK}")


def _remove_stale(folder: Path, prefix: str) -> None:
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            pid = int(entry.name[len(prefix):])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_output(out) -> Iterator[Path]:
    """Yield a temporary path with ``out``'s file name inside a hidden folder beside it; on
    success move everything written there into ``out``'s folder (the file named like ``out``
    last, so it appears complete or not at all); on failure remove it all.

    Writers that make two files (``.mhd`` + ``.raw``) keep their relative names.
    """
    out = Path(out)
    remove_stale_partials(out)
    tmp_dir = partial_dir_for(out)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir(parents=False)
        tmp = tmp_dir / out.name
        yield tmp
        written = [p for p in tmp_dir.iterdir() if p.name != out.name]
        for extra in written:                      # data files first (e.g. .zraw beside .mhd)
            os.replace(extra, out.parent / extra.name)
        if not tmp.exists():
            raise OSError(f"{out}: the writer produced no file")
        os.replace(tmp, out)
    finally:
        with _termination_deferred():     # a SIGTERM in the middle of the clean-up would leave part of it
            shutil.rmtree(tmp_dir, ignore_errors=True)


@contextmanager
def _termination_deferred():
    """SIGTERM and SIGINT held back (delivered when the block ends) where the platform allows it:
    the CLI turns them into exceptions, which must not cut a clean-up short."""
    import signal
    import threading

    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = mask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


# ----------------------------------------------------------------------------- messages

def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception as one line: its message with newlines folded, or its type when empty."""
    raw = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else err   # KeyError quotes its text
    text = " ".join(str(raw).split())
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)) \
            and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {err.strerror or text}"
    elif isinstance(err, OSError) and err.strerror and err.filename and not text.startswith(str(err.filename)):
        text = f"{err.filename}: {err.strerror}"
    if not text:
        text = type(err).__name__
    elif isinstance(err, MemoryError):
        text = f"out of memory ({text})"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def name_file(path, message: str) -> str:
    """Prefix ``message`` with the file's path unless it already names it."""
    path = str(path)
    return message if path in message else f"{path}: {message}"
