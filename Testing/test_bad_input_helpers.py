"""Shared helpers of the bad-input suite (Testing/test_bad_input_*.py); issue #16.

Every failure case asserts: the exit code (2 bad input/options/paths, 1 failed run), exactly
one ``error:`` line on stderr that names the problem, no traceback, no output file (or only
complete ones), and inputs byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable

import numpy as np
import pytest

from Speckle2SelfLib.cli import main

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
needs_non_root = pytest.mark.skipif(IS_ROOT, reason="root ignores permission bits; the check cannot fail as root")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_lines(self):
        return [line for line in self.err.splitlines() if line.strip() and not line.startswith("warning:")]


def run_cli(argv, capsys) -> Result:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_refused(result: Result, code: int, *needles: str) -> str:
    """One error line naming the problem (all ``needles``, case-insensitive), no traceback."""
    assert result.code == code, (result.code, result.err)
    assert "Traceback" not in result.err and "Traceback" not in result.out
    lines = result.error_lines
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert "error" in lines[0].lower()
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder) -> Dict[str, str]:
    """Every file under ``folder`` (hidden temporaries included) with its checksum."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def checksums(paths: Iterable) -> Dict[str, str]:
    return {str(p): sha(p) for p in paths}


def speckle(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = np.clip(rng.rayleigh(60, size=shape), 0, 255)
    return values.astype(dtype)
