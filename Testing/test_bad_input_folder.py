"""Folder runs: a bad file is named with its reason and the run goes on (exit 1, summary); a run
killed half-way (SIGTERM, SIGKILL) leaves only complete outputs, and ``--skip-existing``
finishes the rest. Issue #16."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from conftest import REPO
from test_bad_input_helpers import run_cli, snapshot, speckle
from test_bad_input_readers import write_dicom


def _good_and_bad(folder: Path):
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(speckle((40, 48))).save(folder / "a.png")
    sitk.WriteImage(sitk.GetImageFromArray(speckle((2, 32, 40), seed=1)), str(folder / "sub" / "b.mha"))
    write_dicom(folder / "c.dcm", speckle((36, 44), seed=2))
    (folder / "empty.png").write_bytes(b"")
    whole = (folder / "sub" / "b.mha").read_bytes()
    (folder / "sub" / "cut.mha").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.dcm").write_text("not a DICOM file")
    Image.fromarray(np.array([[5]], np.uint8)).save(folder / "dot.png")
    nan = speckle((1, 32, 32)).astype(np.float32)
    nan[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(folder / "nan.mha"))
    return ["a.png", "sub/b.mha", "c.dcm"], ["empty.png", "sub/cut.mha", "notes.dcm", "dot.png", "nan.mha"]


def test_folder_run_writes_every_good_file_and_names_every_bad_one(tmp_path, untrained_model, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    good, bad = _good_and_bad(src)
    before = snapshot(src)
    result = run_cli(["denoise", src, out, "--model", untrained_model, "--device", "cpu"], capsys)
    assert result.code == 1, result.err
    assert "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad)
    reasons = {"empty.png": "empty", "sub/cut.mha": "truncated", "notes.dcm": "not a readable DICOM",
               "dot.png": "too small", "nan.mha": "NaN"}
    for name, reason in reasons.items():
        line = next(e for e in errors if name in e)
        assert reason.lower() in line.lower(), line
    assert "8 file(s): 3 written, 0 skipped (already there), 5 failed" in result.err
    assert sorted(snapshot(out)) == sorted(good), "exactly the good files, all complete"
    assert sitk.ReadImage(str(out / "sub" / "b.mha")).GetSize() == (40, 32, 2)
    assert snapshot(src) == before, "inputs byte-identical"


def test_an_empty_folder_is_refused(tmp_path, untrained_model, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "readme.txt").write_text("nothing to read")
    result = run_cli(["denoise", tmp_path / "in", tmp_path / "out", "--model", untrained_model], capsys)
    assert result.code == 2 and "no image, volume, sequence or DICOM file" in result.err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- killed runs

N_FILES, SIDE = 20, 512


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill_in")
    for k in range(N_FILES):
        Image.fromarray(speckle((SIDE, SIDE), seed=k)).save(folder / f"f{k:02d}.png")
    return folder


def _start(src, out, model):
    env = dict(os.environ, PYTHONPATH=str(REPO / "Speckle2Self"), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "Speckle2SelfLib.cli", "denoise", str(src), str(out),
                             "--model", str(model), "--device", "cpu", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finals(out: Path):
    return sorted(p for p in out.glob("*.png") if not p.name.startswith("."))


def _assert_complete(paths):
    for path in paths:
        with Image.open(path) as image:
            image.load()                     # a partial PNG fails here
            assert image.size == (SIDE, SIDE), path


def test_killed_folder_runs_leave_only_complete_outputs_and_skip_existing_finishes(
        big_folder, tmp_path, untrained_model, capsys):
    """One run stopped with SIGTERM, one with SIGKILL (started together: one start-up wait)."""
    inputs = snapshot(big_folder)
    runs = {sig: (tmp_path / sig.name, _start(big_folder, tmp_path / sig.name, untrained_model))
            for sig in (signal.SIGTERM, signal.SIGKILL)}
    stderr = {}
    try:
        waiting = dict(runs)
        deadline = time.monotonic() + 120
        while waiting and time.monotonic() < deadline:      # signal each run at its third output
            for sig, (out, proc) in list(waiting.items()):
                if proc.poll() is not None:
                    pytest.fail(f"{sig.name} run ended before it could be stopped: {proc.communicate()[1]}")
                if out.is_dir() and len(_finals(out)) >= 3:
                    proc.send_signal(sig)
                    del waiting[sig]
            time.sleep(0.005)
        assert not waiting, "the runs stalled"
        for sig, (out, proc) in runs.items():
            stderr[sig] = proc.communicate(timeout=60)[1]
    finally:
        for _out, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
    for sig, (out, proc) in runs.items():
        done = _finals(out)
        assert 3 <= len(done) < N_FILES, f"{sig.name}: stopped half-way"
        _assert_complete(done)
        hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
        if sig == signal.SIGTERM:
            assert proc.returncode == 143, stderr[sig]
            assert "Traceback" not in stderr[sig] and "terminated" in stderr[sig]
            assert hidden == [], "temporaries are removed on SIGTERM"
        else:
            assert proc.returncode == -signal.SIGKILL
            assert all("speckle2self-partial" in name for name in hidden), hidden
        kept = {p.name: p.read_bytes() for p in done}
        result = run_cli(["denoise", big_folder, out, "--model", untrained_model, "--device", "cpu",
                          "--skip-existing"], capsys)
        assert result.code == 0, result.err
        assert f"{len(done)} skipped" in result.out
        finals = _finals(out)
        assert len(finals) == N_FILES
        _assert_complete(finals)
        assert all(p.read_bytes() == kept[p.name] for p in finals if p.name in kept), "earlier outputs untouched"
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], "stale temporaries removed"
    assert snapshot(big_folder) == inputs


def _dead_pid() -> int:
    """The process id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("folder_run", [True, False], ids=["folder", "single file"])
def test_skip_existing_removes_the_temporary_of_a_run_killed_after_its_rename(
        tmp_path, untrained_model, capsys, folder_run):
    """A run killed between moving its output into place and removing its temporary folder leaves
    a complete output and a stale temporary; the rerun skips the output and removes the temporary."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(speckle((40, 48))).save(src / "a.png")
    out.mkdir()
    Image.fromarray(speckle((40, 48), seed=3)).save(out / "a.png")
    kept = (out / "a.png").read_bytes()
    stale = out / f".a.png.speckle2self-partial-{_dead_pid()}"
    stale.mkdir()
    (stale / "a.png").write_bytes(kept)
    args = [src, out] if folder_run else [src / "a.png", out / "a.png"]
    result = run_cli(["denoise", *args, "--model", untrained_model, "--device", "cpu", "--skip-existing"], capsys)
    assert result.code == 0, result.err
    assert "skipped" in result.out
    assert not stale.exists(), "stale temporary removed"
    assert (out / "a.png").read_bytes() == kept, "the complete output is untouched"
