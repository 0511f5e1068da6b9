"""Output paths are checked before anything is read or computed: an output that is an input
(same file, link, folder run into its own input folder), an existing folder, a missing or
read-only folder, an unknown extension. Issue #16: `segment scan.png --out scan.png` used to
overwrite the scan; `train --out no/such/dir/m.pt` used to fail after the whole budget."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

from test_bad_input_helpers import assert_refused, needs_non_root, run_cli, sha, snapshot, speckle
from Speckle2SelfLib.fileio.safeio import OutputPathError, atomic_output, check_output_path


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(speckle((48, 64))).save(folder / "scan.png")
    Image.fromarray(speckle((40, 40), seed=1)).save(folder / "sub" / "b.png")
    return folder


def _same_path_variants(data):
    scan = data / "scan.png"
    link = data.parent / "link.png"
    link.symlink_to(scan)
    hard = data.parent / "hard.png"
    os.link(scan, hard)
    return {"same": scan, "dot-dot": data / "sub" / ".." / "scan.png", "symlink": link, "hardlink": hard}


@pytest.mark.parametrize("variant", ["same", "dot-dot", "symlink", "hardlink"])
def test_denoise_refuses_an_output_that_is_its_input(variant, data, untrained_model, capsys):
    out = _same_path_variants(data)[variant]
    before = snapshot(data.parent)
    result = run_cli(["denoise", data / "scan.png", out, "--model", untrained_model], capsys)
    assert_refused(result, 2, "would overwrite the input")
    assert snapshot(data.parent) == before


@pytest.mark.parametrize("variant", ["same", "symlink"])
def test_segment_refuses_to_overwrite_the_scan(variant, data, capsys):
    out = _same_path_variants(data)[variant]
    before = snapshot(data.parent)
    result = run_cli(["segment", data / "scan.png", "--seed", "30,20", "--out", out, "--no-despeckle"], capsys)
    assert_refused(result, 2, "would overwrite the input")
    assert snapshot(data.parent) == before


@pytest.mark.parametrize("where", ["input folder", "inside it"])
def test_folder_run_refuses_an_output_folder_in_its_input(where, data, untrained_model, capsys):
    out = data if where == "input folder" else data / "sub" / "out"
    before = snapshot(data)
    result = run_cli(["denoise", data, out, "--model", untrained_model], capsys)
    assert_refused(result, 2, "input folder")
    assert snapshot(data) == before and not (data / "sub" / "out").exists()


@pytest.mark.parametrize("command", ["denoise", "segment", "train", "export"])
@pytest.mark.parametrize("problem", ["missing folder", "existing folder", "unknown extension"])
def test_output_path_problems_are_refused_before_work(command, problem, data, tmp_path, untrained_model, capsys):
    suffix = {"denoise": ".png", "segment": ".png", "train": ".pt", "export": ".pt"}[command]
    out = {"missing folder": tmp_path / "no" / "such" / f"out{suffix}",
           "existing folder": tmp_path / "existing",
           "unknown extension": tmp_path / "out.xyz"}[problem]
    (tmp_path / "existing").mkdir()
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"not used: the output is refused first")
    argv = {"denoise": ["denoise", data / "scan.png", out, "--model", untrained_model],
            "segment": ["segment", data / "scan.png", "--seed", "30,20", "--out", out, "--no-despeckle"],
            "train": ["train", data, "--out", out, "--steps", "50"],
            "export": ["export", ckpt, "--out", out]}[command]
    before = snapshot(tmp_path)
    started = time.monotonic()
    result = run_cli(argv, capsys)
    needle = {"missing folder": "does not exist", "existing folder": "existing folder",
              "unknown extension": "unknown extension"}[problem]
    assert_refused(result, 2, needle)
    assert time.monotonic() - started < 10, "refused at once, not after the work"
    assert snapshot(tmp_path) == before


def test_train_refuses_an_input_as_output(data, capsys):
    result = run_cli(["train", data / "scan.png", "--out", data / "scan.png", "--steps", "1"], capsys)
    assert_refused(result, 2, "would overwrite the input")


def test_demo_refuses_a_file_as_its_output_folder(tmp_path, capsys):
    (tmp_path / "demo").write_text("a file")
    result = run_cli(["demo", "--out", tmp_path / "demo"], capsys)
    assert_refused(result, 2, "not a folder")


@needs_non_root
def test_read_only_output_folder_is_refused(data, tmp_path, untrained_model, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_cli(["denoise", data / "scan.png", locked / "o.png", "--model", untrained_model], capsys)
        assert_refused(result, 2, "not writable")
    finally:
        locked.chmod(0o755)


def test_writability_is_probed_not_guessed(tmp_path, monkeypatch):
    """The check creates and removes a probe file, so read-only mounts are caught even for root."""
    import builtins

    real_open = builtins.open

    def read_only_fs(path, mode="r", *args, **kwargs):
        if "w" in mode and "speckle2self-partial-probe" in str(path):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_fs)
    with pytest.raises(OutputPathError, match="not writable .*Read-only file system"):
        check_output_path(tmp_path / "o.png", suffixes=[".png"])
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "o.png"
    target.write_bytes(b"earlier result")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_inputs_are_byte_identical_after_a_successful_run(data, tmp_path, untrained_model, capsys):
    before = {p: sha(p) for p in data.rglob("*.png")}
    assert run_cli(["denoise", data, tmp_path / "out", "--model", untrained_model], capsys).code == 0
    assert {p: sha(p) for p in data.rglob("*.png")} == before
    assert np.array(Image.open(tmp_path / "out" / "sub" / "b.png")).shape == (40, 40)
